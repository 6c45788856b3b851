"""Test-only fault injection: kill one worker once, or make one loss NaN.

``train.fail_at_iter``: at that global iteration, rank 1 (rank 0 when there is one worker)
SIGKILLs its own process, as a crashed node would. "Once" has to survive the restart that Ray
Train performs, so a marker file is written into the run's storage directory just before dying;
the resumed run sees it and goes on.

``train.nan_at_iter``: the loss of that global iteration is replaced by NaN on every worker, to
exercise ``train.nan_policy``.
"""

from __future__ import annotations

import os
import signal
import sys

import pyarrow.fs as pafs
import torch

from dssn.config import Config

MARKER = ".fault_injected_at_iter_{}"


class FaultInjector:
    """Decides, per global iteration, whether this worker dies or this loss turns NaN."""

    def __init__(self, cfg: Config, rank: int, world_size: int, storage=None):
        """storage: Ray Train's StorageContext (``ray.train.get_context().get_storage()``)."""
        self.fail_at = cfg.train.fail_at_iter
        self.nan_at = cfg.train.nan_at_iter
        self.victim = rank == (1 if world_size > 1 else 0)
        self.storage = storage

    def _marker(self) -> tuple[pafs.FileSystem, str]:
        fs = self.storage.storage_filesystem
        return fs, f"{self.storage.experiment_fs_path}/{MARKER.format(self.fail_at)}"

    def maybe_die(self, iteration: int) -> None:
        """SIGKILL this process at ``fail_at_iter`` unless it already happened in this run."""
        if self.fail_at is None or iteration != self.fail_at or not self.victim:
            return
        if self.storage is None:
            raise RuntimeError("train.fail_at_iter needs a Ray Train storage context")
        fs, path = self._marker()
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            return  # died here once already: this is the resumed run
        with fs.open_output_stream(path) as f:
            f.write(f"killed rank at iteration {iteration}\n".encode())
        sys.stdout.write(f"[fault injection] SIGKILL self (pid {os.getpid()}) at {iteration}\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def maybe_nan(self, loss: torch.Tensor, iteration: int) -> torch.Tensor:
        """The loss, or NaN (keeping the graph, so backward still runs) at ``nan_at_iter``."""
        if self.nan_at is not None and iteration == self.nan_at:
            return loss * float("nan")
        return loss
