"""Data-parallel scaling on CPU: images/s with 1 and 2 Ray Train workers (one torch thread
each), and the fraction of the step time spent waiting for data.

    .venv/bin/python benchmarks/scaling.py [--config configs/digits.yaml] [--workers 1 2]
                                           [--threads 1] [--epochs 2] [--iters 20] [key=value ...]

Each worker count is one short ``fit`` run (a fresh run name under a temporary storage
directory) in a local Ray started for it as ``dssn train`` starts one; the figures are those of
its last epoch (the first one warms up). Targets (issue 4): 2 workers >= 1.7x the images/s of
one; data wait < 5% of step time.
Images/s counts every training image of a step (labeled + unlabeled + CutMix partner rows),
summed over workers. ``--threads N`` gives each worker N torch threads instead (e.g. one worker
with 1 against 2 threads: two runs, ``--workers 1 --threads 1`` and ``--workers 1 --threads 2``).

A second table says where the machine's cores went in the last epoch's steady part (after its
first batch): each process of the local Ray cluster is read once a second and counted by kind,
the train workers, Ray Data's read / augment tasks, its per-stream coordinators, Ray's other
actors and agents, the daemons (GCS, raylet, dashboard) and this driver. On a machine whose
cores the train workers share with everything else, it shows what is left for training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from cluster_cpu import ClusterCPU

from dssn.config import load_config

TARGET_SPEEDUP = 1.7
TARGET_DATA_WAIT = 0.05
KINDS = (
    "train workers",
    "data tasks",
    "data coordinators",
    "Ray actors and agents",
    "Ray daemons",
    "driver",
)


def process_kind(name: str) -> str:
    """The kind (:data:`KINDS`) of a process of the local cluster, from its name."""
    if name == "driver":
        return "driver"
    if name.startswith("ray::RayTrainWorker"):
        return "train workers"
    if name.startswith("ray::SplitCoordinator"):  # one per stream, feeding the workers
        return "data coordinators"
    if name == "ray::IDLE" or "(" in name or "->" in name:  # ray::MapBatches(...), pooled
        return "data tasks"
    if name.startswith("ray::"):  # TrainController, _StatsActor, DashboardAgent, ...
        return "Ray actors and agents"
    return "Ray daemons"  # gcs_server, raylet, dashboard, log monitor


def measure(
    config: str,
    workers: int,
    epochs: int,
    iters: int,
    overrides: list[str],
    storage: str,
    threads: int = 1,
) -> dict[str, float]:
    """One run with ``workers`` workers; the last epoch's throughput figures."""
    import ray

    from dssn.train.launcher import ensure_ray, fit

    cfg = load_config(
        config,
        [
            *overrides,
            f"train.workers={workers}",
            f"train.threads_per_worker={threads}",
            f"train.epochs={epochs}",
            f"train.iters_per_epoch={iters}",
            f"train.eval_every={epochs}",  # evaluation is not part of the step time
            f"train.storage={storage}",
            f"train.name=scaling-{workers}w",
            f"train.log_every={iters}",
            "dssn.burn_in_epochs=0",  # the DSSN step's throughput, not the burn-in's
        ],
    )
    # a local Ray of its own, as `dssn train --workers N` starts it (launcher.local_cpus)
    started = ensure_ray(cfg)
    # the meter reads this process's descendants: a local Ray started here, not a cluster's
    local = started and not os.environ.get("RAY_ADDRESS")
    try:
        start = time.perf_counter()
        with ClusterCPU(history=True) as meter:
            metrics = fit(cfg).metrics
    finally:
        if started:
            ray.shutdown()
    window_ends = (metrics["steady_start_unix"], metrics["epoch_end_unix"])
    cores, window = meter.cores_between(*window_ends, process_kind) if local else (None, 0.0)
    started_in_window = meter.started_between(*window_ends) if local else 0
    return {
        "workers": workers,
        "images_per_s": metrics["images_per_s"],
        "images_per_s_steady": metrics["images_per_s_steady"],
        "data_wait": metrics["data_wait"],
        "data_wait_steady": metrics["data_wait_steady"],
        "first_batch_s": metrics["first_batch_s"],
        "epoch_time_s": metrics["epoch_time_s"],
        "wall_s": time.perf_counter() - start,
        "cores": cores,
        "window_s": window,
        "started": started_in_window,
    }


def table(rows: list[dict[str, float]]) -> str:
    base = rows[0]["images_per_s"]
    base_steady = rows[0]["images_per_s_steady"]
    lines = [
        "| workers | images/s | speed-up | images/s steady | speed-up steady | data wait "
        "| data wait steady | first batch (s) | epoch (s) | run wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
            f"{r['images_per_s_steady']:.1f} | {r['images_per_s_steady'] / base_steady:.2f}x | "
            f"{r['data_wait']:.1%} | {r['data_wait_steady']:.1%} | {r['first_batch_s']:.1f} | "
            f"{r['epoch_time_s']:.1f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def cores_table(rows: list[dict]) -> str:
    """Cores in use by kind of process over each run's last steady epoch; "unused": the
    machine's cores less all of them (idle, or used by processes outside this run); "processes
    started": Ray processes that started inside the window (each ~3 CPU-s of imports)."""
    lines = [
        "| workers | window (s) | " + " | ".join(KINDS) + " | all | unused | processes started |",
        "|---:|---:|" + "---:|" * (len(KINDS) + 3),
    ]
    cpus = os.cpu_count() or 1
    for r in rows:
        if r["cores"] is None:
            lines.append(f"| {r['workers']} | (not measured: a Ray this script did not start) |")
            continue
        used = [r["cores"].get(k, 0.0) for k in KINDS]
        cells = " | ".join(f"{c:.2f}" for c in used)
        idle = max(cpus - sum(used), 0.0)
        lines.append(
            f"| {r['workers']} | {r['window_s']:.0f} | {cells} | {sum(used):.2f} | {idle:.2f} "
            f"| {r.get('started', 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20, help="iterations per epoch")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="dssn-scaling-") as storage:
        rows = [
            measure(args.config, n, args.epochs, args.iters, args.overrides, storage, args.threads)
            for n in args.workers
        ]
    print(f"\nCPU data-parallel scaling ({cores} cores, {args.threads} torch thread(s) per worker, "
          f"{args.iters} iterations/epoch, last of {args.epochs} epochs)")  # fmt: skip
    print(table(rows))
    if len(rows) > 1:
        speedup = rows[-1]["images_per_s_steady"] / rows[0]["images_per_s_steady"]
        print(f"steady-state speed-up {rows[-1]['workers']} vs {rows[0]['workers']} workers: "
              f"{speedup:.2f}x (target >= {TARGET_SPEEDUP}x for 2 vs 1, one thread each)")  # fmt: skip
    print(f"\nWhere the {cores} cores went in the last epoch after its first batch (cores in use, "
          "processes read once a second)")  # fmt: skip
    print(cores_table(rows))
    worst_wait = max(r["data_wait_steady"] for r in rows)
    print(f"worst steady-state data wait {worst_wait:.1%} (target < {TARGET_DATA_WAIT:.0%})")


if __name__ == "__main__":
    main()
