"""Time one DSSN training iteration: reference structure vs the allowed shortcuts.

One iteration = ``step`` (all forward passes and the loss block) + ``loss.backward()`` +
``optimizer.step()`` (SGD with the backbone / head groups) + the EMA teacher update, on one
fixed random batch (B labeled + B unlabeled + B CutMix-partner images, random init).

Modes, side by side in one run:

- ``reference``: every shortcut off (teacher in two passes, perturbed branches decoded for
  the labeled images too, state-dict EMA) -- the exact reference structure;
- ``shortcuts``: every shortcut on (the config defaults);
- on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX), also ``shortcuts+bf16+cl``: bf16
  autocast and channels_last on top; on CUDA also ``shortcuts+fp16+cl``: float16 autocast with
  loss scaling (``train.amp=fp16``, for GPUs without bf16), as the training loop does it;
- with ``--compile``, each of the fast modes again under ``torch.compile`` (student and teacher,
  inductor's defaults), e.g. ``shortcuts+compile``. The compilation falls in the first
  iteration, which the table's "first s" column shows (it is not in the medians).

Each mode lives in its own process (so peak memory is the mode's own), and the processes take
turns iteration by iteration, so that load from other processes on a shared machine falls on
every mode alike. Reported: images/s (3B images per iteration, as the training loop counts
them), the median time of each phase after warm-up, the fastest iteration (the least
disturbed one on a shared machine), the median CPU time of the process per iteration (all
threads; on a CPU shared with other jobs, a measure of the work done that their load barely
moves), the GFLOP of one iteration (``torch.utils.flop_counter``: convolutions and matrix
products, forward and backward; independent of the machine), peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS, which includes the ~0.9 GiB of the imported libraries) and the speed-up
over ``reference``. Phases are timed with a device sync between them, so on a GPU their sum
slightly over-estimates an unsynchronised iteration.

    python benchmarks/step.py --backbone resnet50_deep --crop 129 --batch 2 --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import resource
import statistics
import time
from contextlib import nullcontext
from typing import Any

PHASES = ("forward", "backward", "optimizer", "ema")
SHORTCUTS = ("teacher_single_pass", "fp_unlabeled_only", "fused_ema")
IGNORE = 255
PAD_FRACTION = 0.1  # bottom rows of every crop marked as padding (ignored), as after a rescale
BOX_FRACTION = 0.4  # CutMix box side as a fraction of the crop
KIB = 1024  # ru_maxrss is in KiB on Linux
MIB = 1024**2
GIGA = 1e9
POLL_S = 1.0  # how often the parent checks that every mode's process is still alive


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet50_deep", help="model.backbone")
    p.add_argument("--crop", type=int, default=129, help="crop size (pixels)")
    p.add_argument("--batch", type=int, default=2, help="B: labeled = unlabeled = mix batch")
    p.add_argument("--classes", type=int, default=21, help="model.num_classes")
    p.add_argument("--width", type=int, default=64, help="base width of the tiny backbone")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="add torch.compile modes")
    return p.parse_args(argv)


def random_batch(batch: int, crop: int, classes: int, device: Any) -> dict[str, Any]:
    """One batch with the keys of docs/CONTRACTS.md: images, masks, padding, CutMix boxes."""
    import torch

    def images():
        return torch.randn(batch, 3, crop, crop, device=device)

    pad = int(crop * (1 - PAD_FRACTION))
    mask = torch.randint(0, classes, (batch, crop, crop), device=device)
    mask[:, pad:] = IGNORE
    ignore = torch.zeros(batch, crop, crop, dtype=torch.long, device=device)
    ignore[:, pad:] = IGNORE
    side = int(crop * BOX_FRACTION)
    box = torch.zeros(batch, crop, crop, dtype=torch.long, device=device)
    box[:, :side, :side] = 1
    return {
        "image_x": images(),
        "mask_x": mask,
        "image_u_w": images(),
        "image_u_s1": images(),
        "image_u_s2": images(),
        "ignore_u": ignore,
        "box_u1": box,
        "box_u2": box.flip(-1),
        "image_mix_w": images(),
        "image_mix_s1": images(),
        "image_mix_s2": images(),
        "ignore_mix": ignore.clone(),
    }


def time_mode(args: argparse.Namespace, mode: str, turn: Any, next_turn: Any) -> dict[str, Any]:
    """Build the networks for ``mode``, then time iterations, each one after acquiring
    ``turn`` and releasing ``next_turn`` (the modes alternate). Per-phase seconds and peak
    memory in bytes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dssn.config import Config, set_values
    from dssn.method import EMATeacher, step
    from dssn.model import build_model
    from dssn.train.schedule import build_optimizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fast = mode != "reference"
    channels_last = "+cl" in mode
    compiled = mode.endswith("+compile")
    values = {
        "backbone": args.backbone,
        "num_classes": args.classes,
        "width": args.width,
        "crop_size": args.crop,
        "batch_size": args.batch,
        **{name: fast for name in SHORTCUTS},
    }
    cfg = set_values(Config(), values)
    torch.manual_seed(args.seed)
    student = build_model(cfg.model).to(device)
    batch = random_batch(args.batch, args.crop, args.classes, device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        batch = {
            k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
            for k, v in batch.items()
        }
    student.train()
    ema = EMATeacher(student, cfg.dssn.ema, fused=cfg.dssn.fused_ema)
    optimizer = build_optimizer(student, cfg.optim)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = next((amp[name] for name in amp if f"+{name}" in mode), None)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    # train.amp=fp16: the loss scaled for the backward, the gradients unscaled before the step
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # compiled modules share the eager ones' parameters (the EMA updates the teacher in place)
    nets = (torch.compile(student), torch.compile(ema.teacher)) if compiled else None

    def iteration(it: int, eager: bool = False):
        student_net, teacher_net = (student, ema.teacher) if eager or not compiled else nets
        with autocast:  # iteration >= 1: the full loss (no first-iteration rule)
            loss, _ = step(student_net, teacher_net, batch, cfg, iteration=it + 1)
        return loss

    # one untimed iteration under the FLOP counter (in turn, like the timed ones): the work
    # done, whatever the machine's load (eager: compiled code does the same operations)
    turn.acquire()
    with FlopCounterMode(display=False) as counter:
        loss = iteration(0, eager=True)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    ema.update(student)
    next_turn.release()
    flops = counter.get_total_flops()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {phase: [] for phase in (*PHASES, "total", "cpu")}
    first = 0.0  # the first iteration's seconds: with torch.compile, the compilation
    for it in range(args.warmup + args.iters):
        turn.acquire()
        c0 = time.process_time()
        t0 = sync()
        loss = iteration(it)
        t1 = sync()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        t2 = sync()
        scaler.step(optimizer)
        scaler.update()
        t3 = sync()
        ema.update(student)
        t4 = sync()
        c4 = time.process_time()
        next_turn.release()
        if it == 0:
            first = t4 - t0
        if it >= args.warmup:
            marks = [(t0, t1), (t1, t2), (t2, t3), (t3, t4)]
            for phase, (a, b) in zip(PHASES, marks, strict=True):
                times[phase].append(b - a)
            times["total"].append(t4 - t0)
            times["cpu"].append(c4 - c0)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB
    return {"times": times, "peak": peak, "flops": flops, "first": first}


def _worker(args, mode, turn, next_turn, results) -> None:
    try:
        results.put((mode, time_mode(args, mode, turn, next_turn)))
    except BaseException as e:  # report, and let the next mode go on so the parent sees it
        next_turn.release()
        results.put((mode, e))
        raise


def summarize(run: dict[str, Any], batch: int) -> dict[str, float]:
    """Median of each phase, images/s, the fastest iteration and the peak memory (MiB)."""
    result = {name: statistics.median(values) for name, values in run["times"].items()}
    result["images_per_s"] = 3 * batch / result["total"]
    result["best"] = min(run["times"]["total"])
    result["peak_mib"] = run["peak"] / MIB
    result["gflop"] = run["flops"] / GIGA
    result["first"] = run["first"]
    return result


def run_modes(args: argparse.Namespace, modes: list[str]) -> dict[str, dict[str, Any]]:
    """One process per mode, taking turns iteration by iteration (a ring of semaphores)."""
    ctx = multiprocessing.get_context("spawn")
    turns = [ctx.Semaphore(1 if i == 0 else 0) for i in range(len(modes))]
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(args, mode, turns[i], turns[(i + 1) % len(modes)], results),
            daemon=True,
        )
        for i, mode in enumerate(modes)
    ]
    for p in procs:
        p.start()
    out: dict[str, dict[str, Any]] = {}
    try:
        while len(out) < len(modes):
            try:
                mode, value = results.get(timeout=POLL_S)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a benchmark process died without a result") from None
                continue
            if isinstance(value, BaseException):
                raise RuntimeError(f"mode {mode} failed: {value!r}") from value
            out[mode] = value
    finally:
        for p in procs:
            p.join(timeout=POLL_S)
            if p.is_alive():
                p.terminate()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from dssn.train.evaluate import cpu_has_bf16

    modes = ["reference", "shortcuts"]
    if args.device.startswith("cuda") or cpu_has_bf16():
        modes.append("shortcuts+bf16+cl")
    if args.device.startswith("cuda"):
        modes.append("shortcuts+fp16+cl")
    if args.compile:
        modes += [f"{mode}+compile" for mode in modes if mode != "reference"]
    print(
        f"DSSN step benchmark: {args.backbone}, crop {args.crop}, batch {args.batch} "
        f"(x3: labeled + unlabeled + mix), {args.classes} classes, device {args.device}, "
        f"{args.threads} threads, torch {torch.__version__}; median of {args.iters} "
        f"iterations after {args.warmup} warm-up, modes alternating",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    results = {mode: summarize(run, args.batch) for mode, run in run_modes(args, modes).items()}

    base = results["reference"]
    header = (
        f"{'mode':<28}{'img/s':>8}{'step ms':>10}{'fwd ms':>9}{'bwd ms':>9}{'opt ms':>9}"
        f"{'ema ms':>9}{'peak MiB':>10}{'speed-up':>10}{'best ms':>9}{'best x':>8}"
        f"{'cpu ms':>9}{'cpu x':>7}{'GFLOP':>8}{'flop x':>8}{'first s':>9}"
    )
    print(header)
    print("-" * len(header))
    for mode in modes:
        r = results[mode]
        print(
            f"{mode:<28}{r['images_per_s']:>8.2f}{r['total'] * 1e3:>10.0f}"
            f"{r['forward'] * 1e3:>9.0f}{r['backward'] * 1e3:>9.0f}{r['optimizer'] * 1e3:>9.0f}"
            f"{r['ema'] * 1e3:>9.1f}{r['peak_mib']:>10.0f}"
            f"{r['images_per_s'] / base['images_per_s']:>9.2f}x"
            f"{r['best'] * 1e3:>9.0f}{base['best'] / r['best']:>7.2f}x"
            f"{r['cpu'] * 1e3:>9.0f}{base['cpu'] / r['cpu']:>6.2f}x"
            f"{r['gflop']:>8.1f}{base['gflop'] / r['gflop']:>7.2f}x{r['first']:>9.1f}"
        )
    # other processes on a shared machine slow every mode: the load average says how much
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
