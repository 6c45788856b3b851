"""The built-in dataset ``digits``: segmentation scenes made from scikit-learn's handwritten digits.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 digits by 43 writers with scikit-learn, so
the dataset needs no download. Each scene has a few digits, smoothly upscaled to varied sizes,
coloured, over a textured background, possibly overlapping (a later digit occludes an earlier
one). The mask is ``digit + 1`` on the visible glyph and 0 elsewhere: 11 classes.

Digits are drawn from a long-tailed (Zipf) prior, so class-aware pseudo-label selection has rare
classes to protect; validation scenes use source digits never used in training scenes.
Every scene is generated from its own seed ``(seed, part, index)``: the same seed gives the same
bytes, whatever the number of worker processes.

    from dssn.data.digits import generate
    info = generate("shards/digits")            # ~2,000 train scenes, 1/16 labeled, 300 val
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dssn.data import format as fmt

CLASSES = ["background"] + [str(d) for d in range(10)]
NUM_CLASSES = len(CLASSES)
# background black, then ten well-separated colours
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
GLYPH_MAX = 16.0  # load_digits intensities are 0..16


@dataclass
class DigitsSpec:
    """Generator parameters (recorded in dataset.json)."""

    n_train: int = 2000
    n_val: int = 300
    labeled_fraction: float = 1 / 16
    seed: int = 0
    scene_size: int = 64  # scenes are square
    size_min: int = 26  # digit height in pixels
    size_max: int = 40
    digits_min: int = 1
    digits_max: int = 3
    max_overlap: float = 0.25  # a digit's box covers at most this much of an earlier one
    zipf: float = 1.3  # class prior p(rank r) ∝ r^-zipf: rarest/commonest = 10^-zipf
    val_every: int = 5  # every 5th source digit of each class is reserved for validation
    mask_threshold: float = 0.4  # glyph intensity (0..1) above which a pixel is the digit
    min_contrast: float = 0.45  # |luma(digit) - luma(background)| at least this (0..1)
    shard_rows: int = fmt.DEFAULT_SHARD_ROWS


@lru_cache(maxsize=1)
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / GLYPH_MAX, data.target.astype(np.int64)


def source_split(spec: DigitsSpec) -> dict[str, np.ndarray]:
    """Indices of the source digits used for train and for val scenes (disjoint)."""
    _, labels = _source_digits()
    val = np.zeros(len(labels), dtype=bool)
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        val[idx[:: spec.val_every]] = True
    return {"train": np.flatnonzero(~val), "val": np.flatnonzero(val)}


def class_prior(spec: DigitsSpec) -> np.ndarray:
    """Long-tailed probabilities of the ten digits (a seeded order of ranks)."""
    order = np.random.default_rng([spec.seed, 7]).permutation(10)
    prior = np.empty(10)
    prior[order] = np.arange(1, 11, dtype=np.float64) ** -spec.zipf
    return prior / prior.sum()


def labeled_count(spec: DigitsSpec) -> int:
    """How many of the ``n_train`` training scenes are labeled (the first ones)."""
    return max(1, round(spec.n_train * spec.labeled_fraction))


def _upscale(glyph: np.ndarray, size: int) -> np.ndarray:
    """An 8×8 glyph (0..1) -> (size, size), bicubic-smooth so strokes look drawn."""
    from PIL import Image

    img = Image.fromarray((glyph * 255).astype(np.uint8))
    out = img.resize((size, size), Image.BICUBIC)
    return np.asarray(out, dtype=np.float32) / 255.0


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in 0..1: a colour gradient plus stripes or noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0 * (1 - t) + c1 * t
    kind = rng.integers(3)
    if kind == 0:  # stripes
        freq, phase = rng.uniform(3, 10), rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * freq * (np.cos(angle + 1) * xx + np.sin(angle + 1) * yy))
        bg = bg + 0.08 * (stripes + phase * 0)[..., None]
    elif kind == 1:  # smooth blotches (upsampled noise)
        coarse = rng.normal(0, 0.1, (8, 8, 3)).astype(np.float32)
        bg = bg + np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1, 1)))[:size, :size]
    bg = bg + rng.normal(0, 0.03, bg.shape)  # fine grain on every background
    return np.clip(bg, 0, 1).astype(np.float32)


def _digit_colour(rng: np.random.Generator, local_bg: np.ndarray, min_contrast: float):
    target = float(_luma(local_bg.reshape(-1, 3)).mean())
    for _ in range(32):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        if abs(float(_luma(colour)) - target) >= min_contrast:
            return colour
    return np.full(3, 0.0 if target > 0.5 else 1.0, dtype=np.float32)


def _place(rng, size: int, s: int, boxes: list, max_overlap: float) -> tuple[int, int]:
    """A top-left corner whose box overlaps each earlier box by at most ``max_overlap`` of the
    smaller box's area (digits overlap, but stay recognisable); best of a few tries."""
    best, best_overlap = (0, 0), float("inf")
    for _ in range(16):
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


def render_scene(spec: DigitsSpec, part: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (S, S, 3) uint8 and mask (S, S) uint8 in 0..10."""
    glyphs, labels = _source_digits()
    pool = source_split(spec)["val" if part == "val" else "train"]
    prior = class_prior(spec)
    by_class = [pool[labels[pool] == d] for d in range(10)]
    rng = np.random.default_rng([spec.seed, 0 if part == "val" else 1, index])
    size = spec.scene_size
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    boxes: list[tuple[int, int, int]] = []
    for _ in range(rng.integers(spec.digits_min, spec.digits_max + 1)):
        digit = int(rng.choice(10, p=prior))
        src = int(rng.choice(by_class[digit]))
        s = int(rng.integers(spec.size_min, spec.size_max + 1))
        alpha = _upscale(glyphs[src], s)  # (s, s) in 0..1
        y, x = _place(rng, size, s, boxes, spec.max_overlap)
        boxes.append((y, x, s))
        region = image[y : y + s, x : x + s]
        colour = _digit_colour(rng, region, spec.min_contrast)
        a = np.clip(alpha * 1.6, 0, 1)[..., None]  # solid strokes, soft edges
        image[y : y + s, x : x + s] = region * (1 - a) + colour * a
        glyph = alpha > spec.mask_threshold
        mask[y : y + s, x : x + s][glyph] = digit + 1
    return (image * 255 + 0.5).astype(np.uint8), mask


def _rows(spec: DigitsSpec, part: str, indices: range, labeled: bool) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        image, mask = render_scene(spec, part, i)
        rows.append(
            {
                "id": f"{part if part == 'val' else 'train'}-{i:05d}",
                "image": fmt.encode_image(image, "png"),
                "mask": fmt.encode_mask(mask) if labeled else None,
                "height": image.shape[0],
                "width": image.shape[1],
            }
        )
    return rows


def _write_shard_job(args: tuple) -> int:
    spec, root, part, shard, indices, labeled = args
    rows = _rows(spec, part, indices, labeled)
    fmt.write_shard(root, part, shard, rows)
    return len(rows)


def generate(out: str | os.PathLike, *, workers: int | None = None, **options: Any) -> dict:
    """Generate the digits shards under ``out``; return the dataset info written.

    Options are the fields of :class:`DigitsSpec` (``n_train``, ``n_val``,
    ``labeled_fraction``, ``seed``, ``size_min``, ``size_max``, ``shard_rows``, …); ``None``
    values keep the default. Idempotent: complete shards are not rewritten.
    """
    unknown = set(options) - set(DigitsSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown digits option(s): {sorted(unknown)}")
    spec = DigitsSpec(**{k: v for k, v in options.items() if v is not None})
    if not 0 < spec.labeled_fraction <= 1:
        raise ValueError(f"labeled_fraction must be in (0, 1], got {spec.labeled_fraction}")
    if spec.size_max > spec.scene_size or spec.size_min > spec.size_max:
        raise ValueError("need size_min <= size_max <= scene_size")
    n_labeled = max(1, round(spec.n_train * spec.labeled_fraction))
    parts = {
        "labeled": ("train", range(0, n_labeled), True),
        "unlabeled": ("train", range(n_labeled, spec.n_train), False),
        "val": ("val", range(spec.n_val), True),
    }
    jobs = []
    for part, (kind, indices, labeled) in parts.items():
        for shard, start in enumerate(range(0, len(indices), spec.shard_rows)):
            chunk = indices[start : start + spec.shard_rows]
            jobs.append((spec, str(out), part if kind == "train" else "val", shard, chunk, labeled))
    Path(out).mkdir(parents=True, exist_ok=True)
    workers = workers or 1
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard_job, jobs))
    else:
        for job in jobs:
            _write_shard_job(job)
    counts = {part: len(indices) for part, (_, indices, _) in parts.items()}
    for part, n in counts.items():  # stale shards of an earlier, larger run
        fmt.remove_shards_from(out, part, -(-n // spec.shard_rows))
    info = {
        "name": "digits",
        "classes": CLASSES,
        "palette": PALETTE,
        "counts": counts,
        "skipped": {part: 0 for part in parts},
        "source": "sklearn.datasets.load_digits (1,797 8x8 digits by 43 writers)",
        "split": f"{n_labeled}/{spec.n_train} labeled",
        "generator": asdict(spec),
        "class_prior": [round(float(p), 6) for p in class_prior(spec)],
        "val_source_digits": int(len(source_split(spec)["val"])),
    }
    fmt.write_dataset_info(out, info)
    return fmt.read_dataset_info(out)
