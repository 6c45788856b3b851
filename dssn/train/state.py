"""The training run's bookkeeping and its round trip through a checkpoint directory.

:class:`TrainState` is what ``state.json`` holds besides the config: position (epoch, iteration),
the best evaluation so far, the last evaluation, counters. :func:`save_run` writes a full
checkpoint (networks, optimizer, RNG of every worker); :func:`restore_run` puts it all back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dssn.config import Config
from dssn.train import checkpoint as ckpt
from dssn.train.setup import Networks


@dataclass
class TrainState:
    """Position and results of a run; everything here goes into ``state.json``."""

    epoch: int = 0  # completed epochs
    iteration: int = 0  # completed optimizer steps (global, same on every worker)
    best_teacher_miou: float = float("nan")
    best_student_miou: float = float("nan")
    best_epoch: int = 0  # epoch (1-based) of best_teacher_miou
    best_teacher_iou: list[float] = field(default_factory=list)
    teacher_miou: float = float("nan")  # the last evaluation
    student_miou: float = float("nan")
    teacher_iou: list[float] = field(default_factory=list)
    student_iou: list[float] = field(default_factory=list)
    evaluated_epoch: int = 0
    nan_skipped: int = 0  # steps skipped for a non-finite loss (nan_policy: skip)
    overflow_skipped: int = 0  # fp16 steps the GradScaler skipped (gradients overflowed)
    grad_scaler: dict[str, Any] = field(default_factory=dict)  # its state (train.amp=fp16)
    restarts: int = 0  # times the run was resumed from a checkpoint
    ema_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # dssn.train.history records

    def record_eval(
        self,
        epoch: int,
        teacher_iou: list[float],
        student_iou: list[float],
        teacher_miou: float,
        student_miou: float,
    ) -> bool:
        """Store an evaluation of (1-based) ``epoch``; return True if the teacher is the best."""
        self.teacher_iou, self.student_iou = list(teacher_iou), list(student_iou)
        self.teacher_miou, self.student_miou = teacher_miou, student_miou
        self.evaluated_epoch = epoch
        if not math.isnan(student_miou) and not student_miou <= self.best_student_miou:
            self.best_student_miou = student_miou
        if math.isnan(teacher_miou) or teacher_miou <= self.best_teacher_miou:
            return False
        self.best_teacher_miou, self.best_epoch = teacher_miou, epoch
        self.best_teacher_iou = list(teacher_iou)
        return True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def gather_rng(world_size: int) -> list[dict[str, Any]]:
    """Every worker's RNG state, indexed by rank (a collective: all workers must call it)."""
    mine = ckpt.capture_rng()
    if world_size == 1 or not dist.is_initialized():
        return [mine]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def save_run(
    directory: str | Path,
    nets: Networks,
    state: TrainState,
    cfg: Config,
    rng: list[dict[str, Any]],
    dataset: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the full training checkpoint of a run (rank 0 calls this)."""
    state.ema_updates = ema_update_count(nets)
    state.grad_scaler = nets.scaler.state_dict() if nets.scaler.is_enabled() else {}
    payload = {
        **state.to_dict(),
        "world_size": len(rng),
        "config": cfg.to_dict(),
        "dataset": dataset,
        "metrics": metrics,
    }
    return ckpt.save_checkpoint(
        directory,
        student=nets.module,
        teacher=nets.teacher,
        optimizer=nets.optimizer,
        state=payload,
        rng=rng,
    )


def restore_run(
    directory: str | Path, nets: Networks, cfg: Config, rank: int, world_size: int
) -> TrainState:
    """Load a checkpoint written by :func:`save_run` into ``nets``; return its TrainState.

    The networks must be those of ``cfg``: a checkpoint of another architecture raises
    :class:`~dssn.train.checkpoint.CheckpointError` naming both.
    """
    directory = Path(directory)
    saved = ckpt.read_state(directory)
    ckpt.load_model_weights(nets.module, directory, ckpt.MODEL, model_cfg=cfg)
    ckpt.load_model_weights(nets.teacher, directory, ckpt.TEACHER, model_cfg=cfg)
    nets.optimizer.load_state_dict(ckpt.load_file(directory / ckpt.OPTIMIZER))
    state = TrainState.from_dict(saved)
    set_ema_update_count(nets, state.ema_updates)
    if nets.scaler.is_enabled() and state.grad_scaler:
        nets.scaler.load_state_dict(state.grad_scaler)  # the loss scale it had reached
    rng_path = directory / ckpt.RNG
    if rng_path.is_file():
        rng = ckpt.load_file(rng_path)
        if len(rng) == world_size:
            ckpt.restore_rng(rng[rank])
        else:  # another worker count: fresh, distinct streams per worker
            torch.manual_seed(cfg.train.seed + state.iteration + rank)
    state.restarts += 1
    return state


def ema_update_count(nets: Networks) -> int:
    """How many EMA updates the teacher has had (k = 0 on the first one)."""
    return int(nets.ema.state_dict()["updates"])


def set_ema_update_count(nets: Networks, count: int) -> None:
    nets.ema.load_state_dict({"updates": count})  # weights come from teacher.pt
