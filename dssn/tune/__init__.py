"""Hyperparameter search on Ray Tune + Optuna (TPE) + ASHA, one TorchTrainer per trial.

    from dssn.tune import run_search, summarize
    path = run_search(cfg)            # dssn.tune.tuner: the search (resume=True continues one)
    print(summarize(path).text)       # dssn.tune.results: table, plots, best config

``space`` holds the search space, ``tuner`` the Tuner, ``asha`` the scheduler, ``results`` and
``plots`` what a search found, ``experiment`` the scripts in ``experiments/``, ``cli`` the
``dssn tune`` / ``dssn results`` commands. Ray is imported lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_search", "summarize"]


def __getattr__(name: str) -> Any:
    if name == "run_search":
        from dssn.tune.tuner import run_search

        return run_search
    if name == "summarize":
        from dssn.tune.results import summarize

        return summarize
    raise AttributeError(f"module 'dssn.tune' has no attribute {name!r}")
