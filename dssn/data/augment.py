"""DSSN augmentations (METHOD.md "Augmentations") as joint (image, mask) functions.

Images are uint8 tensors (3, H, W), masks uint8 (H, W); every random draw comes from the
numpy ``Generator`` passed in, so the same seed gives the same output::

    rng = np.random.default_rng(seed)
    image, mask = augment_labeled(image, mask, cfg.data, rng)     # (3, S, S), (S, S)
    views = augment_unlabeled(image, cfg.data, rng)               # weak, strong1, strong2, ...

Speed (benchmarks/data.py): the reference runs each op as a PIL round trip on the whole
rescaled image. Here the crop window is resampled directly (only pixels that survive the crop
are computed; the result equals PIL's resize + pad + crop to a grey level, masks exactly), and
a strong view is a chain of in-place float32 ops on the crop (numpy, torch's fused kernels
where they save a pass, and numba loops for hue, blur, saturation and the bilinear window:
``dssn.data.kernels``), rounded to uint8 once at the end (the reference rounds after every op;
the difference is a grey level or two). After RandomGrayscale a view carries one channel. The
pipeline ships ignore masks and CutMix boxes as a few numbers (``unlabeled_views``) and rebuilds
the masks in the consumer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from dssn.config import IGNORE_INDEX, UNLABELED_PAD
from dssn.data import kernels

# ITU-R 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
MAX_VALUE = 255.0
BLUR_TRUNCATE = 3.0  # gaussian kernel radius = ceil(this * sigma)


# ----------------------------------------------------------------------------- geometry


def sample_geometry(
    height: int, width: int, crop: int, cfg: Any, rng: np.random.Generator
) -> dict[str, int | bool]:
    """Draw the rescale / crop / flip of one sample (the reference's order of draws).

    Long side -> randint(long * lo, long * hi) (aspect kept); pad right/bottom to ``crop``;
    crop origin uniform in the padded frame; flip with ``cfg.hflip_p``.
    """
    lo, hi = cfg.scale_range
    long_side = max(height, width)
    new_long = int(rng.integers(int(long_side * lo), int(long_side * hi), endpoint=True))
    new_long = max(new_long, 1)
    if height > width:
        out_h, out_w = new_long, int(width * new_long / height + 0.5)
    else:
        out_w, out_h = new_long, int(height * new_long / width + 0.5)
    out_h, out_w = max(out_h, 1), max(out_w, 1)
    top = int(rng.integers(0, max(out_h, crop) - crop, endpoint=True))
    left = int(rng.integers(0, max(out_w, crop) - crop, endpoint=True))
    flip = bool(rng.random() < cfg.hflip_p)
    return {"out_h": out_h, "out_w": out_w, "top": top, "left": left, "flip": flip}


def _nearest_index(start: int, n: int, in_size: int, out_size: int) -> np.ndarray:
    """Source index of output pixels start..start+n-1 for a NEAREST resize.

    As PIL: x_src = floor(scale / 2 + i * scale) with the sum accumulated step by step in
    float64 (so exact halves round as PIL's do and masks match the reference exactly).
    """
    scale = in_size / out_size
    steps = np.full(start + n, scale, dtype=np.float64)
    steps[0] = scale * 0.5
    positions = np.cumsum(steps)[start:]  # sequential, like PIL's `xo += a[0]`
    return np.minimum(positions.astype(np.int64), in_size - 1)


def _linear_taps(start: int, n: int, in_size: int, out_size: int):
    """Two source taps and the weight of the second, for bilinear upsampling (half-pixel)."""
    pos = np.arange(start, start + n, dtype=np.float64)
    src = np.maximum((pos + 0.5) * (in_size / out_size) - 0.5, 0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _resample_window(image: torch.Tensor, out_h: int, out_w: int, top, left, rows, cols, flip):
    """Rows top..top+rows, cols left..left+cols of ``image`` resized to (out_h, out_w), as a
    (3, rows, cols) array (uint8, or float holding whole numbers), mirrored if ``flip``."""
    _, h, w = image.shape
    if out_h < h or out_w < w:
        # downscaling needs an antialiasing filter (as PIL's BILINEAR); the result is small
        small = TF.resize(image, [out_h, out_w], antialias=True).numpy()
        window = small[:, top : top + rows, left : left + cols]
        return window[..., ::-1] if flip else window
    # upscaling: bilinear taps for just the window, never the whole enlarged image
    y0, y1, wy = _linear_taps(top, rows, h, out_h)
    x0, x1, wx = _linear_taps(left, cols, w, out_w)
    if flip:  # mirror by reading the columns right to left
        x0, x1, wx = x0[::-1].copy(), x1[::-1].copy(), wx[::-1].copy()
    pixels = np.ascontiguousarray(image.numpy().transpose(1, 2, 0))  # decoded: a view of HWC
    return kernels.bilinear_window(pixels, y0, y1, wy, x0, x1, wx)


def _place(window: np.ndarray, out: np.ndarray, flip: bool, fill: int) -> None:
    """Write ``window`` (..., rows, cols) into the top-left of ``out`` (..., S, S), or the
    top-right if ``flip`` (the window is already mirrored); the rest of ``out`` (padding)
    becomes ``fill``. A float window (whole numbers in [0, 255]) is cast on the way."""
    rows, cols = window.shape[-2:]
    size = out.shape[-1]
    if flip:
        np.copyto(out[..., :rows, size - cols :], window, casting="unsafe")
        out[..., :rows, : size - cols] = fill
    else:
        np.copyto(out[..., :rows, :cols], window, casting="unsafe")
        out[..., :rows, cols:] = fill
    out[..., rows:, :] = fill


def apply_geometry(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    geo: dict[str, int | bool],
    crop: int,
    pad_value: int,
    out: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rescale (bilinear image, nearest mask), pad (image 0, mask ``pad_value``), crop, flip.

    Returns image (3, crop, crop) uint8 and mask (crop, crop) uint8; ``mask=None`` (unlabeled
    images) returns None for the mask (``valid_extent`` describes its padding). ``out``: a
    (3, crop, crop) uint8 array to write the image into (saves a copy in batch code).
    """
    _, h, w = image.shape
    out_h, out_w, top, left = geo["out_h"], geo["out_w"], geo["top"], geo["left"]
    rows, cols = min(crop, out_h - top), min(crop, out_w - left)  # the part that is not padding
    if out is None:
        out = np.empty((3, crop, crop), dtype=np.uint8)
    flip = bool(geo["flip"])
    _place(_resample_window(image, out_h, out_w, top, left, rows, cols, flip), out, flip, 0)
    out_mask = None
    if mask is not None:
        ys = _nearest_index(top, rows, h, out_h)
        xs = _nearest_index(left, cols, w, out_w)
        if flip:
            xs = xs[::-1]
        picked = mask.numpy()[ys][:, xs]
        out_mask = np.empty((crop, crop), dtype=np.uint8)
        _place(picked, out_mask, flip, pad_value)
        out_mask = torch.from_numpy(out_mask)
    return torch.from_numpy(out), out_mask


def ignore_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """The ignore mask of an unlabeled crop: 255 where padded (mask == 254), else 0."""
    return torch.where(mask == UNLABELED_PAD, IGNORE_INDEX, 0).to(torch.uint8)


# ----------------------------------------------------------------------------- colour ops
# Each op takes a float32 numpy array (C, H, W) with values in [0, 255] and returns one (often
# the same array, changed in place). C is 3, or 1 for a grey image: after RandomGrayscale a
# strong view carries one channel (the three are equal), so every later op does a third of the
# work; colour ops (saturation, hue) leave a grey image as it is. Parameters are drawn by the
# caller, so each op is a plain function.
#
# Speed (per op ~0.1-1 ms on a 321 crop, memory-bound): each full pass over the image costs
# ~15-27 us per channel, so the ops are written for few passes: numba loops that make one pass
# per row for the costliest (hue, blur, saturation: ``dssn.data.kernels``), torch's fused
# kernels where they save a pass (add_ with alpha, index_select), numpy for comparisons and
# selections, and no clip where the result is a convex combination of values in [0, 255]
# (factor in [0, 1]).

F32 = np.float32
GRAY_WEIGHTS_F32 = np.array(GRAY_WEIGHTS, dtype=F32)
GREY_CHROMA = 1e-3  # max - min below this (on the 0..255 scale): a grey pixel, hue undefined
HUE_LEVELS = 256  # hue resolution per sextant of the colour circle (PIL's HSV has 256 per turn)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def _gray(x: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) luma (a new array; a grey image's own channel)."""
    if len(x) == 1:
        return x[0].copy()
    r, g, b = GRAY_WEIGHTS
    gray = torch.mul(_t(x[0]), r)
    gray.add_(_t(x[1]), alpha=g)
    gray.add_(_t(x[2]), alpha=b)
    return gray.numpy()


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, MAX_VALUE, out=x)


def _blend_clip(x: np.ndarray, factor: float) -> np.ndarray:
    """Clip after a blend ``factor * x + (1 - factor) * other``: needed only when it
    extrapolates (factor outside [0, 1]); a convex combination stays in [0, 255]."""
    return x if 0.0 <= factor <= 1.0 else _clip(x)


def brightness(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (PIL ImageEnhance.Brightness)."""
    x *= F32(factor)
    return _blend_clip(x, factor)


def contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's mean grey level (PIL ImageEnhance.Contrast)."""
    sums = _t(x).sum(dim=(1, 2)).tolist()  # float32 cascade sums: ~1e-5 of a level
    if len(sums) == 3:
        r, g, b = GRAY_WEIGHTS
        mean = (r * sums[0] + g * sums[1] + b * sums[2]) / x[0].size
    else:
        mean = sums[0] / x[0].size
    x *= F32(factor)
    x += F32((1 - factor) * mean)
    return _blend_clip(x, factor)


def saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image (PIL ImageEnhance.Color)."""
    if len(x) == 1:  # already grey
        return x
    kernels.saturate(x, F32(factor), GRAY_WEIGHTS_F32)  # factor * x + (1 - factor) * gray
    return _blend_clip(x, factor)


def _hue_profiles() -> np.ndarray:
    """(3, 15 * HUE_LEVELS) channel profiles P_n(h) = clamp(min(k, 4 - k), 0, 1),
    k = (n + h) mod 6, n = 5, 3, 1 for R, G, B; tiled so any index in use needs no modulo."""
    pos = (np.arange(15 * HUE_LEVELS, dtype=np.float64) + 0.5) / HUE_LEVELS
    profiles = []
    for n in (5, 3, 1):
        k = (pos + n) % 6
        profiles.append(np.clip(np.minimum(k, 4 - k), 0, 1))
    return np.stack(profiles).astype(F32)


HUE_PROFILES = _hue_profiles()


def hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue by ``shift`` (in [-0.5, 0.5]) of a full turn, as PIL / torchvision.

    Value V = max and chroma C = max - min are kept; only the hue angle H (in sextants) moves,
    and channel n becomes V - C * P_n(H) = lerp(V, min, P_n(H)). The hue is quantised to 1/256
    of a sextant (PIL's HSV keeps 1/256 of a turn) so that P_n is a table lookup; one fused
    pass per row (``kernels.hue_rotate``).
    """
    if len(x) == 1:  # grey: no hue to rotate
        return x
    offset = F32(6 * HUE_LEVELS + round(shift * 6 * HUE_LEVELS))  # 6 sextants: index > 0
    return kernels.hue_rotate(x, offset, HUE_PROFILES, F32(HUE_LEVELS), F32(GREY_CHROMA))


def grayscale(x: np.ndarray) -> np.ndarray:
    """Grey image with three equal channels."""
    x[:] = _gray(x)
    return x


def _gaussian_kernel(sigma: float, radius: int) -> list[float]:
    weights = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-radius, radius + 1)]
    total = math.fsum(weights)
    return [w / total for w in weights]


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, reflect-padded, radius ceil(3 sigma) (one fused pass per row,
    ``kernels.blur_separable``)."""
    _, h, w = x.shape
    radius = min(math.ceil(BLUR_TRUNCATE * sigma), h - 1, w - 1)
    if radius < 1:
        return x
    weights = np.asarray(_gaussian_kernel(sigma, radius), dtype=F32)
    return kernels.blur_separable(x, weights, radius)


def autocontrast(x: np.ndarray) -> np.ndarray:
    """Stretch each channel's range to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
    lo = x.min(axis=(1, 2))
    hi = x.max(axis=(1, 2))
    for c, plane in enumerate(x):
        if hi[c] - lo[c] > GREY_CHROMA:  # a denormal range would stretch by inf (NaN)
            plane -= lo[c]
            plane *= F32(MAX_VALUE / (hi[c] - lo[c]))
    return _clip(x)


def equalize(x: np.ndarray) -> np.ndarray:
    """Histogram equalization per channel (PIL ImageOps.equalize's lookup table)."""
    levels = int(MAX_VALUE) + 1
    q = _t(np.rint(x).astype(np.uint8))  # x is in [0, 255]
    for c, plane in enumerate(x):
        hist = torch.bincount(q[c].view(-1), minlength=levels).numpy()
        last = hist[np.flatnonzero(hist)[-1]]
        step = (hist.sum() - last) // (levels - 1)
        if step == 0:
            plane[:] = q[c].numpy()
            continue
        below = np.cumsum(hist) - hist  # pixels strictly below each level
        lut = np.minimum((below + step // 2) // step, levels - 1).astype(F32)
        torch.index_select(_t(lut), 0, q[c].view(-1).int(), out=_t(plane).view(-1))
    return x


def sharpness(x: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the 3x3 SMOOTH-filtered image, border pixels kept (PIL ImageEnhance).

    SMOOTH = [[1,1,1],[1,5,1],[1,1,1]] / 13, so inside the border
    out = x + (1 - factor) * (smooth - x) = x + (1 - factor) / 13 * (box3x3 - 9 x).
    """
    if x.shape[1] < 3 or x.shape[2] < 3:
        return x
    t = _t(x)
    rows = t[:, :-2] + t[:, 1:-1]
    rows += t[:, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1]
    box += rows[:, :, 2:]
    centre = t[:, 1:-1, 1:-1]
    box.add_(centre, alpha=-9)
    centre.add_(box, alpha=(1 - factor) / 13)
    return _blend_clip(x, factor)


def posterize(x: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top ``bits`` bits of each value."""
    step = F32(2 ** (8 - bits))
    np.rint(x, out=x)
    x /= step
    np.floor(x, out=x)
    x *= step
    return x


def solarize(x: np.ndarray, threshold: int) -> np.ndarray:
    """Invert values >= threshold (threshold 256: unchanged)."""
    np.rint(x, out=x)
    flipped = F32(MAX_VALUE) - F32(2) * x  # x + flipped = 255 - x
    flipped *= x >= threshold  # (a masked subtract or np.where is slower)
    x += flipped
    return x


# ----------------------------------------------------------------------------- strong view


def _enhance_factor(cfg: Any, rng: np.random.Generator) -> float:
    return float(rng.uniform(*cfg.enhance_range))


# the random ops (name, draw the parameter, apply); drawn uniformly with replacement
RANDOM_OPS = (
    ("identity", lambda cfg, rng: None, lambda x, v: x),
    ("autocontrast", lambda cfg, rng: None, lambda x, v: autocontrast(x)),
    ("equalize", lambda cfg, rng: None, lambda x, v: equalize(x)),
    ("blur", lambda cfg, rng: float(rng.uniform(*cfg.blur_sigma)), gaussian_blur),
    ("contrast", _enhance_factor, contrast),
    ("brightness", _enhance_factor, brightness),
    ("color", _enhance_factor, saturation),
    ("sharpness", _enhance_factor, sharpness),
    (
        "posterize",
        lambda cfg, rng: int(rng.integers(cfg.posterize_bits[0], cfg.posterize_bits[1] + 1)),
        posterize,
    ),
    (
        "solarize",
        lambda cfg, rng: int(rng.integers(cfg.solarize_range[0], cfg.solarize_range[1] + 1)),
        solarize,
    ),
    (
        "hue",
        lambda cfg, rng: float(rng.uniform(0, cfg.hue_shift_max) * rng.choice([-1.0, 1.0])),
        hue,
    ),
)
OP_NAMES = tuple(name for name, _, _ in RANDOM_OPS)


def _color_jitter(x: np.ndarray, cfg: Any, rng: np.random.Generator) -> np.ndarray:
    """torchvision ColorJitter(b, c, s, h): the four adjustments in a random order."""
    b, c, s, h = cfg.jitter
    factors = (
        rng.uniform(max(0.0, 1 - b), 1 + b),
        rng.uniform(max(0.0, 1 - c), 1 + c),
        rng.uniform(max(0.0, 1 - s), 1 + s),
        rng.uniform(-h, h),
    )
    ops = (brightness, contrast, saturation, hue)
    for i in rng.permutation(4):
        x = ops[i](x, float(factors[i]))
    return x


def strong_view(
    image: torch.Tensor,
    cfg: Any,
    rng: np.random.Generator,
    ops_log: list | None = None,
    out: np.ndarray | None = None,
) -> torch.Tensor:
    """One strong view of a uint8 (3, H, W) crop -> uint8 (3, H, W).

    ColorJitter (p = jitter_p), grayscale (p = grayscale_p), Gaussian blur (p = blur_p), then
    n ~ U{1..strong_ops_max} random ops drawn with replacement. ``ops_log`` (optional) collects
    the names of what was applied (for tests and debugging); ``out`` (optional) a uint8 array
    to write the view into.
    """
    log = ops_log if ops_log is not None else []
    x = image.numpy().astype(F32)
    if rng.random() < cfg.jitter_p:
        x = _color_jitter(x, cfg, rng)
        log.append("color_jitter")
    if rng.random() < cfg.grayscale_p:
        x = _gray(x)[None]  # one channel from here on (grayscale(x) with the copies left out)
        log.append("random_grayscale")
    if rng.random() < cfg.blur_p:
        x = gaussian_blur(x, float(rng.uniform(*cfg.blur_sigma)))
        log.append("random_blur")
    n_ops = int(rng.integers(1, cfg.strong_ops_max + 1))
    for index in rng.integers(0, len(RANDOM_OPS), size=n_ops):
        name, draw, apply = RANDOM_OPS[index]
        x = apply(x, draw(cfg, rng))
        log.append(name)
    if out is None:
        out = np.empty(tuple(image.shape), dtype=np.uint8)
    # exact: integers in [0, 255]; a grey view's one channel is broadcast to three
    np.copyto(out, _clip(np.rint(x, out=x)), casting="unsafe")
    return torch.from_numpy(out)


def cutmix_box_params(size: int, cfg: Any, rng: np.random.Generator) -> np.ndarray:
    """A CutMix box as int32 (top, left, height, width); all zero (no box) with probability
    1 - cutmix_p.

    As the reference: area ~ U[cutmix_area] of the crop, aspect ~ U[a, 1/a], width and height
    floored to integers, position redrawn until the box lies inside the crop.
    """
    if rng.random() > cfg.cutmix_p:
        return np.zeros(4, dtype=np.int32)
    area = rng.uniform(*cfg.cutmix_area) * size * size
    while True:
        aspect = rng.uniform(cfg.cutmix_aspect, 1 / cfg.cutmix_aspect)
        box_w, box_h = int(math.sqrt(area / aspect)), int(math.sqrt(area * aspect))
        x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
        if x + box_w <= size and y + box_h <= size:
            return np.array([y, x, box_h, box_w], dtype=np.int32)


def boxes_from_params(params: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 4) (top, left, height, width) -> (B, size, size) uint8 masks, 1 inside the box."""
    span = torch.arange(size, device=params.device)
    top, left, height, width = (params[:, i, None] for i in range(4))  # each (B, 1)
    rows = (span >= top) & (span < top + height)  # (B, size)
    cols = (span >= left) & (span < left + width)
    return (rows[:, :, None] & cols[:, None, :]).to(torch.uint8)


def cutmix_box(size: int, cfg: Any, rng: np.random.Generator) -> torch.Tensor:
    """A (size, size) uint8 box mask (1 inside), or all zero with probability 1 - cutmix_p."""
    params = torch.from_numpy(cutmix_box_params(size, cfg, rng))[None]
    return boxes_from_params(params, size)[0]


def valid_extent(geo: dict[str, int | bool], crop: int) -> np.ndarray:
    """int32 (rows, cols, flip): the crop's non-padding region is [0, rows) x [0, cols),
    mirrored left-right if flip. Three numbers instead of a (crop, crop) ignore mask."""
    rows = min(crop, geo["out_h"] - geo["top"])
    cols = min(crop, geo["out_w"] - geo["left"])
    return np.array([rows, cols, int(geo["flip"])], dtype=np.int32)


def ignore_from_extent(extent: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, 3) valid extents -> (B, crop, crop) uint8 ignore masks: 255 on padding, else 0."""
    span = torch.arange(crop, device=extent.device)
    rows, cols, flip = (extent[:, i, None] for i in range(3))  # each (B, 1)
    valid = (span < rows)[:, :, None] & (span < cols)[:, None, :]  # (B, crop, crop)
    valid = torch.where(flip[:, :, None].bool(), valid.flip(-1), valid)
    return (~valid).to(torch.uint8) * IGNORE_INDEX


# ----------------------------------------------------------------------------- samples


def augment_labeled(
    image: torch.Tensor,
    mask: torch.Tensor,
    cfg: Any,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled sample: geometric only. (3, H, W), (H, W) uint8 -> (3, S, S), (S, S); pad 255.
    ``out`` (optional): a (3, S, S) uint8 array to write the image into."""
    _, h, w = image.shape
    if mask.shape != (h, w):
        raise ValueError(f"mask {tuple(mask.shape)} does not match image {(h, w)}")
    geo = sample_geometry(h, w, cfg.crop_size, cfg, rng)
    return apply_geometry(image, mask, geo, cfg.crop_size, IGNORE_INDEX, out)


def unlabeled_views(
    image: torch.Tensor, cfg: Any, rng: np.random.Generator, out: dict | None = None
) -> dict[str, Any]:
    """Unlabeled sample, compact: weak / strong1 / strong2 (3, S, S) uint8, the valid extent
    (3,) and two box parameter vectors (4,) — what the pipeline ships between processes (the
    masks are rebuilt by the consumer: a quarter less data). ``out`` (optional): uint8 arrays
    "weak", "strong1", "strong2" to write the views into."""
    _, h, w = image.shape
    crop = cfg.crop_size
    out = out or {}
    geo = sample_geometry(h, w, crop, cfg, rng)
    weak, _ = apply_geometry(image, None, geo, crop, UNLABELED_PAD, out.get("weak"))
    strong1 = strong_view(weak, cfg, rng, out=out.get("strong1"))
    box1 = cutmix_box_params(crop, cfg, rng)
    strong2 = strong_view(weak, cfg, rng, out=out.get("strong2"))
    box2 = cutmix_box_params(crop, cfg, rng)
    return {
        "weak": weak,
        "strong1": strong1,
        "strong2": strong2,
        "extent": valid_extent(geo, crop),
        "box1": box1,
        "box2": box2,
    }


def augment_unlabeled(
    image: torch.Tensor, cfg: Any, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Unlabeled sample -> weak view, two strong views, ignore mask and two CutMix boxes.

    weak/strong1/strong2: (3, S, S) uint8; ignore: (S, S) uint8, 255 on padding else 0;
    box1/box2: (S, S) uint8, 1 inside the box.
    """
    views = unlabeled_views(image, cfg, rng)
    crop = cfg.crop_size
    return {
        "weak": views["weak"],
        "strong1": views["strong1"],
        "strong2": views["strong2"],
        "ignore": ignore_from_extent(torch.from_numpy(views["extent"])[None], crop)[0],
        "box1": boxes_from_params(torch.from_numpy(views["box1"])[None], crop)[0],
        "box2": boxes_from_params(torch.from_numpy(views["box2"])[None], crop)[0],
    }
