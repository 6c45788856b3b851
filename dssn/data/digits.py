"""The built-in dataset ``digits``: segmentation scenes made from scikit-learn's handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 handwritten digits (the UCI optdigits test
set, 13 writers) with scikit-learn, so the dataset needs no download. Each scene holds a few
digits, smoothly upscaled to varied sizes (bicubic: the 8×8 blocks become strokes), coloured,
over a textured background (a colour gradient plus stripes, blotches or grain), possibly
overlapping: a later digit occludes an earlier one and the mask follows the visible glyph. The
mask is ``digit + 1`` on the glyph (upscaled intensity above a threshold) and 0 elsewhere:
11 classes, "background" and "0".."9".

Digits are drawn from a long-tailed (Zipf) prior whose order is fixed by the seed, so
class-aware pseudo-label selection has rare classes to protect. The source digits are split
before any scene is drawn (every ``val_every``-th digit of each class goes to validation), so
val scenes show handwriting never seen in training. Every scene comes from its own random
stream ``(seed, kind, index)``: the same options give the same bytes, whatever ``workers``.

    from dssn.data.digits import generate
    info = generate("shards/digits")            # 2,000 train scenes, 1/16 labeled, 300 val
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dssn.data import format as fmt

CLASSES = ["background"] + [str(d) for d in range(10)]
NUM_CLASSES = len(CLASSES)
# background black, then ten well-separated colours (mask of digit d is coloured PALETTE[d + 1])
PALETTE = [
    [0, 0, 0],
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 190],
]
SOURCE = "sklearn digits"
GLYPH_MAX = 16.0  # load_digits intensities are 0..16
GLYPH_MARGIN = 1  # empty source pixels around a glyph: the digit fills 8/10 of its box
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's convert("L")
# random streams: scenes of each kind, and the class order of the prior
STREAM = {"val": 0, "train": 1, "prior": 7}
PLACEMENT_TRIES = 16  # positions tried for a digit before taking the least-overlapping one
COLOUR_TRIES = 32  # digit colours tried before falling back to black or white
FOOTER_KEY = "dssn.digits"  # shard footer: the generator options that made it


@dataclass(frozen=True)
class DigitsSpec:
    """Generator options (all recorded in dataset.json under ``generator``)."""

    n_train: int = 2000  # training scenes: the first labeled_fraction of them are labeled
    n_val: int = 300
    labeled_fraction: float = 1 / 16
    seed: int = 0
    scene_size: int = 64  # scenes are square
    size_min: int = 34  # side of a digit's box in pixels, drawn uniformly (the digit: 8/10)
    size_max: int = 50
    digits_min: int = 1  # digits per scene, drawn uniformly
    digits_max: int = 3
    max_overlap: float = 0.2  # a digit's box covers at most this share of an earlier one's
    zipf: float = 1.15  # class prior p(rank r) ∝ r^-zipf: rarest / commonest = 10^-zipf
    val_every: int = 5  # every 5th source digit of each class is kept for validation scenes
    mask_threshold: float = 0.4  # upscaled glyph intensity (0..1) above which a pixel is digit
    stroke_gain: float = 1.6  # opacity = clip(intensity * gain): solid strokes, soft edges
    min_contrast: float = 0.45  # |luma(digit) - mean luma(background under it)|, 0..1
    texture: float = 0.08  # amplitude of the background stripes / blotches (0..1)
    grain: float = 0.03  # std of the per-pixel background noise (0..1)
    shard_rows: int = fmt.DEFAULT_SHARD_ROWS

    def check(self) -> DigitsSpec:
        """Raise ValueError naming the first option out of range."""
        rules = [
            ("n_train", self.n_train >= 1, "must be at least 1"),
            ("n_val", self.n_val >= 1, "must be at least 1"),
            ("labeled_fraction", 0 < self.labeled_fraction <= 1, "must be in (0, 1]"),
            ("size_min", 1 <= self.size_min <= self.size_max, "must be in [1, size_max]"),
            ("size_max", self.size_max <= self.scene_size, "must be at most scene_size"),
            ("digits_min", 1 <= self.digits_min <= self.digits_max, "must be in [1, digits_max]"),
            ("max_overlap", 0 <= self.max_overlap <= 1, "must be in [0, 1]"),
            ("zipf", self.zipf >= 0, "must be non-negative"),
            ("val_every", self.val_every >= 2, "must be at least 2"),
            ("mask_threshold", 0 < self.mask_threshold < 1, "must be in (0, 1)"),
            ("min_contrast", 0 <= self.min_contrast <= 1, "must be in [0, 1]"),
            ("shard_rows", self.shard_rows >= 1, "must be at least 1"),
        ]
        for name, ok, msg in rules:
            if not ok:
                raise ValueError(f"digits option '{name}' {msg} (got {getattr(self, name)!r})")
        return self


def make_spec(**options: Any) -> DigitsSpec:
    """A checked DigitsSpec from keyword options (``None`` keeps the default)."""
    known = {f.name for f in fields(DigitsSpec)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown digits option(s) {unknown}; known: {sorted(known)}")
    return DigitsSpec(**{k: v for k, v in options.items() if v is not None}).check()


def labeled_count(spec: DigitsSpec) -> int:
    """How many training scenes are labeled: the first ``round(n_train * fraction)`` (≥ 1)."""
    return max(1, round(spec.n_train * spec.labeled_fraction))


# ----------------------------------------------------------------------------- sources


@lru_cache(maxsize=1)
def source_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 glyphs in 0..1 and their (1797,) digit labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / GLYPH_MAX, data.target.astype(np.int64)


def source_split(spec: DigitsSpec) -> dict[str, np.ndarray]:
    """Indices of the source digits for training and for val scenes: disjoint, stratified
    (every ``val_every``-th digit of each class, in index order, goes to val)."""
    _, labels = source_digits()
    val = np.zeros(len(labels), dtype=bool)
    for d in range(10):
        val[np.flatnonzero(labels == d)[:: spec.val_every]] = True
    return {"train": np.flatnonzero(~val), "val": np.flatnonzero(val)}


def class_prior(spec: DigitsSpec) -> np.ndarray:
    """(10,) probabilities of the digits 0..9: Zipf over ranks, the ranks shuffled by the seed."""
    order = np.random.default_rng([spec.seed, STREAM["prior"]]).permutation(10)
    prior = np.empty(10)
    prior[order] = np.arange(1, 11, dtype=np.float64) ** -spec.zipf
    return prior / prior.sum()


@lru_cache(maxsize=8)
def _pools(spec: DigitsSpec) -> dict[str, list[np.ndarray]]:
    """Per kind (train / val), per digit: the source indices scenes may draw from."""
    _, labels = source_digits()
    split = source_split(spec)
    return {kind: [idx[labels[idx] == d] for d in range(10)] for kind, idx in split.items()}


# ----------------------------------------------------------------------------- drawing


def upscale_glyph(glyph: np.ndarray, size: int) -> np.ndarray:
    """An 8×8 glyph (0..1) -> (size, size) in 0..1, bicubic so the blocks become strokes.

    The glyph gets an empty margin of GLYPH_MARGIN source pixels first: many digits touch
    their 8×8 frame, and their strokes would otherwise end in a straight cut at the box edge.
    """
    from PIL import Image

    padded = np.pad(glyph, GLYPH_MARGIN)  # (8 + 2m, 8 + 2m)
    img = Image.fromarray(padded, mode="F")  # float32: no rounding before the resize
    return np.clip(np.asarray(img.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int, spec: DigitsSpec) -> np.ndarray:
    """(size, size, 3) float32 in 0..1: a two-colour gradient plus stripes, blotches or
    nothing, plus grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy  # (size, size) position along the gradient
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.integers(3)
    if kind == 0:  # stripes at another angle
        freq, phase, turn = rng.uniform(3, 10), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(turn) * xx + np.sin(turn) * yy) + phase)
        bg += spec.texture * wave[..., None]
    elif kind == 1:  # blotches: coarse 8×8 colour noise, blown up to blocks
        cells = -(-size // 8)
        coarse = rng.normal(0, spec.texture, (8, 8, 3)).astype(np.float32)
        bg += np.kron(coarse, np.ones((cells, cells, 1), np.float32))[:size, :size]
    bg += rng.normal(0, spec.grain, bg.shape).astype(np.float32)
    return np.clip(bg, 0, 1)


def _digit_colour(rng: np.random.Generator, under: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random (3,) colour whose luma differs from the mean luma of ``under`` (h, w, 3) by at
    least ``min_contrast``; black or white if none is found."""
    target = float((under @ LUMA).mean())
    for _ in range(COLOUR_TRIES):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        if abs(float(colour @ LUMA) - target) >= min_contrast:
            return colour
    return np.full(3, 0.0 if target > 0.5 else 1.0, dtype=np.float32)


def _place(rng: np.random.Generator, size: int, s: int, boxes: list, max_overlap: float):
    """Top-left corner for an s×s digit whose box covers at most ``max_overlap`` of each
    earlier box (digits overlap but stay recognisable); the least-overlapping of a few tries."""
    best, best_overlap = (0, 0), float("inf")
    for _ in range(PLACEMENT_TRIES):
        y, x = (int(v) for v in rng.integers(0, size - s + 1, 2))
        overlap = 0.0
        for by, bx, bs in boxes:
            dy = max(0, min(y + s, by + bs) - max(y, by))
            dx = max(0, min(x + s, bx + bs) - max(x, bx))
            overlap = max(overlap, dy * dx / min(s, bs) ** 2)
        if overlap <= max_overlap:
            return y, x
        if overlap < best_overlap:
            best, best_overlap = (y, x), overlap
    return best


def render_scene(spec: DigitsSpec, kind: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``kind`` ("train" or "val"): image (S, S, 3) uint8, mask (S, S) uint8
    with 0 = background and d + 1 on the visible pixels of digit d."""
    image, mask, _ = _render(spec, kind, index)
    return image, mask


def scene_digits(spec: DigitsSpec, kind: str, index: int) -> list[dict[str, int]]:
    """The digits of a scene, in drawing order: digit, source index, size, top, left."""
    return _render(spec, kind, index)[2]


def _render(spec: DigitsSpec, kind: str, index: int):
    if kind not in ("train", "val"):
        raise ValueError(f"scene kind must be 'train' or 'val', got {kind!r}")
    glyphs, _ = source_digits()
    pool = _pools(spec)[kind]
    prior = class_prior(spec)
    rng = np.random.default_rng([spec.seed, STREAM[kind], index])
    size = spec.scene_size
    image = _background(rng, size, spec)
    mask = np.zeros((size, size), dtype=np.uint8)
    placed: list[dict[str, int]] = []
    boxes: list[tuple[int, int, int]] = []
    for _ in range(rng.integers(spec.digits_min, spec.digits_max + 1)):
        digit = int(rng.choice(10, p=prior))
        source = int(rng.choice(pool[digit]))
        s = int(rng.integers(spec.size_min, spec.size_max + 1))
        glyph = upscale_glyph(glyphs[source], s)  # (s, s) in 0..1
        y, x = _place(rng, size, s, boxes, spec.max_overlap)
        boxes.append((y, x, s))
        placed.append({"digit": digit, "source": source, "size": s, "top": y, "left": x})
        region = image[y : y + s, x : x + s]  # a view: drawing below paints the scene
        colour = _digit_colour(rng, region, spec.min_contrast)
        alpha = np.clip(glyph * spec.stroke_gain, 0, 1)[..., None]  # (s, s, 1)
        region *= 1 - alpha
        region += colour * alpha
        # a later digit overwrites the mask where its glyph is: the visible one wins
        mask[y : y + s, x : x + s][glyph > spec.mask_threshold] = digit + 1
    return (image * 255 + 0.5).astype(np.uint8), mask, placed


# ----------------------------------------------------------------------------- writing


def _fingerprint(spec: DigitsSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def _write_shard(job: tuple) -> int:
    """Render and write one shard: (spec, root, part, shard index, scene kind, indices)."""
    spec, root, part, shard, kind, indices = job
    rows = []
    for i in indices:
        image, mask = render_scene(spec, kind, i)
        rows.append(
            {
                "id": f"{kind}-{i:05d}",
                "image": fmt.encode_image(image, "png"),
                "mask": None if part == "unlabeled" else fmt.encode_mask(mask),
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
    fmt.write_shard(root, part, shard, rows, metadata={FOOTER_KEY: _fingerprint(spec)})
    return len(rows)


def _check_existing(root: str, spec: DigitsSpec) -> None:
    """Refuse to mix: shards already in ``root`` must come from the same options."""
    want = _fingerprint(spec)
    for part in fmt.PARTS:
        for path in fmt.list_shards(root, part):
            _, meta = fmt.read_shard_metadata(path)
            if meta.get(FOOTER_KEY) != want:
                raise ValueError(
                    f"{path} was not generated with these digits options: use another output "
                    f"directory or delete {root}"
                )


def class_pixels(root: str) -> list[int]:
    """Pixels of each class over the labeled and val masks under ``root`` (as ``dssn
    prepare`` writes them into dataset.json), read back from the shards so that reused
    shards count too."""
    counts = np.zeros(NUM_CLASSES, np.int64)
    for part in ("labeled", "val"):
        for path in fmt.list_shards(root, part):
            for data in fmt.read_shard(path, columns=["mask"]).column("mask").to_pylist():
                counts += np.bincount(fmt.decode_mask(data).ravel(), minlength=NUM_CLASSES)
    return [int(n) for n in counts]


def generate(out: str | os.PathLike, *, workers: int | None = None, **options: Any) -> dict:
    """Generate the digits shards and dataset.json under ``out``; return the dataset info.

    ``options`` are the fields of :class:`DigitsSpec`: ``n_train`` (2000), ``n_val`` (300),
    ``labeled_fraction`` (1/16), ``seed`` (0), ``scene_size``, ``size_min`` / ``size_max``,
    ``digits_min`` / ``digits_max``, ``zipf``, ``shard_rows``, …; ``None`` keeps the default.
    ``workers`` processes render shards in parallel (the bytes do not depend on it).
    Idempotent: finished shards of the same options are kept; a directory holding shards made
    with other options is refused (ValueError naming the shard).
    """
    spec = make_spec(**options)
    root = str(out)
    Path(root).mkdir(parents=True, exist_ok=True)
    _check_existing(root, spec)
    n_labeled = labeled_count(spec)
    parts = {  # part -> (scene kind, scene indices)
        "labeled": ("train", range(0, n_labeled)),
        "unlabeled": ("train", range(n_labeled, spec.n_train)),
        "val": ("val", range(spec.n_val)),
    }
    jobs = [
        (spec, root, part, shard, kind, indices[start : start + spec.shard_rows])
        for part, (kind, indices) in parts.items()
        for shard, start in enumerate(range(0, len(indices), spec.shard_rows))
    ]
    if (workers or 1) > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    counts = {part: len(indices) for part, (_, indices) in parts.items()}
    for part, n in counts.items():  # shards beyond these counts cannot exist (same options)
        fmt.remove_shards_from(root, part, -(-n // spec.shard_rows))
    split = source_split(spec)
    info = {
        "name": "digits",
        "classes": CLASSES,
        "palette": PALETTE,
        "counts": counts,
        "skipped": {part: 0 for part in parts},
        "source": SOURCE,
        "split": str(Fraction(spec.labeled_fraction).limit_denominator(1000)),
        "seed": spec.seed,
        "generator": asdict(spec),
        "class_prior": [round(float(p), 6) for p in class_prior(spec)],
        "class_pixels": class_pixels(root),
        "source_digits": "sklearn.datasets.load_digits: 1,797 8x8 digits (UCI optdigits test set)",
        "source_split": f"stratified: every {spec.val_every}th digit of each class -> val",
        "val_source_indices": split["val"].tolist(),
    }
    fmt.write_dataset_info(root, info)
    return fmt.read_dataset_info(root)
