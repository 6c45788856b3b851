"""The per-worker training loop that Ray Train's TorchTrainer runs on every worker.

    train_loop_per_worker(cfg.to_dict())

Per epoch: ``iters_per_epoch`` DSSN steps (each the gradients of ``train.accumulate``
micro-batches, then SGD, poly decay and the EMA update), a log
line every ``train.log_every`` steps and at the epoch's last step, evaluation of student and
teacher every ``eval_every`` epochs (and after the last), then one ``ray.train.report`` per worker with the epoch's metrics;
rank 0 attaches the checkpoint. A run resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import islice
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dssn.config import Config, from_dict
from dssn.data.format import read_dataset_info
from dssn.data.pipeline import iter_train_batches, iter_val_samples, iters_per_epoch, to_device
from dssn.method import step
from dssn.train.board import (
    Board,
    eval_scalars,
    open_board,
    prediction_pictures,
    pseudo_scalars,
)
from dssn.train.evaluate import amp_fallback_note, autocast_for, evaluate
from dssn.train.faults import FaultInjector
from dssn.train.history import epoch_record
from dssn.train.inference import palette_for
from dssn.train.meter import MetricMeter, image_count
from dssn.train.schedule import BACKBONE, set_poly_lr
from dssn.train.setup import Networks, build_networks, worker_threads
from dssn.train.state import TrainState, gather_rng, restore_run, save_run


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite and ``train.nan_policy`` is ``error``."""


def all_finite(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on every worker (so all workers take the same decision)."""
    ok = torch.isfinite(loss.detach()).float()
    if world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def gradient_sync(nets: Networks, sync: bool):
    """Where DDP all-reduces the gradients: at every backward but an accumulating step's
    earlier micro-batches (``train.accumulate``), whose forward and backward run under
    DDP's ``no_sync`` and only add to the gradients."""
    if sync or not isinstance(nets.student, DistributedDataParallel):
        return nullcontext()
    return nets.student.no_sync()


def optimizer_step(nets: Networks, loss: torch.Tensor, world_size: int) -> bool | None:
    """The optimizer step after the backward pass(es) of ``loss`` (a step's loss, summed
    over its micro-batches). True: stepped. None: the loss is not finite on some worker
    (nothing updated; ``train.nan_policy`` decides). False: the loss is finite but fp16
    gradients overflowed at the current loss scale, so the GradScaler skipped the step and
    lowered the scale (train.amp=fp16; a few such steps at the start of a run are normal)."""
    if not all_finite(loss, world_size):
        return None
    if not nets.scaler.is_enabled():
        nets.optimizer.step()
        return True
    # Whether the scaler stepped, without reading the scale back (each read is a host sync on
    # a GPU): the optimizer's post-step hook runs only if it did.
    stepped: list[bool] = []
    hook = nets.optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    try:
        nets.scaler.step(nets.optimizer)  # skips the step if a gradient is inf/NaN (all-reduced)
    finally:
        hook.remove()
    nets.scaler.update()  # lowers the scale after a skip
    return bool(stepped)


def log(rank: int, message: str) -> None:
    """A progress line from rank 0. Written to stdout directly: Ray Train V2 patches ``print``
    in workers to also copy it to a logger, which shows every line twice on the driver."""
    if rank == 0:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def quiet_report_lines() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` at INFO from every worker with the whole
    metrics dict (per-class IoU lists included): a screenful an epoch on the driver, beside
    the loop's own epoch line. That module logs nothing else at INFO; its warnings stay."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def format_eta(seconds: float) -> str:
    """``1h05m``, ``12m30s`` or ``45s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def remaining(
    cfg: Config, epoch: int, iteration: int, per_epoch: int, window_s: float, steps: int
) -> str:
    """The time left at the pace of the ``steps`` steps since the last line, which took
    ``window_s`` (evaluations not counted): of the run, or, in a burn-in followed by the
    costlier DSSN steps, of the burn-in."""
    pace = window_s / max(steps, 1)
    if cfg.labeled_only(epoch) and not cfg.labeled_only(cfg.train.epochs - 1):
        left = cfg.dssn.burn_in_epochs * per_epoch - iteration
        return f"burn-in ends in {format_eta(left * pace)}"
    return f"eta {format_eta((cfg.train.epochs * per_epoch - iteration) * pace)}"


def train_one_epoch(
    cfg: Config,
    nets: Networks,
    state: TrainState,
    epoch: int,
    total_iters: int,
    faults: FaultInjector,
    device: torch.device,
    rank: int,
    world_size: int,
    batches: Iterator[dict[str, torch.Tensor]] | None = None,
    board: Board | None = None,
) -> dict[str, float]:
    """One epoch of DSSN steps on this worker; returns the epoch's metrics (all workers).
    ``batches``: raw batches to train on instead of the Ray Data streams
    (:func:`iter_train_batches`), e.g. in-memory ones (``benchmarks/ddp_cpu.py``).
    ``board``: where rank 0 also puts each log line's figures (TensorBoard)."""
    meter = MetricMeter(device)
    per_epoch = total_iters // cfg.train.epochs
    batches = iter(iter_train_batches(cfg, epoch) if batches is None else batches)
    start = last_log = time.perf_counter()
    data_wait = window_wait = first_wait = 0.0
    logged_at = 0  # the step of the epoch's last log line
    steady_from = time.time()  # wall clock (Unix) of the first batch's arrival
    accumulate = cfg.train.accumulate
    i = 0
    while True:
        # one step: the gradients of ``accumulate`` micro-batches, then one optimizer step
        nets.optimizer.zero_grad(set_to_none=True)
        micro: list[tuple[dict[str, torch.Tensor], torch.Tensor, int]] = []
        for k in range(accumulate):
            t0 = time.perf_counter()
            raw = next(batches, None)
            if raw is None:
                break
            waited = time.perf_counter() - t0
            data_wait += waited
            window_wait += waited
            if i == 0 and k == 0:
                first_wait = waited  # the pipeline's start-up, paid once per epoch
                steady_from = time.time()
            if k == 0:
                faults.maybe_die(state.iteration)
            batch = to_device(raw, device, cfg)
            with gradient_sync(nets, sync=k == accumulate - 1):
                with autocast_for(cfg, device):
                    loss, metrics = step(
                        nets.student, nets.teacher, batch, cfg, iteration=state.iteration,
                        epoch=epoch,
                    )  # fmt: skip
                loss = faults.maybe_nan(loss, state.iteration)
                nets.scaler.scale(loss / accumulate).backward()
            micro.append((metrics, loss.detach(), image_count(batch)))
        if len(micro) < accumulate:  # the stream ended: a part-filled step is not taken
            break
        loss = micro[0][1] if accumulate == 1 else torch.stack([m[1] for m in micro]).sum()
        stepped = optimizer_step(nets, loss, world_size)
        step_images = sum(m[2] for m in micro)
        if stepped:
            nets.ema.update(nets.module)
            for metrics, micro_loss, count in micro:
                meter.add(metrics, micro_loss, count)
        elif stepped is not None:  # fp16: the loss scale was too high; the scaler lowered it
            state.overflow_skipped += 1
            meter.skip(step_images)
        elif cfg.train.nan_policy == "error":
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {epoch + 1}/{cfg.train.epochs}, "
                f"step {i + 1}/{per_epoch} of the epoch (global iteration {state.iteration}); "
                f"train.nan_policy=error stops the run here without writing a checkpoint, so "
                f"the last good checkpoint (epoch {state.epoch}) is unchanged"
            )
        else:  # skip: no update, no EMA step; the schedule still advances
            state.nan_skipped += 1
            meter.skip(step_images)
            log(
                rank,
                f"epoch {epoch + 1} step {i + 1}: non-finite loss, update skipped "
                f"({state.nan_skipped} so far)",
            )
        lr = set_poly_lr(nets.optimizer, state.iteration, total_iters, cfg.optim.poly_power)
        state.iteration += 1
        i += 1
        # a line every log_every steps, and one at the epoch's last step (a short epoch too);
        # every worker joins the window's all-reduce, rank 0 writes the line
        if i % cfg.train.log_every == 0 or i == per_epoch:
            now = time.perf_counter()
            window, counts, images = meter.window(world_size)  # the only host sync
            meter.reset_window()
            if rank == 0:
                rate = images / max(now - last_log, 1e-9)
                if nets.scaler.is_enabled():  # fp16: the loss scale, and the steps it skipped
                    window["loss_scale"] = nets.scaler.get_scale()
                    window["overflow_skipped"] = state.overflow_skipped
                parts = " ".join(f"{k} {v:.4g}" for k, v in window.items())
                wait_share = window_wait / max(now - last_log, 1e-9)  # rank 0's
                if board is not None:
                    figures = {"lr": lr, "images_per_s": rate, "data_wait": wait_share}
                    board.scalars("train", {**window, **figures}, state.iteration)
                    board.scalars("pseudo", pseudo_scalars(counts, board.classes), state.iteration)
                log(
                    rank,
                    f"epoch {epoch + 1}/{cfg.train.epochs} step {i}/{per_epoch} "
                    f"(iter {state.iteration}) {parts} lr {lr:.3g} img/s {rate:.1f} "
                    f"data_wait {wait_share:.1%} "
                    + remaining(
                        cfg, epoch, state.iteration, per_epoch, now - last_log, i - logged_at
                    ),
                )
            last_log, window_wait, logged_at = now, 0.0, i
    elapsed = time.perf_counter() - start
    out = meter.epoch_means(world_size)
    out["images_per_s"] = meter.total_images * world_size / max(elapsed, 1e-9)
    out["data_wait"] = data_wait / max(elapsed, 1e-9)
    # steady state: without the first batch's wait (the pipeline starting up)
    out["data_wait_steady"] = (data_wait - first_wait) / max(elapsed - first_wait, 1e-9)
    out["first_batch_s"] = first_wait
    out["images_per_s_steady"] = meter.total_images * world_size / max(elapsed - first_wait, 1e-9)
    out["epoch_time_s"] = elapsed
    # when the steady part ran, for tools that read machine counters over it (scaling.py)
    out["steady_start_unix"], out["epoch_end_unix"] = steady_from, time.time()
    out["steps"] = i
    out["lr"] = nets.optimizer.param_groups[BACKBONE]["lr"]
    return out


def evaluate_epoch(cfg: Config, nets: Networks, device: torch.device) -> dict[str, Any]:
    """Student and teacher (each in eval mode, then back) over this worker's val rows."""
    results = evaluate(
        {"student": nets.module, "teacher": nets.teacher},
        iter_val_samples(cfg, shard="val"),
        cfg,
        device,
    )
    return results


def epoch_report(state: TrainState, train: dict[str, float], evaluated: bool) -> dict[str, Any]:
    """The metrics reported to Ray for one epoch (final_* = this epoch's evaluation)."""
    return {
        "epoch": state.epoch,
        "iteration": state.iteration,
        "teacher_miou": state.teacher_miou,
        "student_miou": state.student_miou,
        "final_teacher_miou": state.teacher_miou,
        "final_student_miou": state.student_miou,
        "best_teacher_miou": state.best_teacher_miou,
        "best_student_miou": state.best_student_miou,
        "best_epoch": state.best_epoch,
        "teacher_iou": state.teacher_iou,
        "student_iou": state.student_iou,
        "best_teacher_iou": state.best_teacher_iou,
        "evaluated": evaluated,
        "evaluated_epoch": state.evaluated_epoch,
        "nan_skipped": state.nan_skipped,
        "overflow_skipped": state.overflow_skipped,
        "restarts": state.restarts,
        **train,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config``: a Config as a dict (``cfg.to_dict()``)."""
    cfg = from_dict(config, where="train_loop_per_worker config")
    quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(cfg))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL object collectives use the current device
    if (note := amp_fallback_note(cfg, device)) is not None:
        log(rank, note)
    nets = build_networks(cfg, device, world_size)
    torch.manual_seed(cfg.train.seed + rank)  # distinct dropout streams per worker

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = restore_run(directory, nets, cfg, rank, world_size)
        log(
            rank,
            f"resumed from {checkpoint.path}: epoch {state.epoch}, iteration "
            f"{state.iteration} (restart {state.restarts})",
        )
    faults = FaultInjector(cfg, rank, world_size, ctx.get_storage())
    total_iters = cfg.train.epochs * iters_per_epoch(cfg, world_size)
    if state.epoch >= cfg.train.epochs:
        log(rank, f"run already complete ({state.epoch} epochs): nothing to do")
        return
    board = open_board(cfg, rank, resumed_from=state.iteration)
    try:
        train_epochs(cfg, nets, state, total_iters, faults, device, rank, world_size, board)
    finally:
        if board is not None:
            board.close()


def train_epochs(
    cfg: Config,
    nets: Networks,
    state: TrainState,
    total_iters: int,
    faults: FaultInjector,
    device: torch.device,
    rank: int,
    world_size: int,
    board: Board | None,
) -> None:
    """The epochs from ``state.epoch`` on: train, evaluate when due, report with a checkpoint."""
    resumed_from = state.iteration
    dataset = read_dataset_info(cfg.data.root) if rank == 0 else None
    classes = (dataset or {}).get("classes")
    if board is not None:
        board.classes = classes
    preview, palette = [], None  # the val images whose predictions the board shows
    if board is not None and cfg.train.board_images > 0:
        preview = list(islice(iter_val_samples(cfg, rank=0, world_size=1), cfg.train.board_images))
        palette = palette_for(cfg.model.num_classes, dataset)
    for epoch in range(state.epoch, cfg.train.epochs):
        train = train_one_epoch(
            cfg, nets, state, epoch, total_iters, faults, device, rank, world_size, board=board
        )
        state.epoch = epoch + 1
        evaluated = state.epoch % cfg.train.eval_every == 0 or state.epoch == cfg.train.epochs
        if evaluated:
            res = evaluate_epoch(cfg, nets, device)
            state.record_eval(
                state.epoch, res["teacher"].iou, res["student"].iou,
                res["teacher"].miou, res["student"].miou,
            )  # fmt: skip
        state.history.append(epoch_record(state, train, evaluated))  # into the checkpoint
        metrics = epoch_report(state, train, evaluated)
        metrics["resumed_from_iteration"] = resumed_from
        log(
            rank,
            f"epoch {state.epoch}/{cfg.train.epochs} done: teacher mIoU "
            f"{state.teacher_miou:.4f} student mIoU {state.student_miou:.4f} (best teacher "
            f"{state.best_teacher_miou:.4f} at epoch {state.best_epoch}), "
            f"{train['images_per_s']:.1f} img/s, data wait {train['data_wait']:.1%}",
        )
        if board is not None:
            pictures = (
                prediction_pictures(nets.teacher, preview, cfg, device, palette)
                if evaluated and preview
                else []
            )
            board_epoch(board, state, train, evaluated, classes, pictures)
        report(metrics, nets, state, cfg, rank, world_size, dataset)


EPOCH_FIGURES = ("images_per_s", "images_per_s_steady", "data_wait", "data_wait_steady")


def board_epoch(
    board: Board,
    state: TrainState,
    train: dict[str, float],
    evaluated: bool,
    classes: list[str] | None,
    pictures: list,
) -> None:
    """An epoch on the board at its last iteration: the evaluation (if it had one) with the
    prediction pictures, and the epoch's throughput; flushed, so a stopped trial keeps it."""
    if evaluated:
        board.scalars("eval", eval_scalars(state, classes), state.iteration)
        board.pictures("predictions", pictures, state.iteration)
    board.scalars("epoch", {k: train[k] for k in EPOCH_FIGURES}, state.iteration)
    board.flush()


def checkpoint_dir_name(epoch: int) -> str:
    """Deterministic per epoch: a directory a killed attempt left half-registered is simply
    rewritten when the resumed run redoes that epoch."""
    return f"checkpoint_epoch_{epoch:04d}"


def report(
    metrics: dict[str, Any],
    nets: Networks,
    state: TrainState,
    cfg: Config,
    rank: int,
    world_size: int,
    dataset: dict[str, Any] | None,
) -> None:
    """Report the epoch to Ray (rank 0 with the checkpoint) and wait until it is committed.

    Ray Train registers a reported checkpoint asynchronously: a worker killed right after
    ``report`` can make the restart miss it (Ray 2.60 then restarts from the one before). So
    every worker waits here until the controller has committed it.
    """
    rng = gather_rng(world_size)  # a collective: before rank 0 goes its own way
    name = checkpoint_dir_name(state.epoch)
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="dssn-ckpt-") as tmp:
            save_run(tmp, nets, state, cfg, rng, dataset=dataset, metrics=metrics)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    else:
        ray.train.report(metrics, checkpoint_dir_name=name)
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
