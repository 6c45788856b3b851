"""Segmentation metrics: a confusion matrix, per-class IoU and mIoU, all-reduced across workers.

The confusion matrix is the one source: every worker accumulates its own over its share of the
validation set, one ``all_reduce`` sums them, and IoU is read off the sum (torchvision's
``references/segmentation`` does the same).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dssn.config import IGNORE_INDEX


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Counts of (true class, predicted class) over pixels whose target is not ignored.

    pred, target: integer tensors of the same shape (any, e.g. (B, H, W)).
    Returns an int64 (num_classes, num_classes) matrix, rows = target, columns = prediction.
    Target values other than ``ignore_index`` must lie in [0, num_classes).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = int(target[(target < 0) | (target >= num_classes)][0])
        raise ValueError(
            f"mask holds class {bad}, outside [0, {num_classes}) and not ignore ({ignore_index}):"
            " does model.num_classes match the dataset?"
        )
    # one bincount over flattened (row, col) pairs: (C*C,) -> (C, C)
    index = target * num_classes + pred
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def all_reduce_confusion(matrix: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over all workers when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        matrix = matrix.clone()
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return matrix


def iou_per_class(matrix: torch.Tensor) -> list[float]:
    """IoU of each class from a confusion matrix; NaN for a class absent from both the target
    and the prediction (its union is empty, so it has no IoU)."""
    matrix = matrix.double()
    intersection = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - intersection
    iou = intersection / union  # 0/0 -> nan for classes never seen nor predicted
    return [float(v) for v in iou]


def mean_iou(ious: list[float]) -> float:
    """Mean over classes that have an IoU (NaN classes left out); NaN if none has."""
    valid = [v for v in ious if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else float("nan")


def pixel_accuracy(matrix: torch.Tensor) -> float:
    """Fraction of non-ignored pixels predicted correctly."""
    total = int(matrix.sum())
    return float(matrix.diag().sum()) / total if total else float("nan")
