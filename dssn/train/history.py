"""A run's epochs, one record each: ``history.csv`` and ``curves.png`` beside a finished run's
summary, and the mIoU curves of several runs for ``dssn compare --out``.

The records travel in every checkpoint's ``state.json`` (``TrainState.history``): a resumed run
keeps the epochs before its restart, and a run on a storage URI needs no extra file.

    record = epoch_record(state, train_metrics, evaluated)   # rank 0, after each epoch
    paths = write_history(history, run_dir, title)           # history.csv, curves.png
    plot_runs({"dssn": hist_a, "threshold": hist_b}, path)   # teacher / student mIoU per step
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dssn.config import Config
    from dssn.train.state import TrainState

HISTORY_CSV = "history.csv"
CURVES_PNG = "curves.png"
COMPARE_PNG = "compare.png"
FIRST = ("epoch", "iteration", "evaluated", "teacher_miou", "student_miou", "restarts")
# wall-clock stamps for benchmarks reading machine counters; the CSV has epoch_time_s
LEFT_OUT = ("steady_start_unix", "epoch_end_unix")
# loss curves: (label, the step's metrics averaged into it)
LOSSES = (
    ("total", ("loss",)),
    ("labeled", ("loss_x",)),
    ("strong views", ("loss_s1", "loss_s2")),
    ("feature perturbation", ("loss_fa", "loss_fb")),
    ("consistency", ("loss_img", "loss_feat")),
)
DPI = 120
PANEL = (4.2, 3.2)  # inches per subplot


def epoch_record(state: TrainState, train: dict[str, Any], evaluated: bool) -> dict[str, Any]:
    """One finished epoch: position, this epoch's evaluation (None where it had none), the
    training metrics of ``train_one_epoch`` (losses, mask ratio, lr, images/s, data wait)."""
    record = {
        "epoch": state.epoch,
        "iteration": state.iteration,
        "evaluated": evaluated,
        "teacher_miou": state.teacher_miou if evaluated else None,
        "student_miou": state.student_miou if evaluated else None,
        "restarts": state.restarts,
        "nan_skipped": state.nan_skipped,
        "overflow_skipped": state.overflow_skipped,
    }
    record.update((k, v) for k, v in train.items() if k not in LEFT_OUT)
    return record


def columns(history: list[dict[str, Any]]) -> list[str]:
    """FIRST, then every other key in the order it first appears."""
    seen = [k for k in FIRST if any(k in r for r in history)]
    for record in history:
        seen.extend(k for k in record if k not in seen)
    return seen


def write_csv(history: list[dict[str, Any]], path: Path) -> Path:
    keys = columns(history)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        for record in history:
            writer.writerow({k: "" if record.get(k) is None else record[k] for k in keys})
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """``history.csv`` back as records: numbers as float, empty cells as None."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: _value(v) for k, v in row.items()})
    return out


def _value(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def write_history(history: list[dict[str, Any]], run_dir: str | Path, title: str) -> list[Path]:
    """``history.csv`` and ``curves.png`` in ``run_dir``; [] for an empty history."""
    if not history:
        return []
    run_dir = Path(run_dir)
    return [
        write_csv(history, run_dir / HISTORY_CSV),
        plot_run(history, run_dir / CURVES_PNG, title),
    ]


def write_run_history(checkpoint_dir: str | Path, cfg: Config) -> list[Path]:
    """:func:`write_history` of a run from its latest checkpoint (a local directory) into the
    run directory, titled with the run's name and method."""
    from dssn.train import checkpoint as ckpt
    from dssn.train.launcher import run_dir

    history = ckpt.read_state(checkpoint_dir).get("history") or []
    how = f"method {cfg.method}"
    if cfg.method != "supervised":
        how += f", selection {cfg.dssn.selection}"
    return write_history(history, run_dir(cfg), f"{Path(run_dir(cfg)).name} ({how})")


def pyplot():
    """matplotlib.pyplot on the Agg backend (also used by ``dssn.tune.plots``)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster head node or in tests
    import matplotlib.pyplot as plt

    return plt


def _series(history: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[list, list]:
    """(epochs, mean of ``keys``) over the records that have all of them, finite."""
    xs, ys = [], []
    for r in history:
        values = [r.get(k) for k in keys]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            xs.append(r["epoch"])
            ys.append(sum(values) / len(values))
    return xs, ys


def _restarts(ax, history: list[dict[str, Any]]) -> None:
    """A dotted line before each epoch that a resumed attempt ran first."""
    previous = (history[0].get("restarts") or 0) if history else 0
    for r in history[1:]:
        if (r.get("restarts") or 0) > previous:
            ax.axvline(r["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
        previous = r.get("restarts") or 0


def plot_run(history: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Four panels over the epochs: teacher and student mIoU (best teacher epoch starred),
    the loss terms, the share of pseudo-labels kept, and images/s with the data-wait share.
    Resumes are dotted lines."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (acc, loss, kept, speed) = plt.subplots(1, 4, figsize=(4 * PANEL[0] + 0.6, PANEL[1]))
    for who, style in (("teacher", "-o"), ("student", "--s")):
        xs, ys = _series(history, (f"{who}_miou",))
        if xs:
            acc.plot(xs, [100 * y for y in ys], style, markersize=3, label=who)
    xs, ys = _series(history, ("teacher_miou",))
    if xs:
        best = max(range(len(ys)), key=lambda i: ys[i])
        acc.plot(xs[best], 100 * ys[best], "*", markersize=11, color="tab:blue")
        acc.set_title(
            f"mIoU: teacher best {100 * ys[best]:.1f} (epoch {xs[best]}), final {100 * ys[-1]:.1f}",
            fontsize=9,
        )
        acc.legend(fontsize=8)
    else:
        acc.set_title("mIoU (no evaluation yet)", fontsize=9)
    acc.set_ylabel("mIoU (%)")
    positive = True
    for label, keys in LOSSES:
        xs, ys = _series(history, keys)
        if xs:
            loss.plot(xs, ys, marker=".", label=label)
            positive = positive and min(ys) > 0
    if loss.get_lines():
        if positive:
            loss.set_yscale("log")
        loss.legend(fontsize=7)
    loss.set_title("loss terms (epoch means, before their weights)", fontsize=9)
    xs, ys = _series(history, ("mask_ratio",))
    kept.plot(xs, [100 * y for y in ys], marker=".", color="tab:purple")
    kept.set_ylim(0, 100)
    kept.set_ylabel("% of valid unlabeled pixels")
    kept.set_title("pseudo-labels selected (student, weak view)", fontsize=9)
    xs, ys = _series(history, ("images_per_s",))
    speed.plot(xs, ys, marker=".", color="tab:green", label="images/s")
    speed.set_ylim(bottom=0)
    speed.set_ylabel("images/s", color="tab:green")
    wait = speed.twinx()
    xs, ys = _series(history, ("data_wait",))
    wait.plot(xs, [100 * y for y in ys], marker=".", color="tab:red", linestyle="--")
    wait.set_ylabel("waiting for data (% of epoch)", color="tab:red")
    wait.set_ylim(bottom=0)
    speed.set_title("throughput", fontsize=9)
    for ax in (acc, loss, kept, speed):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _restarts(ax, history)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def plot_runs(histories: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Teacher and student mIoU of several runs against the iteration (runs of different epoch
    lengths line up), one line per run."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL[0] + 1, PANEL[1]), sharey=True)
    for name, history in histories.items():
        for ax, who in zip(axes, ("teacher", "student"), strict=True):
            points = [
                (r["iteration"], 100 * r[f"{who}_miou"])
                for r in history
                if isinstance(r.get(f"{who}_miou"), (int, float))
                and math.isfinite(r[f"{who}_miou"])
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=name)
    for ax, who in zip(axes, ("teacher", "student"), strict=True):
        ax.set_title(f"{who} mIoU", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    if axes[0].get_lines():
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)
