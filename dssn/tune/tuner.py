"""The hyperparameter search: Ray Tune + OptunaSearch (TPE) + ASHA, one TorchTrainer per trial.

    path = run_search(cfg)                 # runs (or, resume=True, continues) the search
    summarize(path)                        # dssn.tune.results: tables, plots, best config

Ray Train V2 way (``Tuner(TorchTrainer)`` is gone in Ray 2.60): each trial is a Tune *function*
trainable, :func:`run_trial`, that builds the trial's Config from the sampled parameters and
runs a TorchTrainer from it. ``TuneReportCallback`` forwards every epoch's report (rank 0's
metrics) from the Train controller to Tune, where ASHA compares trials by epoch. When ASHA stops
a trial, Tune ends the trial's function; its Train controller and workers go with it, and Ray
Train's placement-group cleaner (part of ``ray[default]``) frees the workers' resources.

Resources. A trial's function asks Tune only for ``tune.trial_cpus``; its Train workers are
separate actors in their own placement group (``workers x (cpus_per_worker, gpus_per_worker)``)
and its Ray Data tasks need CPUs besides (``tune.data_cpus``). Tune sees none of those, so the
number of trials running at once is derived here from the cluster's resources
(:func:`concurrent_trials`): enough room for every running trial's workers *and* its data
pipeline, so trials never starve Ray Data.

Layout of an experiment directory ``<storage>/<name>``::

    config.yaml          the search's base config        search.json   space, fixed values, ASHA
    tuner.pkl, experiment_state-*.json, searcher-state-*.pkl       Tune's state (for --resume)
    trial_<id>/          Tune's files of one trial (params.json, result.json, progress.csv)
    trial_<id>/train/    the trial's Ray Train run: config.yaml, checkpoints
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from dssn.config import Config, ConfigError, from_dict, set_values
from dssn.train.launcher import init_ray, start_local_ray
from dssn.tune import files
from dssn.tune.space import (
    apply_params,
    asha_grace,
    build_space,
    fixed_values,
    format_space,
    max_epochs,
    space_to_dict,
    to_tune,
)

SEARCH_FILE = "search.json"
CONFIG_FILE = "config.yaml"
TIME_ATTR = "epoch"  # ASHA compares trials at epochs (survives a Train restart, unlike iterations)
TRAIN_RUN_NAME = "train"  # a trial's Train run: <experiment>/trial_<id>/train
EPS = 1e-9  # float slack when dividing resources


# ----------------------------------------------------------------------------- names and paths


def experiment_name(cfg: Config) -> str:
    """``tune.name``, else ``<name>-tune``."""
    return cfg.tune.name or f"{cfg.name}-tune"


def experiment_storage(cfg: Config) -> str:
    """``tune.storage_path``, else ``train.storage`` (absolute path or URI)."""
    return files.absolute(cfg.tune.storage_path or cfg.train.storage)


def experiment_path(cfg: Config) -> str:
    return f"{experiment_storage(cfg)}/{experiment_name(cfg)}"


def trial_dirname(trial: Any) -> str:
    """Tune's directory of a trial: ``trial_<id>`` (short, and findable from the trial id)."""
    return f"trial_{trial.trial_id}"


# ----------------------------------------------------------------------------- resources


def trial_demand(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) one running trial occupies: its Train workers, its Ray Data tasks, itself."""
    t = cfg.train
    cpus = t.workers * t.cpus_per_worker + cfg.tune.data_cpus + cfg.tune.trial_cpus
    return cpus, t.workers * t.gpus_per_worker


def concurrent_trials(cfg: Config, cluster_cpus: float, cluster_gpus: float) -> int:
    """How many trials may run at once: ``tune.max_concurrent_trials`` if set, else as many as
    the cluster holds with room for every trial's workers and data pipeline (at most
    ``num_samples``). Raises ConfigError when not even one trial fits."""
    if cfg.tune.max_concurrent_trials is not None:
        if cfg.tune.max_concurrent_trials < 1:
            raise ConfigError("tune.max_concurrent_trials must be at least 1")
        return min(cfg.tune.max_concurrent_trials, cfg.tune.num_samples)
    cpus, gpus = trial_demand(cfg)
    fits = math.floor(cluster_cpus / cpus + EPS)
    if gpus > 0:
        fits = min(fits, math.floor(cluster_gpus / gpus + EPS))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {cpus:g} CPUs (train.workers={cfg.train.workers} x "
            f"train.cpus_per_worker={cfg.train.cpus_per_worker} + tune.data_cpus="
            f"{cfg.tune.data_cpus} + tune.trial_cpus={cfg.tune.trial_cpus}) and {gpus:g} GPUs; "
            f"the cluster has {cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs. Lower those, "
            "or on an autoscaling cluster (whose nodes appear on demand) set "
            "tune.max_concurrent_trials (--max-concurrent)"
        )
    return min(fits, cfg.tune.num_samples)


def ensure_ray(cfg: Config) -> bool:
    """Connect to Ray: the running one, ``RAY_ADDRESS``'s cluster, or a new local instance with
    logical CPUs for ``tune.max_concurrent_trials`` (default 1) trials. True when started here."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        init_ray()
        return True
    cpus, _ = trial_demand(cfg)
    wanted = cpus * (cfg.tune.max_concurrent_trials or 1)
    # the dashboard's State API lets Ray Train free the workers of trials that ASHA ends
    start_local_ray(max(os.cpu_count() or 1, math.ceil(wanted - EPS)))
    return True


# ----------------------------------------------------------------------------- the trial


def trial_config(base: dict[str, Any], params: dict[str, Any], storage: str, trial_id: str):
    """The Config of one trial: base + fixed values + draws; its Train run in its trial dir."""
    cfg = apply_params(from_dict(base, where="search base config"), params)
    return set_values(
        cfg,
        {"train.storage": f"{storage}/trial_{trial_id}", "train.name": TRAIN_RUN_NAME},
        where="trial run location",
    )


def run_trial(params: dict[str, Any], base: dict[str, Any], storage: str) -> None:
    """The Tune function trainable: one TorchTrainer run with the trial's parameters.

    ``storage``: the experiment directory. The Train run goes to ``<storage>/trial_<id>/train``;
    when Tune restarts the trial (``--resume``), the TorchTrainer finds its own checkpoints
    there and continues from the last finished epoch.

    The TorchTrainer runs in a child task whose environment names this cluster
    (``RAY_ADDRESS`` = its GCS). Ray Train's placement-group cleaner, which frees a trial's
    workers when ASHA ends the trial, inherits that environment and asks the State API of
    *this* cluster whether the Train controller lives; left to auto-detection it fails on a
    machine running several Ray instances, or asks another one, which calls our live controller
    dead and removes its workers mid-run (seen on the shared development machine).
    """
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cfg = trial_config(base, params, storage, ray.tune.get_context().get_trial_id())
    finished = finished_run_metrics(cfg)
    if finished is not None:
        # the Train run ran every epoch, but the search was interrupted before Tune saw the
        # trial end: hand Tune the last epoch's report instead of a run with nothing to do
        ray.tune.report(finished)
        return
    # created here, in the Tune session: it forwards each epoch's report to this trial
    callback = TuneReportCallback()
    here = ray.get_runtime_context()
    fit = ray.remote(fit_trial).options(
        num_cpus=0,  # the trial's CPU (tune.trial_cpus) is held by this function already
        runtime_env={"env_vars": {"RAY_ADDRESS": here.gcs_address}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(here.get_node_id(), soft=True),
        max_retries=0,
    )
    ray.get(fit.remote(cfg.to_dict(), callback))


def finished_run_metrics(cfg: Config) -> dict[str, Any] | None:
    """The last report of the trial's Train run if it already ran all ``train.epochs``
    (read from its checkpoints' ``state.json``); else None."""
    from dssn.train.launcher import finished_run

    finished = finished_run(cfg)
    return None if finished is None else finished[1]["metrics"]


def fit_trial(config: dict[str, Any], callback: Any) -> None:
    """Build the trial's TorchTrainer (dssn.train.launcher) with ``callback`` and run it."""
    from dssn.train.launcher import build_trainer, save_config

    cfg = from_dict(config, where="trial config")
    save_config(cfg)
    trainer = build_trainer(cfg)
    # RunConfig.callbacks is read when fit() starts the controller
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), callback]
    trainer.fit()


# ----------------------------------------------------------------------------- the search


def search_metadata(cfg: Config, concurrent: int) -> dict[str, Any]:
    """What ``dssn results`` needs to know about a search (saved as ``search.json``)."""
    t = cfg.tune
    return {
        "name": experiment_name(cfg),
        "metric": t.metric,
        "mode": "max",
        "space": space_to_dict(build_space(cfg)),
        "fixed": {path: value for path, (value, _) in fixed_values(cfg).items()},
        "max_epochs": max_epochs(cfg),
        "num_samples": t.num_samples,
        "seed": t.seed,
        "asha": t.asha,
        "grace_period": asha_grace(cfg),
        "reduction_factor": t.reduction_factor,
        "max_concurrent_trials": concurrent,
        "trial_demand": dict(zip(("cpus", "gpus"), trial_demand(cfg), strict=True)),
    }


def check_tune_config(cfg: Config) -> None:
    t = cfg.tune
    checks = [
        ("tune.num_samples", t.num_samples >= 1, "must be at least 1"),
        ("tune.grace_period", 1 <= t.grace_period <= max_epochs(cfg), "must be in [1, epochs]"),
        ("tune.reduction_factor", t.reduction_factor >= 2, "must be at least 2"),
        ("tune.data_cpus", t.data_cpus >= 0, "must not be negative"),
        ("tune.trial_cpus", t.trial_cpus >= 0, "must not be negative"),
        ("tune.trial_retries", t.trial_retries >= 0, "must not be negative"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"'{key}' {msg}")
    if not build_space(cfg):
        raise ConfigError("the search space is empty (tune.space removed every parameter)")
    apply_params(cfg, {})  # the fixed values type-check now, not in the first trial


def build_scheduler(cfg: Config):
    """ASHA on ``tune.metric`` by epoch (one that survives ``--resume``), or None (every trial
    runs all epochs)."""
    if not cfg.tune.asha:
        return None
    from dssn.tune.asha import ResumableASHA

    return ResumableASHA(
        time_attr=TIME_ATTR,
        max_t=max_epochs(cfg),
        grace_period=asha_grace(cfg),
        reduction_factor=cfg.tune.reduction_factor,
    )


def build_searcher(cfg: Config):
    """OptunaSearch with a seeded TPE sampler (the space comes from the Tuner's param_space)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed))


def trainable_for(cfg: Config, storage: str):
    """:func:`run_trial` with the base config bound and the trial's own resources."""
    from ray import tune

    bound = tune.with_parameters(run_trial, base=cfg.to_dict(), storage=storage)
    return tune.with_resources(bound, {"cpu": cfg.tune.trial_cpus})


def build_tuner(cfg: Config, concurrent: int, callbacks: list | None = None):
    """A fresh Tuner for ``cfg`` (see :func:`run_search`)."""
    from ray import tune

    path = experiment_path(cfg)
    return tune.Tuner(
        trainable_for(cfg, path),
        param_space=to_tune(build_space(cfg)),
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode="max",
            search_alg=build_searcher(cfg),
            scheduler=build_scheduler(cfg),
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment_name(cfg),
            storage_path=experiment_storage(cfg),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=cfg.tune.trial_retries),
            verbose=1,
        ),
    )


def load_search_config(path: str) -> Config:
    """The base config saved with the search at ``path``."""
    config_path = f"{path}/{CONFIG_FILE}"
    if not files.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: is {path} a dssn search?")
    text = files.read_text(config_path)
    import yaml

    return from_dict(yaml.safe_load(text), where=config_path)


def run_search(cfg: Config, *, resume: bool = False, callbacks: list | None = None) -> str:
    """Run the search of ``cfg`` (or continue it: ``resume=True``); return its directory.

    A new search refuses a directory that already holds one. Resuming reloads the search's own
    base config from the directory (so trials keep the settings they started with): finished
    trials are kept as they are, unfinished ones continue from their last Train checkpoint, and
    Optuna keeps sampling until ``num_samples`` trials exist.
    """
    import ray
    from ray import tune

    path = experiment_path(cfg)
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise FileNotFoundError(f"--resume: no search to resume in {path}")
    if not resume and exists:
        raise FileExistsError(
            f"{path} already holds a search: pass --resume to continue it, or another --name"
        )
    if resume:
        cfg = load_search_config(path)
    check_tune_config(cfg)
    started = ensure_ray(cfg)
    try:
        total = ray.cluster_resources()
        concurrent = concurrent_trials(cfg, total.get("CPU", 0.0), total.get("GPU", 0.0))
        print(format_space(cfg), flush=True)
        print(
            f"dssn tune: {'resuming' if resume else 'starting'} {path}: {cfg.tune.num_samples} "
            f"trials, {concurrent} at a time (each {trial_demand(cfg)[0]:g} CPUs, "
            f"{trial_demand(cfg)[1]:g} GPUs; cluster {total.get('CPU', 0):g} CPUs, "
            f"{total.get('GPU', 0):g} GPUs)",
            flush=True,
        )
        if resume:
            tuner = tune.Tuner.restore(
                path, trainable=trainable_for(cfg, path), resume_unfinished=True,
                resume_errored=True,
            )  # fmt: skip
        else:
            files.write_text(f"{path}/{CONFIG_FILE}", cfg.to_yaml())
            meta = search_metadata(cfg, concurrent)
            files.write_text(f"{path}/{SEARCH_FILE}", json.dumps(meta, indent=1))
            tuner = build_tuner(cfg, concurrent, callbacks)
        tuner.fit()
    finally:
        if started:
            ray.shutdown()
    return path
