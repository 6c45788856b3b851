"""Which pseudo-labelled pixels count in the unlabeled losses (METHOD.md step 6).

``select(logits, cfg.dssn)`` returns a bool mask (B, H, W) for one of four rules:

- ``dssn``: class-aware (the reference): per image and class the threshold is
  ``ratio * m`` when the class's highest confidence ``m`` exceeds ``floor``, else ``m`` itself
  (and the test is strict, so then nothing passes);
- ``topk``: per image and class, the most confident ``topk_ratio`` of the pixels whose argmax
  is that class;
- ``threshold``: one global confidence threshold on the max softmax (UniMatch);
- ``none``: every pixel.

Selection never needs a gradient: everything here runs on detached logits.
"""

from __future__ import annotations

import torch

from dssn.config import DSSNConfig


def class_pass_count(logits: torch.Tensor, ratio: float, floor: float) -> torch.Tensor:
    """Per pixel, how many classes' DSSN thresholds it passes: (B, C, H, W) -> (B, H, W) int64.

    The reference's ``get_adaptive_binary_mask``: ``q = softmax(logits)``,
    ``m[b, c] = max_pixels q[b, c]``, ``t = where(m > floor, ratio * m, m)``, count ``q > t``.
    """
    q = logits.detach().float().softmax(dim=1)  # (B, C, H, W)
    peak = q.flatten(2).amax(dim=2)  # (B, C): each class's highest confidence in each image
    thresh = torch.where(peak > floor, peak * ratio, peak)[..., None, None]  # (B, C, 1, 1)
    return (q > thresh).sum(dim=1)


def select_dssn(logits: torch.Tensor, ratio: float, floor: float) -> torch.Tensor:
    """Class-aware selection: pixels passing at least one class's threshold. (B, H, W) bool."""
    return class_pass_count(logits, ratio, floor) > 0


def select_topk(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per image and class, the top ``ratio`` fraction (rounded, at least one pixel) of the
    pixels predicted as that class, ranked by confidence. (B, C, H, W) -> (B, H, W) bool."""
    batch, classes, height, width = logits.shape
    conf, label = logits.detach().float().softmax(dim=1).max(dim=1)  # (B, H, W) each
    conf, label = conf.flatten(1), label.flatten(1)  # (B, N)
    pixels = conf.shape[1]
    # order pixels by class, and within a class by descending confidence (two stable sorts)
    by_conf = conf.argsort(dim=1, descending=True, stable=True)  # (B, N)
    by_class = label.gather(1, by_conf).argsort(dim=1, stable=True)
    order = by_conf.gather(1, by_class)  # (B, N) pixel ids grouped by class
    grouped = label.gather(1, order)  # (B, N) class of each grouped position
    counts = torch.zeros(batch, classes, dtype=torch.long, device=logits.device)
    counts.scatter_add_(1, label, torch.ones_like(label))  # (B, C) pixels per predicted class
    starts = counts.cumsum(dim=1) - counts  # (B, C) first grouped position of each class
    position = torch.arange(pixels, device=logits.device).expand(batch, pixels)
    rank = position - starts.gather(1, grouped)  # (B, N) rank within its class, 0 = surest
    # round half up (floor(x + 1/2)) so that float error in ratio * n cannot add a pixel
    keep = torch.floor(counts.double() * ratio + 0.5).long().clamp_min(1)  # (B, C)
    kept = rank < keep.gather(1, grouped)  # (B, N) in grouped order
    selected = torch.zeros_like(kept).scatter_(1, order, kept)  # back to pixel order
    return selected.view(batch, height, width)


def select_threshold(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels whose max softmax exceeds one global ``threshold``. (B, H, W) bool."""
    return logits.detach().float().softmax(dim=1).amax(dim=1) > threshold


def select(logits: torch.Tensor, cfg: DSSNConfig) -> torch.Tensor:
    """Selected pixels of logits (B, C, H, W) under ``cfg.selection``: bool (B, H, W)."""
    if cfg.selection == "dssn":
        return select_dssn(logits, cfg.select_ratio, cfg.select_floor)
    if cfg.selection == "topk":
        return select_topk(logits, cfg.topk_ratio)
    if cfg.selection == "threshold":
        return select_threshold(logits, cfg.threshold)
    if cfg.selection == "none":
        batch, _, height, width = logits.shape
        return torch.ones(batch, height, width, dtype=torch.bool, device=logits.device)
    raise ValueError(
        f"dssn.selection is {cfg.selection!r}; expected one of dssn, topk, threshold, none"
    )
