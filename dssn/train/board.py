"""TensorBoard curves, pictures and config of a training run: ``tensorboard --logdir <storage>``.

Rank 0 writes ``<run_dir>/tensorboard/``, against the global iteration:

- ``train/*`` with each log line (every ``train.log_every`` steps and at an epoch's end): what
  it prints (each loss term, the share of pseudo-labels selected, the learning rate, images/s,
  the data-wait share);
- ``pseudo/*`` with each log line of DSSN steps, per class: ``pseudo/kept/<class>``, the share
  of the teacher's pseudo-labels of the class that the selection kept, and
  ``pseudo/share/<class>``, the class's share of the pseudo-labels (:func:`pseudo_scalars`);
- ``eval/*`` at each evaluation: teacher and student mIoU, and the teacher's IoU of every
  class (``eval/teacher_iou/<class>``);
- ``epoch/*`` at each epoch's end: images/s and the data-wait share over the epoch;
- ``config`` (text), when the run starts: the resolved config it trains with;
- ``predictions/<i>`` at each evaluation: the first ``train.board_images`` val images, each as
  one picture of the image, its ground truth and the teacher's prediction side by side, in the
  dataset's palette (ignore white), inferred as the evaluation does (``data.eval_mode``).

A resumed run opens the same directory with ``purge_step`` just past the iteration it resumes
from, so TensorBoard hides what the interrupted attempt logged after its last checkpoint (that
checkpoint's own evaluation stays) and the curves continue without a doubled stretch. With a
storage URI (``s3://…``) nothing is written (the event files need a local or mounted path);
the checkpoints' ``state.json`` hold the per-epoch figures there. ``train.tensorboard=false``
turns it off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dssn.config import Config

if TYPE_CHECKING:
    from dssn.train.state import TrainState

BOARD_DIR = "tensorboard"
PREVIEW_SIDE = 512  # longest side of each part of a prediction picture (larger: subsampled)
IGNORE_COLOUR = (255, 255, 255)


class Board:
    """One run's TensorBoard writer (rank 0)."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir, purge_step=purge_step)
        self.classes: list[str] | None = None  # the dataset's class names, for per-class tags

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """``<prefix>/<name>`` for every finite number in ``values``."""
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def pictures(self, prefix: str, pictures: list[np.ndarray], step: int) -> None:
        """``<prefix>/<i>`` for each (H, W, 3) uint8 picture."""
        for i, picture in enumerate(pictures):
            self._writer.add_image(f"{prefix}/{i}", picture, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Markdown text (TensorBoard's Text tab)."""
        self._writer.add_text(tag, text, step)

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
    board = Board(
        f"{run_dir(cfg)}/{BOARD_DIR}", purge_step=resumed_from + 1 if resumed_from else None
    )
    if not resumed_from:  # indented four spaces: a code block in Markdown
        board.text("config", "".join(f"    {line}\n" for line in cfg.to_yaml().splitlines()))
    return board


def _class_tag(classes: list[str] | None, i: int) -> str:
    name = classes[i] if classes and i < len(classes) else str(i)
    return name.replace(" ", "_")


def pseudo_scalars(sums: dict[str, list[float]], classes: list[str] | None) -> dict[str, float]:
    """Per class, from a log window's pixel counts (``pseudo_pixels``, ``selected_pixels``):
    ``kept/<class>``, the share of the teacher's pseudo-labels of that class that the
    selection kept, and ``share/<class>``, the class's share of all its pseudo-labels. Empty
    without the counts (a labeled-only step); a class the teacher never named has no ``kept``."""
    if "pseudo_pixels" not in sums or "selected_pixels" not in sums:
        return {}
    pseudo, kept = sums["pseudo_pixels"], sums["selected_pixels"]
    total = sum(pseudo)
    out = {}
    for i, (n, k) in enumerate(zip(pseudo, kept, strict=True)):
        tag = _class_tag(classes, i)
        out[f"kept/{tag}"] = k / n if n else math.nan
        out[f"share/{tag}"] = n / total if total else math.nan
    return out


def eval_scalars(state: TrainState, classes: list[str] | None) -> dict[str, float]:
    """What an evaluation puts on the board: mIoU of both networks and the teacher's per-class
    IoU (named by the dataset's classes, else by index)."""
    out = {"teacher_miou": state.teacher_miou, "student_miou": state.student_miou}
    for i, iou in enumerate(state.teacher_iou):
        out[f"teacher_iou/{_class_tag(classes, i)}"] = iou
    return out


@torch.no_grad()
def prediction_pictures(
    model: nn.Module,
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    device: torch.device,
    palette: np.ndarray,
) -> list[np.ndarray]:
    """For each (image uint8 (3, H, W), mask (H, W)) sample: image | ground truth | prediction
    as one (H, 3W, 3) uint8 picture. ``model`` predicts in eval mode under the run's autocast
    and ``data.eval_mode`` (a ``center_crop`` shows the crop); the masks are drawn with
    ``palette`` ((C, 3) uint8), ignore (255) in white. Parts larger than ``PREVIEW_SIDE`` are
    subsampled."""
    from dssn.train.evaluate import autocast_for, eval_mode, normalize, segment

    crop = cfg.data.eval_crop or cfg.data.crop_size
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(palette)] = palette
    colours[255] = IGNORE_COLOUR
    out = []
    with eval_mode([model]), autocast_for(cfg, device):
        for image, mask in samples:
            x = normalize(image, cfg, device)
            target = mask.to(device).long().unsqueeze(0)
            pred, target = segment(
                model, x, cfg.data.eval_mode, crop, cfg.data.eval_stride, target,
                scales=cfg.data.eval_scales, flip=cfg.data.eval_flip,
            )  # fmt: skip
            height, width = pred.shape[-2:]
            top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
            shown = image[:, top : top + height, left : left + width].permute(1, 2, 0).numpy()
            truth = colours[target[0].cpu().numpy().astype(np.uint8)]
            predicted = colours[pred[0].cpu().numpy().astype(np.uint8)]
            step = math.ceil(max(height, width) / PREVIEW_SIDE)
            parts = [part[::step, ::step] for part in (shown, truth, predicted)]
            out.append(np.concatenate(parts, axis=1))
    return out
