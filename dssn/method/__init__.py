"""The DSSN method: pseudo-label selection, losses, EMA teacher and the training step.

Pure PyTorch (no Ray, no data code)::

    from dssn.method import step, EMATeacher, select
    loss, metrics = step(student, teacher, batch, cfg, iteration=it, epoch=ep)
"""

from __future__ import annotations

from .ema import EMATeacher, unwrap
from .losses import (
    labeled_ce,
    normalized_mse,
    ohem_ce,
    pixel_infonce,
    pseudo_label_ce,
    standardize_logits,
)
from .selection import class_pass_count, select, select_dssn, select_threshold, select_topk
from .step import StepOutputs, cutmix, forward_networks, loss_block, skips_strong, step

__all__ = [
    "EMATeacher",
    "StepOutputs",
    "class_pass_count",
    "cutmix",
    "forward_networks",
    "labeled_ce",
    "loss_block",
    "normalized_mse",
    "ohem_ce",
    "pixel_infonce",
    "pseudo_label_ce",
    "select",
    "select_dssn",
    "select_threshold",
    "select_topk",
    "skips_strong",
    "standardize_logits",
    "step",
    "unwrap",
]
