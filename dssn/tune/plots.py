"""Plots of a search (PNG, matplotlib Agg): mIoU per epoch of every trial, each searched
parameter against the best mIoU, and Optuna's parameter importances.

    made, notes = plot_all(exp, table, out_dir)  # {"curves": path, ...}, [why one is missing]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dssn.train.history import pyplot
from dssn.tune.space import Param

MIN_TRIALS_FOR_IMPORTANCE = 2  # importances compare trials: one trial has nothing to compare
DPI = 120
PANEL_SIZE = (4.0, 3.2)  # inches per subplot
MAX_LEGEND_TRIALS = 12  # beyond this a legend hides the curves


def plot_curves(exp: Any, table: pd.DataFrame, path: Path) -> Path:
    """Teacher and student mIoU per epoch, one line per trial; ASHA-stopped trials end in x."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL_SIZE[0] + 1, PANEL_SIZE[1]), sharey=True)
    stopped = dict(zip(table["trial"], table["stopped_early"], strict=True))
    for trial in exp.trials:
        h = trial.history
        for ax, column in zip(axes, ("teacher_miou", "student_miou"), strict=True):
            if column not in h or h[column].dropna().empty:
                continue
            (line,) = ax.plot(h["epoch"], 100 * h[column], marker=".", label=trial.trial_id)
            if stopped.get(trial.trial_id):
                ax.plot(h["epoch"].iloc[-1], 100 * h[column].iloc[-1], "x", color=line.get_color())
    for ax, title in zip(axes, ("teacher", "student"), strict=True):
        ax.set_title(f"{title} mIoU per epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    labelled = [ax for ax in axes if ax.get_lines()]
    if labelled and len(exp.trials) <= MAX_LEGEND_TRIALS:
        labelled[-1].legend(fontsize=7, title="trial (x: stopped by ASHA)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_params(space: dict[str, Param], table: pd.DataFrame, metric: str, path: Path) -> Path:
    """One panel per searched parameter: its value against the trial's best ``metric``."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    names = list(space) or [c for c in table.columns if c not in _RESULT_COLUMNS]
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * PANEL_SIZE[0], rows * PANEL_SIZE[1]), squeeze=False
    )
    y = table[f"best_{metric}"]
    full = ~table["stopped_early"].astype(bool)
    for ax, name in zip(axes.flat, names, strict=False):
        x = table[name]
        param = space.get(name)
        categorical = (param is not None and param.kind == "choice") or x.dtype == object
        if categorical:
            labels = [str(v) for v in (param.values if param else sorted(set(map(str, x))))]
            x = x.map(lambda v, labels=labels: labels.index(str(v)) if str(v) in labels else -1)
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.scatter(x[full], y[full], label="all epochs")
        ax.scatter(x[~full], y[~full], facecolors="none", edgecolors="C3", label="stopped early")
        if param is not None and param.kind == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap
        if param is not None and param.kind != "choice":
            ax.set_xlim(*param.values)  # the whole searched range: where did the trials fall
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {metric} (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


_RESULT_COLUMNS = {
    "rank", "trial", "best_teacher_miou", "final_teacher_miou", "best_student_miou",
    "final_student_miou", "best_epoch", "epochs", "stopped_early", "status", "wall_s",
    "checkpoint",
}  # fmt: skip


def importances(
    space: dict[str, Param], table: pd.DataFrame, metric: str
) -> tuple[dict[str, float] | None, str]:
    """Parameter importances for the best ``metric``: Optuna's evaluator on a study rebuilt
    from the trials, else a random forest's impurity importances (scikit-learn).

    Returns (importances or None, how they were computed or why there are none).
    """
    done = table[table[f"best_{metric}"].notna()]
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (
            f"importances need at least {MIN_TRIALS_FOR_IMPORTANCE} trials with an evaluated "
            f"epoch; this search has {len(done)}"
        )
    if not space:
        return None, "importances need the search space (search.json of a dssn search)"
    try:
        return _optuna_importances(space, done, metric), "Optuna fANOVA"
    except Exception as e:  # optuna refuses e.g. constant values: fall back, say why
        reason = f"{type(e).__name__}: {e}"
    try:
        return _forest_importances(space, done, metric), (
            f"random-forest impurity (scikit-learn; Optuna's fANOVA failed: {reason})"
        )
    except Exception as e:
        return None, f"no importances: Optuna failed ({reason}); scikit-learn failed ({e})"


def _optuna_importances(space: dict[str, Param], done: pd.DataFrame, metric: str):
    import optuna

    from dssn.tune.space import to_optuna

    distributions = to_optuna(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in done.iterrows():
        params = {name: _native(row[name]) for name in space}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, value=float(row[f"best_{metric}"])
            )
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def _forest_importances(space: dict[str, Param], done: pd.DataFrame, metric: str):
    from sklearn.ensemble import RandomForestRegressor

    features = pd.DataFrame(
        {
            name: (done[name].astype(str).astype("category").cat.codes
                   if space[name].kind == "choice" else done[name].astype(float))
            for name in space
        }
    )  # fmt: skip
    forest = RandomForestRegressor(n_estimators=64, random_state=0)
    forest.fit(features.to_numpy(), done[f"best_{metric}"].to_numpy())
    return dict(zip(space, map(float, forest.feature_importances_), strict=True))


def _native(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def plot_importance(values: dict[str, float], method: str, path: Path) -> Path:
    plt = pyplot()
    names = sorted(values, key=values.get)
    fig, ax = plt.subplots(figsize=PANEL_SIZE)
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel("importance")
    ax.set_title(f"parameter importance: {method.split(' (')[0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_all(exp: Any, table: pd.DataFrame, out_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Every plot into ``out_dir``; returns what was written and notes on what was not."""
    made: dict[str, Path] = {}
    notes: list[str] = []
    evaluated = table[table[f"best_{exp.metric}"].notna()]
    if evaluated.empty:
        return made, ["no plots: no trial has evaluated an epoch yet"]
    made["curves"] = plot_curves(exp, table, out_dir / "curves.png")
    made["params"] = plot_params(exp.space, evaluated, exp.metric, out_dir / "params.png")
    values, method = importances(exp.space, table, exp.metric)
    if values is None:
        notes.append(method)
    else:
        made["importance"] = plot_importance(values, method, out_dir / "importance.png")
        notes.append("importances by " + method)
    return made, notes
