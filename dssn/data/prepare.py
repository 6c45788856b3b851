"""``dssn prepare``: raw datasets -> verified Parquet shards (see dssn.data.format).

A *plan* lists the samples of each part (labeled / unlabeled / val) with their files; ``run``
turns it into shards, in parallel, verifying every sample::

    plan = voc_plan("VOCdevkit/VOC2012", split="92")
    summary = run(plan, "shards/voc-92", workers=8)
    summary.ok        # False if a labeled or val sample was bad (dataset.json not written)

Checks per sample: the image decodes; for labeled / val rows the mask file exists, decodes
(palette PNGs give their index values; RGB colour masks of a folder whose classes file gives
each class its colour, their classes by colour), has the image's size and only values in
[0, num_classes) or 255. A bad labeled / val sample is reported by path and its shard is not
written (fix it and re-run: finished shards are kept). A bad unlabeled image is skipped and
counted (``dataset.json`` "skipped", and in the shard's footer so a re-run still knows).

Idempotent: ``<out>/prepare.json`` records a fingerprint of the plan; a re-run of the same
plan skips finished shards, a different plan into the same directory is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dssn.config import IGNORE_INDEX, UNLABELED_PAD
from dssn.data import format as fmt

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
    [0, 80, 100], [0, 0, 230], [119, 11, 32],
]  # fmt: skip

DEFAULT_SHARD_BYTES = 64 * 2**20  # a shard also closes at this many bytes of image files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PLAN_FILE = "prepare.json"
SKIPPED_KEY = "dssn.skipped"  # shard footer key: JSON list of skipped unlabeled samples
PIXELS_KEY = "dssn.mask_pixels"  # shard footer key: JSON {mask value: pixels} of its masks
# a class id must stay below the two reserved mask values (254 = unlabeled padding, 255)
MAX_CLASSES = UNLABELED_PAD
# below this many samples a process pool costs more to start (seconds) than it saves
POOL_MIN_SAMPLES = 64


class PrepareError(ValueError):
    """The inputs cannot be prepared at all (missing split file, unwritable output, ...)."""


@dataclass
class Sample:
    """One sample: its id and absolute file paths (mask None for unlabeled rows)."""

    id: str
    image: str
    mask: str | None = None


@dataclass
class Plan:
    """What to prepare: the dataset's metadata and the samples of each part."""

    name: str
    classes: list[str]
    palette: list[list[int]]
    source: dict[str, Any]
    split: str | None
    parts: dict[str, list[Sample]]
    # (r, g, b) -> class id (255: ignore) for RGB colour masks; None: masks hold class ids
    mask_colours: dict[tuple[int, int, int], int] | None = None


@dataclass
class Summary:
    """What ``run`` did: rows per part, skipped unlabeled images, bad samples, shard counts."""

    out: str
    counts: dict[str, int] = field(default_factory=lambda: {p: 0 for p in fmt.PARTS})
    skipped: dict[str, int] = field(default_factory=lambda: {p: 0 for p in fmt.PARTS})
    skipped_samples: list[str] = field(default_factory=list)  # "path: reason"
    errors: list[str] = field(default_factory=list)  # bad labeled / val samples
    shards_written: int = 0
    shards_reused: int = 0
    # pixels of each mask value (0..255) over the labeled and val masks; None where a reused
    # shard was written before the counts were kept
    pixels: np.ndarray | None = field(default_factory=lambda: np.zeros(256, np.int64))

    @property
    def ok(self) -> bool:
        return not self.errors

    def absent_classes(self, num_classes: int) -> list[int]:
        """Class ids that no labeled or val mask holds ([] when the counts are unknown)."""
        if self.pixels is None:
            return []
        return [c for c in range(num_classes) if self.pixels[c] == 0]

    def ignore_share(self) -> float:
        """The share of labeled and val mask pixels that are ignore (255)."""
        total = 0 if self.pixels is None else int(self.pixels.sum())
        return float(self.pixels[IGNORE_INDEX]) / total if total else 0.0


# ----------------------------------------------------------------------------- split files


def read_list_file(path: str | Path, what: str = "split file") -> list[list[str]]:
    """Non-empty lines of a list file, split on whitespace. PrepareError if missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{what} not found: {path}")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    lines = [tokens for tokens in lines if not tokens[0].startswith("#")]
    if not lines:
        raise PrepareError(f"{what} is empty: {path}")
    return lines


def package_splits(dataset: str) -> Path:
    """The split directory shipped in the package: dssn/splits/<pascal|cityscapes>."""
    return Path(str(resources.files("dssn") / "splits" / dataset))


def _split_pairs(path: Path, root: Path, what: str) -> list[tuple[str, str]]:
    """(image path, mask path) pairs of a split file, joined to ``root``."""
    pairs = []
    for lineno, tokens in enumerate(read_list_file(path, what), 1):
        if len(tokens) < 2:
            raise PrepareError(f"{path}:{lineno}: expected '<image path> <mask path>'")
        pairs.append((str(root / tokens[0]), str(root / tokens[1])))
    return pairs


def _labeled_file(splits: Path, split: str | None, split_file: str | None) -> Path:
    if split_file is not None:
        return Path(split_file)
    if split is None:
        raise PrepareError("give --split NAME or --split-file FILE")
    path = splits / split / "labeled.txt"
    if not path.is_file():
        available = sorted(p.name for p in splits.iterdir() if (p / "labeled.txt").is_file())
        raise PrepareError(f"unknown split '{split}' ({path} not found); available: {available}")
    return path


def _train_val_plan(
    name: str,
    root: str | Path,
    splits: Path,
    train_file: str,
    labeled_path: Path,
    image_id,
) -> dict[str, list[Sample]]:
    """labeled = the split's pairs; unlabeled = train minus labeled (by image path); val."""
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"{name} root not found: {root}")
    labeled = _split_pairs(labeled_path, root, "labeled split file")
    train = _split_pairs(splits / train_file, root, "train split file")
    val = _split_pairs(splits / "val.txt", root, "val split file")
    labeled_images = {image for image, _ in labeled}
    return {
        "labeled": [Sample(image_id(i), i, m) for i, m in labeled],
        "unlabeled": [Sample(image_id(i), i) for i, _ in train if i not in labeled_images],
        "val": [Sample(image_id(i), i, m) for i, m in val],
    }


def voc_plan(
    root: str | Path,
    split: str | None = None,
    split_file: str | None = None,
    splits_dir: str | Path | None = None,
) -> Plan:
    """PASCAL VOC 2012 + SBD (train_aug): labeled from the split, the rest of train_aug
    unlabeled, the 1,449 val images."""
    splits = Path(splits_dir) if splits_dir else package_splits("pascal")
    labeled_path = _labeled_file(splits, split, split_file)
    parts = _train_val_plan(
        "VOC", root, splits, "train_aug.txt", labeled_path, lambda p: Path(p).stem
    )
    return Plan(
        name="voc",
        classes=list(VOC_CLASSES),
        palette=fmt.default_palette(len(VOC_CLASSES)),
        source={"kind": "voc", "root": str(Path(root).absolute())},
        split=split if split_file is None else str(split_file),
        parts=parts,
    )


def cityscapes_plan(
    root: str | Path,
    split: str | None = None,
    split_file: str | None = None,
    splits_dir: str | Path | None = None,
) -> Plan:
    """Cityscapes fine (leftImg8bit + gtFine labelTrainIds, 19 classes)."""
    splits = Path(splits_dir) if splits_dir else package_splits("cityscapes")
    labeled_path = _labeled_file(splits, split, split_file)
    parts = _train_val_plan(
        "Cityscapes",
        root,
        splits,
        "train.txt",
        labeled_path,
        lambda p: Path(p).stem.removesuffix("_leftImg8bit"),
    )
    return Plan(
        name="cityscapes",
        classes=list(CITYSCAPES_CLASSES),
        palette=[list(c) for c in CITYSCAPES_PALETTE],
        source={"kind": "cityscapes", "root": str(Path(root).absolute())},
        split=split if split_file is None else str(split_file),
        parts=parts,
    )


# ----------------------------------------------------------------------------- custom folder


IGNORE_NAME = "ignore"  # a classes-file line 'ignore r g b': that mask colour becomes 255


def read_classes_file(path: str | Path) -> tuple[list[str], list[list[int]]]:
    """Class names, one per line; optional colour as 'name r g b' (all lines or none)."""
    names, palette, _ = read_class_table(path)
    return names, palette


def read_class_table(
    path: str | Path,
) -> tuple[list[str], list[list[int]], dict[tuple[int, int, int], int] | None]:
    """(class names, palette, mask colours) of a classes file: one class per line, optionally
    'name r g b' (on all lines or none). With colours, RGB masks are read by colour: the
    third item maps each class's colour to its id, and lines 'ignore r g b' (not classes) map
    their colours to 255; without, it is None."""
    names, colours, ignored = [], [], []
    for lineno, tokens in enumerate(read_list_file(path, "classes file"), 1):
        tail = tokens[-3:]
        if len(tokens) >= 4 and all(t.isdigit() for t in tail):
            rgb = [int(t) for t in tail]
            if max(rgb) > 255:
                raise PrepareError(f"{path}:{lineno}: colour values must be 0..255")
            name = " ".join(tokens[:-3])
            if name.lower() == IGNORE_NAME:
                ignored.append(tuple(rgb))
                continue
            names.append(name)
            colours.append(rgb)
        else:
            names.append(" ".join(tokens))
    if (colours or ignored) and len(colours) != len(names):
        raise PrepareError(f"{path}: give a colour on every line or on none")
    if not 2 <= len(names) <= MAX_CLASSES:
        raise PrepareError(f"{path}: {len(names)} classes; expected 2..{MAX_CLASSES}")
    if len(set(names)) != len(names):
        raise PrepareError(f"{path}: duplicate class names")
    if not colours:
        return names, fmt.default_palette(len(names)), None
    table: dict[tuple[int, int, int], int] = {}
    for value, rgb in [*enumerate(map(tuple, colours)), *((IGNORE_INDEX, c) for c in ignored)]:
        if rgb in table:
            raise PrepareError(f"{path}: colour {list(rgb)} is given twice")
        table[rgb] = value
    return names, colours, table


def _image_keys(images: Path) -> dict[str, Path]:
    """key (relative path without suffix, '/'-separated) -> image file, for every image."""
    found = {}
    for path in sorted(images.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            key = path.relative_to(images).with_suffix("").as_posix()
            if key in found:
                raise PrepareError(f"two images share the name {key}: {found[key]}, {path}")
            found[key] = path
    return found


def _listed_keys(path: str | Path, keys: dict[str, Path], what: str) -> list[str]:
    """Keys named in a list file (first token per line; suffix optional)."""
    out = []
    for lineno, tokens in enumerate(read_list_file(path, what), 1):
        key = Path(tokens[0]).with_suffix("").as_posix() if "." in tokens[0] else tokens[0]
        if key not in keys:
            raise PrepareError(f"{path}:{lineno}: '{tokens[0]}' is not an image of the folder")
        out.append(key)
    return out


def folder_plan(
    images: str | Path,
    classes_file: str | Path,
    masks: str | Path | None = None,
    labeled_list: str | Path | None = None,
    val_list: str | Path | None = None,
) -> Plan:
    """Any folder of images: masks are ``<masks>/<same relative name>.png``.

    val = the images named in ``val_list``; labeled = those in ``labeled_list`` (default: every
    other image that has a mask); unlabeled = the rest (they need no masks).
    """
    images = Path(images)
    if not images.is_dir():
        raise PrepareError(f"images directory not found: {images}")
    if masks is not None and not Path(masks).is_dir():
        raise PrepareError(f"masks directory not found: {masks}")
    classes, palette, mask_colours = read_class_table(classes_file)
    keys = _image_keys(images)
    if not keys:
        raise PrepareError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images}")

    def mask_of(key: str) -> str:
        if masks is None:
            return str(Path("<no --masks given>") / f"{key}.png")
        return str(Path(masks) / f"{key}.png")

    if val_list is None:
        raise PrepareError("give --val-list FILE: the images to evaluate on (with masks)")
    val = _listed_keys(val_list, keys, "val list")
    if labeled_list is not None:
        labeled = _listed_keys(labeled_list, keys, "labeled list")
    elif masks is not None:
        val_set = set(val)
        labeled = [k for k in keys if k not in val_set and Path(mask_of(k)).is_file()]
    else:
        raise PrepareError("no labeled images: give --masks DIR (and optionally --labeled-list)")
    taken = set(val) | set(labeled)
    return Plan(
        name=images.name or "folder",
        classes=classes,
        palette=palette,
        source={"kind": "folder", "images": str(images.absolute()), "masks": masks and str(masks)},
        split=str(labeled_list) if labeled_list else None,
        parts={
            "labeled": [Sample(k, str(keys[k]), mask_of(k)) for k in labeled],
            "unlabeled": [Sample(k, str(keys[k])) for k in keys if k not in taken],
            "val": [Sample(k, str(keys[k]), mask_of(k)) for k in val],
        },
        mask_colours=mask_colours,
    )


# ----------------------------------------------------------------------------- one sample


def mask_from_colours(rgb: np.ndarray, colours: dict[tuple[int, int, int], int]) -> np.ndarray:
    """(H, W, 3) uint8 colour mask -> (H, W) uint8 class ids by ``colours``; ValueError naming
    the colours it does not know (the commonest first, with their pixel counts)."""
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    found, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    known = {(r << 16) | (g << 8) | b: v for (r, g, b), v in colours.items()}
    unknown = [i for i, key in enumerate(found) if int(key) not in known]
    if unknown:
        unknown.sort(key=lambda i: -counts[i])
        named = ", ".join(
            f"[{k >> 16}, {(k >> 8) & 255}, {k & 255}] ({counts[i]} px)"
            for i, k in ((i, int(found[i])) for i in unknown[:5])
        )
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ValueError(
            f"mask colours {named}{more} are not in the classes file (add them as classes, or "
            f"as '{IGNORE_NAME} r g b' lines)"
        )
    values = np.array([known[int(key)] for key in found], dtype=np.uint8)
    return values[inverse.reshape(keys.shape)]


def decode_sample_mask(data: bytes, colours: dict[tuple[int, int, int], int] | None) -> np.ndarray:
    """Mask bytes -> (H, W) uint8 class ids: :func:`fmt.decode_mask` (palette / grayscale
    PNGs), or by ``colours`` for an RGB(A) image."""
    if colours is not None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode in ("RGB", "RGBA"):
                    return mask_from_colours(np.asarray(im.convert("RGB")), colours)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"mask does not decode: {e}") from e
    try:
        return fmt.decode_mask(data)
    except ValueError as e:
        if colours is None and "'RGB" in str(e):
            raise ValueError(
                f"{e} (`dssn prepare folder` reads colour masks when its classes file gives "
                "every class its colour: 'name r g b')"
            ) from e
        raise


def load_sample(
    sample: Sample,
    num_classes: int,
    labeled: bool,
    mask_colours: dict[tuple[int, int, int], int] | None = None,
    pixels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Read and verify one sample -> a shard row. ValueError (naming the file) if bad. A
    good mask's pixels are added to ``pixels`` (256 counts, by mask value) if given."""
    try:
        image_bytes = Path(sample.image).read_bytes()
    except OSError as e:
        raise ValueError(f"{sample.image}: image file unreadable ({e.strerror or e})") from e
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()  # full decode: catches truncated / corrupt files
            width, height = im.size
            if fmt.image_format(image_bytes) is None or im.mode not in ("RGB", "L"):
                # not JPEG/PNG, or a mode the loaders may not all read: store as RGB PNG
                image_bytes = fmt.encode_image(np.asarray(im.convert("RGB")))
    except Exception as e:
        raise ValueError(f"{sample.image}: image does not decode ({e})") from e
    row = {"id": sample.id, "image": image_bytes, "mask": None, "height": height, "width": width}
    if not labeled:
        return row
    if sample.mask is None or not Path(sample.mask).is_file():
        raise ValueError(f"{sample.mask}: mask file missing (for image {sample.image})")
    mask_bytes = Path(sample.mask).read_bytes()
    try:
        mask = decode_sample_mask(mask_bytes, mask_colours)
    except ValueError as e:
        raise ValueError(f"{sample.mask}: {e}") from e
    if mask.shape != (height, width):
        raise ValueError(
            f"{sample.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
            f"{width}x{height} ({sample.image})"
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if len(bad):
        raise ValueError(
            f"{sample.mask}: mask values {bad.tolist()} outside [0, {num_classes}) and "
            f"{IGNORE_INDEX}"
        )
    if pixels is not None:
        pixels += np.bincount(mask.ravel(), minlength=256)
    with Image.open(io.BytesIO(mask_bytes)) as im:
        keep = fmt.image_format(mask_bytes) == "png" and im.mode in ("P", "L")
    row["mask"] = mask_bytes if keep else fmt.encode_mask(mask)
    return row


# ----------------------------------------------------------------------------- shards


@dataclass
class ShardTask:
    out: str
    part: str
    index: int
    samples: list[Sample]
    num_classes: int
    mask_colours: dict[tuple[int, int, int], int] | None = None


@dataclass
class ShardResult:
    part: str
    index: int
    rows: int
    reused: bool
    errors: list[str]
    skipped: list[str]
    pixels: np.ndarray | None = None  # by mask value; None: unlabeled, or not kept (old shard)


def process_shard(task: ShardTask) -> ShardResult:
    """Verify and write one shard (or reuse it if already complete)."""
    path = f"{task.out}/{task.part}/{fmt.shard_name(task.index)}"
    labeled = task.part != "unlabeled"
    if fmt.shard_complete(path):
        rows, meta = fmt.read_shard_metadata(path)
        skipped = json.loads(meta.get(SKIPPED_KEY, "[]"))
        pixels = None
        if labeled and PIXELS_KEY in meta:
            pixels = np.zeros(256, np.int64)
            for value, count in json.loads(meta[PIXELS_KEY]).items():
                pixels[int(value)] = count
        return ShardResult(task.part, task.index, rows, True, [], skipped, pixels)
    rows, errors, skipped = [], [], []
    pixels = np.zeros(256, np.int64) if labeled else None
    for sample in task.samples:
        try:
            rows.append(load_sample(sample, task.num_classes, labeled, task.mask_colours, pixels))
        except ValueError as e:
            (errors if labeled else skipped).append(str(e))
    if errors:  # not written: a re-run after the fix redoes just this shard
        return ShardResult(task.part, task.index, 0, False, errors, skipped)
    meta = {SKIPPED_KEY: json.dumps(skipped)}
    if pixels is not None:
        meta[PIXELS_KEY] = json.dumps({int(v): int(pixels[v]) for v in np.flatnonzero(pixels)})
    fmt.write_shard(task.out, task.part, task.index, rows, meta)
    return ShardResult(task.part, task.index, len(rows), False, [], skipped, pixels)


def plan_shards(samples: list[Sample], shard_rows: int, shard_bytes: int) -> list[list[Sample]]:
    """Consecutive groups of at most ``shard_rows`` samples and ~``shard_bytes`` image bytes."""
    if shard_rows <= 0 or shard_bytes <= 0:
        raise PrepareError("shard rows and shard bytes must be positive")
    shards: list[list[Sample]] = []
    current: list[Sample] = []
    size = 0
    for sample in samples:
        try:
            nbytes = os.path.getsize(sample.image)
        except OSError:
            nbytes = 0  # reported when the sample is read
        if current and (len(current) >= shard_rows or size + nbytes > shard_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(sample)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _fingerprint(plan: Plan, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps([plan.name, plan.classes]).encode())
    if plan.mask_colours:  # other colours make other masks (absent: fingerprints as before)
        digest.update(json.dumps(sorted(plan.mask_colours.items())).encode())
    for part in fmt.PARTS:
        for s in plan.parts[part]:
            digest.update(f"{part}\t{s.id}\t{s.image}\t{s.mask}\n".encode())
    return digest.hexdigest()


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there; PrepareError if that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PrepareError(f"cannot write to output directory {out}: {e.strerror or e}") from e


def _check_plan(plan: Plan) -> None:
    seen: dict[str, str] = {}
    for part in fmt.PARTS:
        for s in plan.parts[part]:
            if s.id in seen:
                raise PrepareError(
                    f"sample id '{s.id}' appears twice ({seen[s.id]} and {part}: {s.image})"
                )
            seen[s.id] = f"{part}: {s.image}"
    for part in ("labeled", "val"):
        if not plan.parts[part]:
            raise PrepareError(f"the {part} part is empty")


def _claim_output(out: Path, fingerprint: str, settings: dict, overwrite: bool) -> None:
    """Write prepare.json, or check that it describes the same plan."""
    record = out / PLAN_FILE
    if record.is_file() and not overwrite:
        previous = json.loads(record.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise PrepareError(
                f"{out} holds shards of a different preparation ({previous.get('settings')}); "
                "choose another --out, or pass --overwrite to replace them"
            )
        return
    if overwrite:
        for part in fmt.PARTS:
            fmt.remove_shards_from(out, part, 0)
        (out / fmt.DATASET_INFO).unlink(missing_ok=True)
    record.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=2))


def run(
    plan: Plan,
    out: str | Path,
    shard_rows: int = fmt.DEFAULT_SHARD_ROWS,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Summary:
    """Write the plan's shards under ``out`` and, if every labeled / val sample was good,
    ``dataset.json``. Samples are written in a seeded random order (shards are random subsets,
    which the streaming pipeline relies on for shuffling)."""
    from tqdm import tqdm

    _check_plan(plan)
    if len(plan.classes) > MAX_CLASSES:
        raise PrepareError(f"{len(plan.classes)} classes; at most {MAX_CLASSES} are supported")
    out = Path(out)
    check_writable(out)
    settings = {"shard_rows": shard_rows, "shard_bytes": shard_bytes, "seed": seed}
    _claim_output(out, _fingerprint(plan, settings), settings, overwrite)

    rng = np.random.default_rng(seed)
    tasks = []
    for part in fmt.PARTS:
        samples = [plan.parts[part][i] for i in rng.permutation(len(plan.parts[part]))]
        groups = plan_shards(samples, shard_rows, shard_bytes)
        tasks += [
            ShardTask(str(out), part, i, g, len(plan.classes), plan.mask_colours)
            for i, g in enumerate(groups)
        ]
        fmt.remove_shards_from(out, part, len(groups))  # stale shards of a longer earlier run

    summary = Summary(out=str(out))
    total = sum(len(t.samples) for t in tasks)
    with tqdm(total=total, desc=f"prepare {plan.name}", unit="img", disable=not progress) as bar:
        for result, task in _execute(tasks, workers):
            summary.counts[result.part] += result.rows
            summary.skipped[result.part] += len(result.skipped)
            summary.skipped_samples += result.skipped
            summary.errors += result.errors
            summary.shards_reused += result.reused
            if result.part != "unlabeled" and not result.errors:
                if result.pixels is None or summary.pixels is None:
                    summary.pixels = None  # a reused shard from before the counts were kept
                else:
                    summary.pixels += result.pixels
            summary.shards_written += not result.reused and not result.errors
            bar.update(len(task.samples))
    summary.errors.sort()
    if summary.ok:
        fmt.write_dataset_info(
            out,
            {
                "name": plan.name,
                "classes": plan.classes,
                "palette": plan.palette,
                "counts": summary.counts,
                "skipped": summary.skipped,
                "skipped_samples": sorted(summary.skipped_samples),
                **(
                    {"class_pixels": [int(n) for n in summary.pixels[: len(plan.classes)]]}
                    if summary.pixels is not None
                    else {}
                ),
                "source": plan.source,
                "split": plan.split,
                **settings,
            },
        )
    return summary


def _execute(tasks: list[ShardTask], workers: int):
    """(result, task) pairs as shards finish; a process pool when workers > 1 and the job is
    big enough to pay for starting it."""
    samples = sum(len(task.samples) for task in tasks)
    if workers <= 1 or len(tasks) <= 1 or samples < POOL_MIN_SAMPLES:
        for task in tasks:
            yield process_shard(task), task
        return
    import multiprocessing

    # spawn: the parent may hold threads (Ray, pyarrow) that fork would copy half-way
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
        futures = {pool.submit(process_shard, task): task for task in tasks}
        for future in as_completed(futures):
            yield future.result(), futures[future]


def summary_dict(summary: Summary) -> dict[str, Any]:
    """The summary as plain data (for printing or JSON)."""
    out = asdict(summary)
    out["pixels"] = None if summary.pixels is None else summary.pixels.tolist()
    return out
