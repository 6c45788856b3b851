"""Fused per-pixel loops for the costliest augmentation steps, compiled with numba.

Hue rotation, Gaussian blur, saturation and the bilinear crop window written as chains of
whole-image numpy/torch passes are bound by memory traffic (hue: ~25 passes over the crop;
blur: one pass per tap). These loops make one pass per image row with the row's working set
in cache. On a 321 x 321 crop: hue ~0.3-0.45 ms instead of 1.1-2.1 ms, blur 0.5-0.8 ms instead
of 1.5-2.7 ms, the upscaling crop window ~0.54 ms instead of 1.3 ms (README, "Data").

They compute what the whole-image code computed: hue, saturation and blur to ~1e-5 of a grey
level (the last bit, where torch or the compiler fuses a multiply-add the other does not), the
crop window within one grey level (where torch's vectorised lerp rounds the other way);
``_lerp`` is torch.lerp's formula. Compiled on first use (~2 s for all) and cached on disk
(``cache=True``: next to this file, or under ``NUMBA_CACHE_DIR``). A fresh process, a Ray worker included, loads them from there: 0.6-0.9 s
for the first one (numba starting LLVM), milliseconds for the rest.
``error_model="numpy"`` drops numba's division-by-zero check (a branch that keeps LLVM from
vectorising the hue loop, 2-3x slower; the divisor there is floored above zero anyway).
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit

_OPTIONS = {"nogil": True, "error_model": "numpy"}


def _kernel(function):
    """``njit`` with the on-disk cache, or without it (compiled again in every process, ~2 s)
    when numba finds no writable place for it: a read-only install with no writable home
    directory, as in some containers. Set ``NUMBA_CACHE_DIR`` to a writable directory there."""
    try:
        return njit(cache=True, **_OPTIONS)(function)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        warnings.warn(
            f"dssn.data.kernels: {error}; compiling {function.__name__} in every process "
            "(~2 s each) - set NUMBA_CACHE_DIR to a writable directory to cache it",
            RuntimeWarning,
            stacklevel=2,
        )
        return njit(**_OPTIONS)(function)


_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_TWO = np.float32(2.0)
_FOUR = np.float32(4.0)


@njit(inline="always")
def _lerp(start, end, weight):
    """torch.lerp's formula (the exact float32 result torch gives)."""
    if weight < _HALF:
        return start + weight * (end - start)
    return end - (end - start) * (_ONE - weight)


@_kernel
def hue_rotate(x, offset, profiles, levels, min_chroma):
    """Rotate each pixel's HSV hue of an RGB float32 image (3, H, W) in place.

    Per pixel: V = max, m = min, C = V - m; the hue in sextants times C is g - b (red is the
    max), b - r + 2 C (green), r - g + 4 C (blue), ties going to red, then green. In
    ``levels`` per sextant plus ``offset`` (the shift, and 6 sextants to stay positive) it
    indexes the channel profiles P_n (``profiles``, (3, N)), and channel n becomes
    lerp(V, m, P_n) as torch.lerp computes it. C is floored at ``min_chroma`` so that a grey
    pixel gets a finite hue (and keeps V - C * P, within C of its value).
    """
    _, h, w = x.shape
    last = profiles.shape[1] - 1
    top = np.empty(w, np.float32)
    bottom = np.empty(w, np.float32)
    index = np.empty(w, np.int32)
    for i in range(h):
        r, g, b = x[0, i], x[1, i], x[2, i]
        # first loop: value, min and the profile index (branch-free, vectorised)
        for j in range(w):
            rv, gv, bv = r[j], g[j], b[j]
            vmax = max(max(rv, gv), bv)
            vmin = min(min(rv, gv), bv)
            chroma = vmax - vmin
            scale = levels / max(chroma, min_chroma)
            red = gv - bv
            green = (bv - rv) + _TWO * chroma
            blue = (rv - gv) + _FOUR * chroma
            sextants = red if vmax == rv else (green if vmax == gv else blue)
            # > 0, so truncation is floor; clamped so no finite input reads outside the table
            index[j] = min(max(np.int32(sextants * scale + offset), 0), last)
            top[j] = vmax
            bottom[j] = vmin
        # second loop, per channel: look up the profile and interpolate
        for n in range(3):
            profile = profiles[n]
            out = x[n, i]
            for j in range(w):
                out[j] = _lerp(top[j], bottom[j], profile[index[j]])
    return x


@_kernel
def blur_separable(x, weights, radius):
    """Blur a float32 image (C, H, W) in place with the separable kernel ``weights``
    (2 radius + 1 taps), reflect-padded (edge pixel not repeated, as torch's "reflect").

    Horizontal pass row by row through a reflect-padded copy of the row into a scratch image,
    then the vertical pass reads the scratch rows (reflected at the top and bottom) into x:
    padding and the horizontal pass commute, so this equals pad-then-convolve.
    """
    channels, h, w = x.shape
    taps = 2 * radius + 1
    row_padded = np.empty(w + 2 * radius, np.float32)
    across = np.empty((h, w), np.float32)
    for c in range(channels):
        for i in range(h):
            row = x[c, i]
            for j in range(w):
                row_padded[radius + j] = row[j]
            for j in range(1, radius + 1):
                row_padded[radius - j] = row[j]
                row_padded[radius + w - 1 + j] = row[w - 1 - j]
            acc = across[i]
            first = weights[0]
            for j in range(w):
                acc[j] = first * row_padded[j]
            for k in range(1, taps):
                weight = weights[k]
                for j in range(w):
                    acc[j] += weight * row_padded[j + k]
        for i in range(h):
            out = x[c, i]
            for k in range(taps):
                src = i + k - radius
                if src < 0:
                    src = -src
                elif src >= h:
                    src = 2 * (h - 1) - src
                weight = weights[k]
                source = across[src]
                if k == 0:
                    for j in range(w):
                        out[j] = weight * source[j]
                else:
                    for j in range(w):
                        out[j] += weight * source[j]
    return x


@_kernel
def saturate(x, factor, weights):
    """Blend an RGB float32 image (3, H, W) in place with its grey level:
    lerp(grey, x, factor) as ``torch.lerp(x, grey, 1 - factor)``, grey = the ``weights``
    (r, g, b) luma of each pixel."""
    _, h, w = x.shape
    wr, wg, wb = weights[0], weights[1], weights[2]
    toward = _ONE - factor
    for i in range(h):
        r, g, b = x[0, i], x[1, i], x[2, i]
        for j in range(w):
            grey = r[j] * wr + g[j] * wg + b[j] * wb
            r[j] = _lerp(r[j], grey, toward)
            g[j] = _lerp(g[j], grey, toward)
            b[j] = _lerp(b[j], grey, toward)
    return x


@_kernel
def bilinear_window(image, y0, y1, wy, x0, x1, wx):
    """Bilinear samples of a uint8 image (H, W, C) -> float32 (C, rows, cols), rounded to
    whole numbers: output (i, j) interpolates source rows y0[i], y1[i] (weight wy[i] on y1)
    and columns x0[j], x1[j] (weight wx[j] on x1), with torch.lerp's formula. Reading the
    columns in reverse order mirrors the window.

    Across first, once per source row in use (upscaling repeats rows: ``y0``, ``y1`` are
    non-decreasing), then down, a contiguous pass per output row.
    """
    channels = image.shape[2]
    rows, cols = y0.shape[0], x0.shape[0]
    first = y0[0]
    across = np.empty((y1[rows - 1] - first + 1, channels, cols), np.float32)
    for r in range(across.shape[0]):
        line = image[first + r]
        for j in range(cols):
            left, right, weight = x0[j], x1[j], wx[j]
            for c in range(channels):
                across[r, c, j] = _lerp(
                    np.float32(line[left, c]), np.float32(line[right, c]), weight
                )
    out = np.empty((channels, rows, cols), np.float32)
    for i in range(rows):
        upper, lower, weight = across[y0[i] - first], across[y1[i] - first], wy[i]
        for c in range(channels):
            dst, a, b = out[c, i], upper[c], lower[c]
            for j in range(cols):
                dst[j] = np.rint(_lerp(a[j], b[j], weight))
    return out
