"""The driver: build the TorchTrainer for a Config and run it.

    result = fit(cfg)   # ray.train.Result; result.metrics = the last epoch's report

On one machine it starts a local Ray; with ``RAY_ADDRESS`` set (or Ray already initialised) it
uses that cluster. A run lives in ``<train.storage>/<name>``; running ``fit`` again with the same
name and storage continues it: Ray Train V2 finds the run's checkpoint-manager snapshot there
and hands the latest checkpoint to the workers through ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from dssn.config import Config, ConfigError, from_dict

# Ray Data runs its read / decode / augment tasks beside the train workers; with no CPU left
# for them it waits forever (Ray 2.60), so at least this many must stay free.
MIN_FREE_DATA_CPUS = 1
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray processes' State API clients go
WORKER_LIMIT_ENV = "RAY_num_workers_soft_limit"  # idle worker processes Ray keeps alive
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train's node-drain watcher
IDLE_WORKERS = 8
CONFIG_FILE = "config.yaml"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train V2 in the run dir


def run_name(cfg: Config) -> str:
    """``train.name``, else the experiment's ``name``."""
    return cfg.train.name or cfg.name


def storage_path(cfg: Config) -> str:
    """Absolute storage path (Ray needs one), or the URI as given (s3://, gs://)."""
    if "://" in cfg.train.storage:
        return cfg.train.storage.rstrip("/")
    return str(Path(cfg.train.storage).expanduser().absolute())


def run_dir(cfg: Config) -> str:
    """Where the run's checkpoints, config and results go."""
    return f"{storage_path(cfg)}/{run_name(cfg)}"


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().absolute())


def resolve_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose local paths are absolute: Ray workers run in another working
    directory, where ``shards/digits`` would name nothing."""
    data = cfg.to_dict()
    data["data"]["root"] = _absolute(cfg.data.root)
    data["train"]["storage"] = storage_path(cfg)
    pretrained = cfg.model.pretrained
    if pretrained and pretrained != "imagenet":
        data["model"]["pretrained"] = _absolute(pretrained)
    if cfg.model.init:
        data["model"]["init"] = _absolute(cfg.model.init)
    return from_dict(data, where="config with absolute paths")


def run_exists(cfg: Config) -> bool:
    """Whether ``run_dir(cfg)`` holds a Ray Train snapshot (a run that can be continued)."""
    fs, path = _fs(run_dir(cfg))
    return fs.get_file_info(f"{path}/{SNAPSHOT_FILE}").type == pafs.FileType.File


def latest_checkpoint_state(cfg: Config) -> tuple[str, dict[str, Any]] | None:
    """(directory, ``state.json``) of the run's checkpoint with the most epochs, on local or
    remote storage; None when the run has none."""
    from dssn.train.checkpoint import STATE

    fs, inner = _fs(run_dir(cfg))
    latest: tuple[str, dict[str, Any]] | None = None
    for entry in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)):
        state_path = f"{entry.path}/{STATE}"
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint"):
            continue
        if fs.get_file_info(state_path).type != pafs.FileType.File:
            continue  # a directory a killed attempt left half-written
        with fs.open_input_stream(state_path) as f:
            state = json.loads(f.read().decode())
        if latest is None or state.get("epoch", 0) > latest[1].get("epoch", 0):
            latest = (entry.path, state)
    return latest


def finished_run(cfg: Config) -> tuple[str, dict[str, Any]] | None:
    """:func:`latest_checkpoint_state` if the run already ran all ``train.epochs`` and its last
    report is in it; else None."""
    latest = latest_checkpoint_state(cfg)
    if latest is None or latest[1].get("epoch", 0) < cfg.train.epochs:
        return None
    return latest if latest[1].get("metrics") else None


def save_config(cfg: Config) -> str:
    """Write the resolved config as ``<run_dir>/config.yaml``; return its path. A config the
    run was started (or last continued) with that differs is kept first, as
    ``config-before-<UTC time>.yaml``, and the changed keys are printed, after whether the run
    continues from a checkpoint or starts again."""
    import time

    import yaml

    fs, path = _fs(run_dir(cfg))
    fs.create_dir(path, recursive=True)
    target = f"{path}/{CONFIG_FILE}"
    if fs.get_file_info(target).type == pafs.FileType.File:
        with fs.open_input_stream(target) as f:
            earlier = f.read()
        changes = config_changes(yaml.safe_load(earlier) or {}, yaml.safe_load(cfg.to_yaml()))
        if changes:
            kept = f"config-before-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.yaml"
            with fs.open_output_stream(f"{path}/{kept}") as f:
                f.write(earlier)
            latest = latest_checkpoint_state(cfg)
            how = (
                f"continues from its epoch-{latest[1].get('epoch', 0)} checkpoint"
                if latest is not None
                else "starts again (it holds no checkpoint to continue from)"
            )
            print(f"dssn: {run_dir(cfg)} {how} with other settings than its earlier "
                  f"config.yaml (kept as {kept}):", flush=True)  # fmt: skip
            for line in changes:
                print(f"  {line}", flush=True)
    with fs.open_output_stream(target) as f:
        f.write(cfg.to_yaml().encode())
    return f"{run_dir(cfg)}/{CONFIG_FILE}"


def config_changes(earlier: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf of two config dicts that differs (keys in one only
    count as changed), in the order of ``now``."""
    out = []
    for key in list(now) + [k for k in earlier if k not in now]:
        old, new = earlier.get(key, "(unset)"), now.get(key, "(unset)")
        if isinstance(old, dict) and isinstance(new, dict):
            out += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def describe_schedule(cfg: Config, info: dict[str, Any]) -> str:
    """One line: the global batch (DDP averages the workers' gradients, so it is what one step
    sees) and the steps an epoch and in all, for ``cfg`` on the dataset ``info``."""
    from dssn.data.pipeline import iters_per_epoch

    workers, batch, micro = cfg.train.workers, cfg.data.batch_size, cfg.train.accumulate
    per_epoch = iters_per_epoch(cfg, workers, info)
    what = "labeled images" if cfg.method == "supervised" else (
        "labeled images, and as many unlabeled images and CutMix partners"
    )  # fmt: skip
    accumulated = f" x {micro} micro-batches accumulated" if micro > 1 else ""
    return (
        f"dssn: global batch {batch} a worker x {workers} worker{'s' * (workers != 1)}"
        f"{accumulated} = {batch * workers * micro} {what}, a step; {per_epoch} steps an "
        f"epoch, {per_epoch * cfg.train.epochs} in all"
    )


def train_cpus(cfg: Config) -> float:
    return cfg.train.workers * cfg.train.cpus_per_worker


def local_cpus(cfg: Config) -> int:
    """Logical CPUs of a local Ray instance for ``cfg``: the train workers' plus one per core
    (at least ``MIN_FREE_DATA_CPUS``) for Ray Data.

    Ray Data's logical CPUs cap how many read / augment tasks run at once; they reserve
    nothing. Whenever the train workers wait (each epoch's first batches, evaluation) every
    core can augment; while they train, Ray Data's backpressure keeps the tasks to what
    training consumes. Counting only the CPUs the workers leave (the rule until 2026-12-07)
    ran one task at a time on a 2-core machine with two workers, even while both waited for
    their epoch's first batches (README "Scaling").
    """
    cores = os.cpu_count() or 1
    return math.ceil(train_cpus(cfg)) + max(cores, MIN_FREE_DATA_CPUS)


def ensure_ray(cfg: Config) -> bool:
    """Connect to Ray: the running one, ``RAY_ADDRESS``'s cluster, or a new local instance
    with :func:`local_cpus` logical CPUs (they may exceed the cores). Returns True when this
    call started Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        init_ray()  # joins the cluster named by RAY_ADDRESS
        return True
    start_local_ray(local_cpus(cfg))
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(num_cpus: int, **kwargs) -> None:
    """A local Ray instance whose State API its own processes find.

    Ray Train's placement-group cleaner asks the State API (served by the dashboard, from
    ``ray[default]``) whether the Train controller still lives. Left to auto-detect "the" local
    cluster, it fails when several Ray instances run on the machine ("Found multiple active
    Ray instances") or asks the wrong one. So the dashboard gets a known port and
    ``RAY_API_SERVER_ADDRESS`` names it in the environment the Ray processes inherit.
    """
    port = free_port()
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    # Ray Data's progress bars, streamed from every worker to the driver, drown the training
    # log lines (which report images/s and data wait); set it to 0 to see them
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train 2.60 starts an actor per worker group that polls the GCS for nodes being drained
    # (spot preemption); one local node is never drained. Its start also logs an "E ...
    # core_worker.cc ... PreemptionWatcher ... max_restarts > 0" line. Clusters keep it.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    init_ray(num_cpus=num_cpus, include_dashboard=True, dashboard_port=port, **kwargs)


def init_ray(**kwargs) -> None:
    """``ray.init(**kwargs)`` with Ray Data's fixes (``dssn.data.pacing``: idle scheduling loops
    paced, CPU budgets floored) in every process of the job, and, for a new local instance,
    ``IDLE_WORKERS`` idle worker processes kept alive."""
    import ray

    from dssn.data import pacing

    if "address" not in kwargs and not os.environ.get("RAY_ADDRESS"):  # a new local instance
        # Ray keeps at most num_cpus idle workers and kills the rest after 1 s; the read /
        # augment tasks of a run's three Ray Data streams then start a fresh Python (~3 CPU-s
        # of imports) every few seconds: ~15% of a 2-core machine. Keep a few more.
        cpus = int(kwargs.get("num_cpus") or os.cpu_count() or 1)
        os.environ.setdefault(WORKER_LIMIT_ENV, str(max(cpus, IDLE_WORKERS)))
    pacing.install()  # this process's own Ray Data pipelines
    ray.init(runtime_env=pacing.runtime_env(kwargs.pop("runtime_env", None)), **kwargs)


def check_resources(cfg: Config) -> None:
    """Fail early, with the fix, when the cluster cannot run the workers and Ray Data."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if cpus - train_cpus(cfg) < MIN_FREE_DATA_CPUS:
        raise ConfigError(
            f"train.workers={cfg.train.workers} × train.cpus_per_worker="
            f"{cfg.train.cpus_per_worker} leaves {cpus - train_cpus(cfg):g} of the cluster's "
            f"{cpus:g} CPUs for Ray Data, which needs at least {MIN_FREE_DATA_CPUS} or waits "
            "forever: lower train.cpus_per_worker (e.g. 0.5; threads_per_worker sets torch "
            "threads) or add CPUs"
        )
    need_gpus = cfg.train.workers * cfg.train.gpus_per_worker
    if need_gpus > gpus:
        raise ConfigError(
            f"train.workers={cfg.train.workers} × train.gpus_per_worker="
            f"{cfg.train.gpus_per_worker} needs {need_gpus:g} GPUs; the cluster has {gpus:g}"
        )


def build_trainer(cfg: Config):
    """The TorchTrainer for ``cfg`` (datasets from ``build_datasets``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dssn.data.pipeline import TRAIN_STREAMS, build_datasets
    from dssn.train.loop import train_loop_per_worker

    cfg = resolve_paths(cfg)
    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg),
            storage_path=storage_path(cfg),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=max(1, cfg.train.keep_checkpoints),
                # the best epoch's checkpoint is kept by score; the latest is always kept
                checkpoint_score_attribute="teacher_miou",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        # the workers read val rows themselves (iter_val_samples), so only the training
        # streams go to Ray Train (each gets a streaming split coordinator)
        datasets={k: v for k, v in build_datasets(cfg).items() if k in TRAIN_STREAMS},
    )


EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$", re.M)


def failure_causes(error: BaseException) -> list[str]:
    """One line per failed worker of a Ray Train run: "rank R: Type: message" of the error
    that caused it. Ray's own message shows a truncated snippet of each worker's traceback, in
    which the cause (a ShardError naming a damaged file, say) is often cut off. Each worker's
    whole traceback text is searched: the last exception of this package (``dssn.…``) in the
    chain, else the first exception (the root of a chain is printed first)."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures and hasattr(error, "controller_failure"):
        failures = {"controller": error.controller_failure}
    lines = []
    for rank, failure in sorted(failures.items()):  # ranks, or the controller alone
        found = EXCEPTION_LINE.findall(str(failure))
        ours = [(name, text) for name, text in found if name.startswith("dssn.")]
        if ours or found:
            name, text = (ours or found)[-1 if ours else 0]
            cause = f"{name.rsplit('.', 1)[-1]}: {text.strip()}"
        else:
            cause = f"{type(failure).__name__}: {str(failure).strip() or '(no message)'}"
        lines.append(f"rank {rank}: {cause}" if rank != "controller" else f"controller: {cause}")
    return lines


def fit(cfg: Config, *, resume: bool = True):
    """Run (or continue) the training run of ``cfg``; return the ``ray.train.Result``.

    resume=False refuses to touch an existing run of the same name and storage.
    """
    if not resume and run_exists(cfg):
        raise FileExistsError(
            f"{run_dir(cfg)} already holds a run: pass another train.name / --name, remove "
            "it, or resume it"
        )
    cfg = resolve_paths(cfg)
    continuing = run_exists(cfg)
    ensure_ray(cfg)
    check_resources(cfg)
    config_path = save_config(cfg)
    verb = "continuing" if continuing else "starting"
    print(f"dssn: {verb} run {run_dir(cfg)} (config: {config_path})", flush=True)
    if cfg.train.tensorboard and "://" not in run_dir(cfg):
        print(f"dssn: curves while it trains: tensorboard --logdir {run_dir(cfg)}", flush=True)
    result = build_trainer(cfg).fit()
    print(f"dssn: results in {run_dir(cfg)}", flush=True)
    if result.checkpoint is not None:
        print(f"dssn: latest checkpoint {result.checkpoint.path}", flush=True)
    return result
