"""Training on Ray Train: the per-worker loop, the launcher, evaluation and checkpoints.

    from dssn.train import fit
    result = fit(cfg)          # ray.train.Result

``fit`` and ``train_loop_per_worker`` are imported lazily so that importing this package (for
evaluation or checkpoints) does not import Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fit", "train_loop_per_worker"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from dssn.train.launcher import fit

        return fit
    if name == "train_loop_per_worker":
        from dssn.train.loop import train_loop_per_worker

        return train_loop_per_worker
    raise AttributeError(f"module 'dssn.train' has no attribute {name!r}")
