"""Evaluation of segmentation models: inference modes and per-class IoU over a validation set.

Modes (as the reference UniMatch/DSSN ``evaluate``):
- ``original``: the whole image in one forward pass.
- ``center_crop``: the central ``crop``×``crop`` window of image and mask.
- ``sliding_window``: windows of ``crop`` pixels at a stride of ``int(crop · eval_stride)``
  (2/3 in the reference), starting at 0 and stepping while the start is inside the image, so the
  last windows are clipped at the border; the softmax of every window is summed into the full
  image and the argmax taken.

Several models (student and teacher) are evaluated in one pass over the data. Each worker
evaluates its own share of the rows; the confusion matrices are all-reduced before IoU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from dssn.config import Config
from dssn.train.metrics import (
    all_reduce_confusion,
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)


@dataclass
class EvalResult:
    """One model's evaluation: the summed confusion matrix and what follows from it."""

    confusion: torch.Tensor  # (C, C) int64, rows = target, columns = prediction
    iou: list[float]  # per class; NaN where the class is neither present nor predicted
    miou: float
    accuracy: float
    images: int  # images evaluated, over all workers


def normalize(image: torch.Tensor, cfg: Config, device: torch.device) -> torch.Tensor:
    """uint8 image (3, H, W) -> normalized float (1, 3, H, W) on ``device``."""
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
    x = image.to(device=device, non_blocking=True).unsqueeze(0).float().div_(255.0)
    x = (x - mean) / std
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def center_crop(
    image: torch.Tensor, mask: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Central ``size``×``size`` window of image (..., H, W) and mask (..., H, W); a side
    shorter than ``size`` is kept whole."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    image = image[..., top : top + size, left : left + size]
    if mask is not None:
        mask = mask[..., top : top + size, left : left + size]
    return image, mask


def window_starts(length: int, stride: int) -> list[int]:
    """Window start offsets along one side: 0, stride, 2·stride, … while inside the side."""
    if stride <= 0:
        raise ValueError(f"sliding window stride must be positive, got {stride}")
    return list(range(0, length, stride))


def sliding_window_scores(
    model: nn.Module, image: torch.Tensor, window: int, stride: int
) -> torch.Tensor:
    """Softmax of every window summed into the full image: (B, 3, H, W) -> (B, C, H, W)."""
    _, _, h, w = image.shape
    scores: torch.Tensor | None = None
    for top in window_starts(h, stride):
        for left in window_starts(w, stride):
            patch = image[:, :, top : top + window, left : left + window]
            prob = model(patch).float().softmax(dim=1)  # (B, C, h', w')
            if scores is None:
                scores = image.new_zeros((image.shape[0], prob.shape[1], h, w), dtype=prob.dtype)
            scores[:, :, top : top + window, left : left + window] += prob
    assert scores is not None  # h, w > 0, so at least one window ran
    return scores


def window_coverage(h: int, w: int, window: int, stride: int, device) -> torch.Tensor:
    """(H, W): how many sliding windows cover each pixel."""
    count = torch.zeros(h, w, device=device)
    for top in window_starts(h, stride):
        for left in window_starts(w, stride):
            count[top : top + window, left : left + window] += 1
    return count


def class_probabilities(
    model: nn.Module, image: torch.Tensor, mode: str, crop: int, stride_ratio: float
) -> torch.Tensor:
    """(B, C, H, W) class probabilities of each pixel: the softmax (``original``), or the mean
    of the softmax over the windows covering the pixel (``sliding_window``), so that scales
    and flips weigh alike when :func:`segment` adds them."""
    if mode == "sliding_window":
        stride = int(crop * stride_ratio)
        scores = sliding_window_scores(model, image, crop, stride)
        return scores / window_coverage(*image.shape[-2:], crop, stride, scores.device)
    return model(image).float().softmax(dim=1)


def segment(
    model: nn.Module,
    image: torch.Tensor,
    mode: str,
    crop: int,
    stride_ratio: float,
    mask: torch.Tensor | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted class ids for a normalized image (B, 3, H, W) under ``mode``.

    Returns (pred (B, H', W') long, mask cropped the same way or None); H', W' differ from
    H, W only for ``center_crop``.

    ``scales`` / ``flip``: test-time augmentation (``data.eval_scales``, ``data.eval_flip``).
    The image (after a ``center_crop``) is resized by each scale (bilinear), and also
    mirrored left-right with ``flip``; each pass's class probabilities (:func:`class_
    probabilities`; a sliding window keeps its window size at every scale) are mirrored back,
    resized to the image and added, and the argmax taken. With ``(1.0,)`` and no flip this
    is the reference's single pass.
    """
    if mode == "center_crop":
        image, mask = center_crop(image, mask, crop)
    elif mode not in ("original", "sliding_window"):
        raise ValueError(f"unknown eval mode {mode!r}: expected original, center_crop, ...")
    if tuple(scales) == (1.0,) and not flip:  # the reference's single pass
        if mode == "sliding_window":
            stride = int(crop * stride_ratio)
            return sliding_window_scores(model, image, crop, stride).argmax(dim=1), mask
        return model(image).argmax(dim=1), mask
    mode = "original" if mode == "center_crop" else mode
    h, w = image.shape[-2:]
    total: torch.Tensor | None = None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        resized = image if size == (h, w) else resize(image, size, "bilinear")
        for mirrored in (False, True) if flip else (False,):
            x = resized.flip(-1) if mirrored else resized
            probs = class_probabilities(model, x, mode, crop, stride_ratio)
            probs = probs.flip(-1) if mirrored else probs
            probs = probs if size == (h, w) else resize(probs, (h, w), "bilinear")
            total = probs if total is None else total + probs
    assert total is not None  # scales is not empty (validated with the config)
    return total.argmax(dim=1), mask


def resize(x: torch.Tensor, size: tuple[int, int], how: str) -> torch.Tensor:
    return nn.functional.interpolate(x, size=size, mode=how, align_corners=False)


@contextmanager
def eval_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Put models in eval mode and restore each one's previous mode afterwards (the teacher
    trains in train mode, as the reference does, and must go back to it)."""
    models = list(models)
    previous = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was_training in zip(models, previous, strict=True):
            m.train(was_training)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 kernels
    are faster than float32 there, and emulated (slower) elsewhere."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    """``train.amp`` ``bf16`` on CUDA or on a CPU with native bf16; ``fp16`` on CUDA only (on
    a CPU float16 is emulated: slower than float32)."""
    if cfg.train.amp == "bf16":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return cfg.train.amp == "fp16" and device.type == "cuda"


def amp_fallback_note(cfg: Config, device: torch.device) -> str | None:
    """Why ``train.amp`` does not apply on ``device`` (the run computes in float32), or None."""
    if cfg.train.amp == "none" or amp_enabled(cfg, device):
        return None
    if cfg.train.amp == "bf16":
        return "train.amp=bf16: this CPU has no native bf16 (AVX512-BF16/AMX); float32"
    return f"train.amp=fp16 applies on CUDA only; float32 on {device.type}"


def autocast_for(cfg: Config, device: torch.device):
    """bf16 / fp16 autocast where :func:`amp_enabled`; a no-op elsewhere. The weights, the
    optimizer, the EMA and the loss block stay float32."""
    if amp_enabled(cfg, device):
        return torch.autocast(device.type, dtype=AMP_DTYPES[cfg.train.amp])
    return nullcontext()


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module],
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    device: torch.device,
    mode: str | None = None,
    per_image: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, EvalResult]:
    """Evaluate each named model over ``samples`` in one pass.

    samples: (image uint8 (3, H, W), mask uint8/long (H, W)) pairs, this worker's share.
    mode: ``original`` | ``center_crop`` | ``sliding_window``; default ``cfg.data.eval_mode``;
    the window is ``cfg.data.eval_crop`` (default ``cfg.data.crop_size``).
    Confusion matrices are summed over workers when torch.distributed is initialised, so every
    worker must call this (with its own shard) and gets the same result.
    per_image: called after each sample with its confusion matrix of each model (name ->
    (C, C)), e.g. for per-image scores (``dssn eval``).
    """
    mode = mode or cfg.data.eval_mode
    crop = cfg.data.eval_crop or cfg.data.crop_size
    num_classes = cfg.model.num_classes
    confusion = {
        name: torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        for name in models
    }
    images = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(models.values()), autocast_for(cfg, device):
        for image, mask in samples:
            x = normalize(image, cfg, device)
            target = mask.to(device).long().unsqueeze(0)  # (1, H, W)
            this = {}
            for name, model in models.items():
                pred, cropped = segment(
                    model, x, mode, crop, cfg.data.eval_stride, target,
                    scales=cfg.data.eval_scales, flip=cfg.data.eval_flip,
                )  # fmt: skip
                this[name] = confusion_matrix(pred, cropped, num_classes)
                confusion[name] += this[name]
            if per_image is not None:
                per_image(this)
            images += 1
    images = int(all_reduce_confusion(images))
    out = {}
    for name, matrix in confusion.items():
        matrix = all_reduce_confusion(matrix).cpu()
        ious = iou_per_class(matrix)
        out[name] = EvalResult(matrix, ious, mean_iou(ious), pixel_accuracy(matrix), images)
    return out
