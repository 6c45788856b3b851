"""Running sums of the step's metric tensors, kept on the device and synced only when read.

The step returns 0-dim detached tensors; adding them is asynchronous on a GPU. The host waits
only at a log line (:meth:`MetricMeter.window`) and at the end of the epoch
(:meth:`MetricMeter.epoch_means`); each of them sums over the workers with one all-reduce, so a
log line describes the global batch, as the epoch's figures do. Metrics with a shape (the
per-class pixel counts) are summed apart: the window returns their sums beside the means.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# batch keys whose rows are training images: labeled, unlabeled, and the CutMix partner batch
IMAGE_KEYS = ("image_x", "image_u_w", "image_mix_w")


def image_count(batch: dict[str, torch.Tensor]) -> int:
    """Training images in one batch (labeled + unlabeled + CutMix partner rows)."""
    return sum(int(batch[k].shape[0]) for k in IMAGE_KEYS if k in batch)


class MetricMeter:
    """Per-epoch and per-log-window sums of metric tensors."""

    def __init__(self, device: torch.device):
        self.device = device
        self.epoch_sums: dict[str, torch.Tensor] = {}
        self.window_sums: dict[str, torch.Tensor] = {}
        self.window_vectors: dict[str, torch.Tensor] = {}
        self.epoch_steps = 0
        self.window_steps = 0
        self.total_images = 0
        self.window_images = 0

    def add(self, metrics: dict[str, torch.Tensor], loss: torch.Tensor, images: int) -> None:
        """One finished step: its loss and metrics (0-dim tensors, or (C,) counts),
        ``images`` trained on."""
        values = {"loss": loss.detach(), **metrics}
        for key, value in values.items():
            value = value.detach().float()
            # per-class counts: the window's only
            targets = (self.window_vectors,) if value.dim() else (self.epoch_sums, self.window_sums)
            for sums in targets:
                sums[key] = sums[key] + value if key in sums else value.clone()
        self.epoch_steps += 1
        self.window_steps += 1
        self.skip(images)

    def skip(self, images: int) -> None:
        """Count the images of a step whose update was skipped (they still took time)."""
        self.total_images += images
        self.window_images += images

    def window(self, world_size: int = 1) -> tuple[dict[str, float], dict[str, list[float]], int]:
        """The log window of every worker: the scalar metrics' means over all workers' steps
        since the last :meth:`reset_window`, the per-class counts' sums, and the images trained
        on. One host sync; when distributed, one all-reduce, which every worker must join at
        the same step (the loop's log steps are the same on every worker)."""
        scalars, vectors = list(self.window_sums), list(self.window_vectors)
        flat = torch.cat(
            [self.window_sums[k].reshape(1) for k in scalars]
            + [self.window_vectors[k].reshape(-1) for k in vectors]
            + [torch.tensor([self.window_steps, self.window_images], device=self.device)]
        ).float()
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        *values, steps, images = flat.tolist()
        means = {k: v / steps for k, v in zip(scalars, values, strict=False)} if steps else {}
        counts, at = {}, len(scalars)
        for k in vectors:
            width = self.window_vectors[k].numel()
            counts[k], at = values[at : at + width], at + width
        return means, counts, int(images)

    def reset_window(self) -> None:
        self.window_sums, self.window_steps, self.window_images = {}, 0, 0
        self.window_vectors = {}

    def epoch_means(self, world_size: int) -> dict[str, float]:
        """Means over the epoch's steps of every worker (a collective when distributed)."""
        keys = sorted(self.epoch_sums)
        stacked = torch.stack(
            [self.epoch_sums[k] for k in keys]
            + [torch.tensor(float(self.epoch_steps), device=self.device)]
        )
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        *sums, steps = stacked.tolist()
        return {k: s / steps for k, s in zip(keys, sums, strict=True)} if steps else {}
