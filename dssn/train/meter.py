"""Running sums of the step's metric tensors, kept on the device and synced only when read.

The step returns 0-dim detached tensors; adding them is asynchronous on a GPU. The host waits
only at a log line (:meth:`MetricMeter.window_means`) and at the end of the epoch
(:meth:`MetricMeter.epoch_means`, which also averages over workers with one all-reduce).
Metrics with a shape (the per-class pixel counts) are summed apart: the window's sums are read
with :meth:`MetricMeter.window_sums_of_vectors` (rank 0's board); the means leave them out.
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

    def window_means(self) -> dict[str, float]:
        """Means over the steps since the last :meth:`reset_window` (one host sync)."""
        if not self.window_sums:
            return {}
        keys = list(self.window_sums)
        values = torch.stack([self.window_sums[k] for k in keys]).div(self.window_steps)
        return dict(zip(keys, values.tolist(), strict=True))

    def window_sums_of_vectors(self) -> dict[str, list[float]]:
        """Sums of the shaped metrics (per-class counts) since the last :meth:`reset_window`
        (one host sync)."""
        if not self.window_vectors:
            return {}
        keys = list(self.window_vectors)
        values = torch.stack([self.window_vectors[k] for k in keys]).tolist()
        return dict(zip(keys, values, strict=True))

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
