"""Optimizer with backbone / head learning-rate groups, and the poly learning-rate decay.

Reference (METHOD.md step 8): SGD, momentum 0.9, weight decay 1e-4; the backbone at ``lr``, all
other parameters at ``lr · lr_multi``; after the step with (0-based) index ``it`` every group's
rate becomes ``base · (1 − it / total_iters) ^ power``.
"""

from __future__ import annotations

import torch
from torch import nn

from dssn.config import OptimConfig

BACKBONE, HEAD = 0, 1  # param group order


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (reference) or AdamW over two groups: backbone (``lr``) and head (``lr·lr_multi``).

    ``model`` is the unwrapped network (not DDP); it provides ``backbone_parameters()`` and
    ``head_parameters()``. Each group remembers its base rate as ``initial_lr``.
    """
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr},
        {"params": list(model.head_parameters()), "lr": cfg.lr * cfg.lr_multi},
    ]
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    n_total = sum(p.numel() for p in model.parameters())
    if n_grouped != n_total:
        raise ValueError(
            f"backbone_parameters() + head_parameters() cover {n_grouped} of the model's "
            f"{n_total} parameters: every parameter must be in exactly one group"
        )
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.optimizer: unknown optimizer {cfg.optimizer!r} (sgd | adamw)")


def poly_factor(iteration: int, total_iters: int, power: float) -> float:
    """(1 − iteration / total_iters) ^ power, clamped at 0 past the end."""
    return max(0.0, 1.0 - iteration / total_iters) ** power


def set_poly_lr(
    optimizer: torch.optim.Optimizer, iteration: int, total_iters: int, power: float
) -> float:
    """Set every group's rate for the step after ``iteration`` (0-based index of the step just
    taken, as the reference computes it); return the backbone rate."""
    factor = poly_factor(iteration, total_iters, power)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[BACKBONE]["lr"]
