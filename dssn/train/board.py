"""TensorBoard scalars of a training run: ``tensorboard --logdir <storage>``.

Rank 0 writes ``<run_dir>/tensorboard/``, against the global iteration:

- ``train/*`` every ``train.log_every`` steps: what the log line prints (each loss term, the
  share of pseudo-labels selected, the learning rate, images/s, the data-wait share);
- ``eval/*`` at each evaluation: teacher and student mIoU, and the teacher's IoU of every
  class (``eval/teacher_iou/<class>``);
- ``epoch/*`` at each epoch's end: images/s and the data-wait share over the epoch.

A resumed run opens the same directory with ``purge_step`` just past the iteration it resumes
from, so TensorBoard hides what the interrupted attempt logged after its last checkpoint (that
checkpoint's own evaluation stays) and the curves continue without a doubled stretch. With a
storage URI (``s3://…``) nothing is written (the event files need a local or mounted path);
the checkpoints' ``state.json`` hold the per-epoch figures there. ``train.tensorboard=false``
turns it off.
"""

from __future__ import annotations

import math
from typing import Any

from dssn.config import Config

BOARD_DIR = "tensorboard"


class Board:
    """One run's TensorBoard writer (rank 0)."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir, purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """``<prefix>/<name>`` for every finite number in ``values``."""
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_board(cfg: Config, rank: int, resumed_from: int) -> Board | None:
    """The run's :class:`Board` on rank 0 with local storage and ``train.tensorboard``; else
    None. ``resumed_from``: the iteration the run (re)starts at (0 for a fresh run)."""
    from dssn.train.launcher import run_dir

    if rank != 0 or not cfg.train.tensorboard or "://" in cfg.train.storage:
        return None
    # the resumed attempt logs from resumed_from + 1 on: hide the earlier attempt's events there
    return Board(
        f"{run_dir(cfg)}/{BOARD_DIR}", purge_step=resumed_from + 1 if resumed_from else None
    )


def eval_scalars(state: Any, classes: list[str] | None) -> dict[str, float]:
    """What an evaluation puts on the board: mIoU of both networks and the teacher's per-class
    IoU (named by the dataset's classes, else by index)."""
    out = {"teacher_miou": state.teacher_miou, "student_miou": state.student_miou}
    for i, iou in enumerate(state.teacher_iou):
        name = classes[i] if classes and i < len(classes) else str(i)
        out[f"teacher_iou/{name.replace(' ', '_')}"] = iou
    return out
