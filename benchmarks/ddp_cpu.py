"""Data-parallel scaling of the DSSN step itself on this machine's CPUs, without Ray: the
ceiling that ``benchmarks/scaling.py`` (Ray Train + Ray Data) can reach.

    .venv/bin/python benchmarks/ddp_cpu.py [--config configs/digits.yaml] [--workers 1 2]
                                           [--steps 40] [--warmup 8] [key=value ...]

For each worker count N: N plain processes (torch.distributed, gloo, DDP as a Train run sets it
up: ``build_networks``), one torch thread each, run ``loop.train_one_epoch`` on in-memory batches.
The batches are read and augmented from the shards once, before the clock starts (the same
functions as the Ray Data tasks, ``pipeline.read_and_augment``), so no data work competes with
the steps. Reported: the median step time after ``--warmup`` steps, images/s (labeled +
unlabeled + CutMix partner rows, summed over workers) and the speed-up over the first count.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import tempfile
import time

import numpy as np
import torch

STREAM_ROWS = 64  # rows cached per stream; steps cycle through them
POLL_S = 1.0  # how often the parent checks that every worker process still lives


def cached_batches(cfg) -> list[dict[str, torch.Tensor]]:
    """Raw training batches (what ``iter_train_batches`` yields) for STREAM_ROWS // batch steps."""
    from dssn.data import format as fmt
    from dssn.data import pipeline

    info = fmt.read_dataset_info(cfg.data.root)
    rows = {}
    for stream in pipeline.stream_names(cfg, epoch=cfg.train.epochs - 1):
        part = pipeline.STREAM_PART[stream]
        plan = pipeline.shard_plan(cfg.data.root, part, int(info["counts"][part]), STREAM_ROWS)
        outs = [
            pipeline.read_and_augment(
                {"path": np.array([item["path"]]), "row_group": np.array([item["row_group"]])},
                stream,
                cfg.data,
            )
            for item in plan
        ]
        for key in outs[0]:
            rows[key] = torch.from_numpy(np.concatenate([o[key] for o in outs])[:STREAM_ROWS])
    b = cfg.data.batch_size
    return [
        pipeline.expand_batch({k: v[i : i + b] for k, v in rows.items()}, cfg.data.crop_size)
        for i in range(0, STREAM_ROWS - b + 1, b)
    ]


def worker(rank: int, world: int, args: argparse.Namespace, init_file: str, out) -> None:
    import torch.distributed as dist

    from dssn.config import load_config
    from dssn.train import loop
    from dssn.train.faults import FaultInjector
    from dssn.train.setup import build_networks
    from dssn.train.state import TrainState

    torch.set_num_threads(1)
    steps = args.warmup + args.steps
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"train.workers={world}",
            "train.epochs=1",
            f"train.iters_per_epoch={steps}",
            f"train.log_every={steps + 1}",
            "dssn.burn_in_epochs=0",
        ],
    )
    cache = cached_batches(cfg)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
    times: list[float] = []

    def batches():
        for i in range(steps):
            times.append(time.perf_counter())
            yield cache[i % len(cache)]

    try:
        nets = build_networks(cfg, torch.device("cpu"), world)
        faults = FaultInjector(cfg, rank, world)
        loop.train_one_epoch(
            cfg, nets, TrainState(), 0, steps, faults, torch.device("cpu"), rank, world, batches()
        )
        times.append(time.perf_counter())
        out.put((rank, np.diff(times)[args.warmup :].tolist()))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> float:
    """Median step time (s) of the slowest worker of ``world`` processes."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dssn-ddp-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=worker, args=(r, world, args, init_file, out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        results = []
        while len(results) < world:  # a worker that dies must not leave us waiting forever
            try:
                results.append(out.get(timeout=POLL_S))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.terminate()
                    raise RuntimeError(f"a worker of the {world}-process run failed") from None
        for p in procs:
            p.join()
    return max(statistics.median(steps) for _, steps in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    from dssn.config import load_config

    cfg = load_config(args.config, args.overrides)
    per_step = 3 * cfg.data.batch_size  # labeled + unlabeled + CutMix partner rows
    rows = []
    for world in args.workers:
        step = measure(world, args)
        rows.append((world, step, per_step * world / step))
        print(f"{world} process(es): median step {step * 1000:.0f} ms", flush=True)
    print(f"\nDSSN steps without Ray ({os.cpu_count()} cores, 1 torch thread per process, gloo "
          f"DDP, in-memory batches, median of {args.steps} steps)")  # fmt: skip
    print("| processes | step (ms) | images/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for world, step, rate in rows:
        print(f"| {world} | {step * 1000:.0f} | {rate:.1f} | {rate / rows[0][2]:.2f}x |")


if __name__ == "__main__":
    main()
