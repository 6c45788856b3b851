"""What a search found: one row per trial, best first, as CSV / Parquet / Markdown, plus plots
and the best configuration as a ready-to-train YAML.

    summary = summarize("runs/digits-tune")      # also: dssn results runs/digits-tune
    print(summary.text)                          # the table; summary.paths: what was written

Works on any Ray Tune experiment directory (local path or s3:// / gs:// URI); a dssn search
also has ``search.json`` (space, max epochs, metric) and ``config.yaml`` (the base config), from
which the best configuration is rebuilt. mIoU columns are in percent.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dssn.tune import files
from dssn.tune.asha import read_trial_file
from dssn.tune.space import Param, space_from_dict
from dssn.tune.tuner import CONFIG_FILE, SEARCH_FILE

RESULTS_DIR = "results"  # inside the experiment directory
TABLE_STEM = "trials"
BEST_CONFIG = "best_config.yaml"
TERMINATED, ERROR = "TERMINATED", "ERROR"
ERROR_FILE = "error.txt"  # Tune's record of a failed trial, in its directory
MIOU_DIGITS = 2  # printed mIoU decimals (percent)


@dataclass
class Trial:
    """One trial as read back from the experiment directory."""

    trial_id: str
    status: str  # TERMINATED | ERROR | PENDING | RUNNING | PAUSED
    params: dict[str, Any]
    history: pd.DataFrame  # one row per reported epoch (last report of each epoch kept)
    error: str | None = None  # the last line of its error.txt when it failed


@dataclass
class Experiment:
    path: str
    trials: list[Trial]
    space: dict[str, Param]  # empty for a non-dssn directory (then params come from configs)
    metric: str = "teacher_miou"
    max_epochs: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Summary:
    table: pd.DataFrame
    text: str
    paths: dict[str, str]  # what -> where (local path or URI)
    notes: list[str]
    metric: str = "teacher_miou"

    @property
    def ok(self) -> bool:
        """Whether some trial evaluated at least one epoch."""
        column = f"best_{self.metric}"
        return not self.table.empty and bool(self.table[column].notna().any())


# ----------------------------------------------------------------------------- loading


def load_experiment(path: str) -> Experiment:
    """Read the trials of the Tune experiment at ``path``."""
    from ray.tune import ExperimentAnalysis

    path = files.absolute(path)
    if not files.exists(path):
        raise FileNotFoundError(f"{path}: no such experiment directory")
    try:
        analysis = ExperimentAnalysis(path)
    except (ValueError, FileNotFoundError) as e:
        raise FileNotFoundError(f"{path}: not a Ray Tune experiment directory ({e})") from e
    meta: dict[str, Any] = {}
    if files.exists(f"{path}/{SEARCH_FILE}"):
        meta = json.loads(files.read_text(f"{path}/{SEARCH_FILE}"))
    frames = analysis.trial_dataframes
    trials = []
    for t in analysis.trials:
        history = _history(frames.get(t.trial_id))
        status, error = t.status, None
        # Tune may save its state before the last trials' ends reach it; their error files
        # in the trial directory are the later word
        error_text = read_trial_file(t, ERROR_FILE) if status != TERMINATED else ""
        if error_text:
            status, error = ERROR, error_summary(error_text)
        trials.append(Trial(t.trial_id, status, dict(t.config), history, error))
    return Experiment(
        path=path,
        trials=trials,
        space=space_from_dict(meta.get("space", {})),
        metric=meta.get("metric", "teacher_miou"),
        max_epochs=meta.get("max_epochs"),
        meta=meta,
    )


EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(Error|Exception|Interrupt))(\(.*?\))?: .*")


def error_summary(text: str) -> str:
    """The line naming the cause of a trial's failure: the last exception line outside Ray's
    own wrappers (``ray.exceptions.*``, ``ray.train.*Error``), else the last exception line."""
    found = [m.group(0).strip() for m in map(EXCEPTION_LINE.match, text.splitlines()) if m]
    own = [line for line in found if not line.startswith("ray.")]
    if own or found:
        return (own or found)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _history(frame: pd.DataFrame | None) -> pd.DataFrame:
    """Per-epoch rows (a restarted trial may report an epoch twice: keep the last)."""
    if frame is None or frame.empty or "epoch" not in frame:
        return pd.DataFrame(columns=["epoch"])
    frame = frame.dropna(subset=["epoch"]).copy()
    frame["epoch"] = frame["epoch"].astype(int)
    wall = frame["time_this_iter_s"].sum() if "time_this_iter_s" in frame else math.nan
    out = frame.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    out.attrs["wall_s"] = float(wall)  # every report's time, restarts included
    return out


# ----------------------------------------------------------------------------- the table


def _best(history: pd.DataFrame, column: str) -> float:
    if column not in history or history[column].dropna().empty:
        return math.nan
    return 100 * float(history[column].max())


def _final(history: pd.DataFrame, column: str) -> float:
    if column not in history or history[column].dropna().empty:
        return math.nan
    return 100 * float(history[column].dropna().iloc[-1])


def param_names(exp: Experiment) -> list[str]:
    """The searched parameters (from search.json, else every key of the trials' configs)."""
    if exp.space:
        return list(exp.space)
    names: list[str] = []
    for t in exp.trials:
        names += [k for k in t.params if k not in names]
    return names


def trial_table(exp: Experiment) -> pd.DataFrame:
    """One row per trial, best first (by the best ``metric`` over its epochs)."""
    max_epochs = exp.max_epochs or max(
        (int(t.history["epoch"].max()) for t in exp.trials if len(t.history)), default=0
    )
    rows = []
    for t in exp.trials:
        h = t.history
        epochs = int(h["epoch"].max()) if len(h) else 0
        metric = exp.metric
        best_epoch = (
            int(h.loc[h[metric].idxmax(), "epoch"])
            if metric in h and h[metric].notna().any()
            else None
        )
        row: dict[str, Any] = {"trial": t.trial_id}
        row.update({name: t.params.get(name) for name in param_names(exp)})
        row.update(
            {
                f"best_{metric}": _best(h, metric),
                "best_teacher_miou": _best(h, "teacher_miou"),
                "final_teacher_miou": _final(h, "teacher_miou"),
                "best_student_miou": _best(h, "student_miou"),
                "final_student_miou": _final(h, "student_miou"),
                "best_epoch": best_epoch,
                "epochs": epochs,
                "stopped_early": t.status == TERMINATED and 0 < epochs < max_epochs,
                "status": t.status,
                "wall_s": round(h.attrs.get("wall_s", math.nan), 1),
                "checkpoint": _final_str(h, "checkpoint_path"),
            }
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(f"best_{exp.metric}", ascending=False, na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def _final_str(history: pd.DataFrame, column: str) -> str | None:
    if column not in history or history[column].dropna().empty:
        return None
    return str(history[column].dropna().iloc[-1])


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def display_rows(table: pd.DataFrame) -> list[list[str]]:
    """Header + rows for printing: mIoU with fixed decimals, no checkpoint path."""
    columns = [c for c in table.columns if c != "checkpoint"]
    rows = [columns]
    for _, r in table.iterrows():
        cells = []
        for c in columns:
            v = r[c]
            if c.endswith("_miou") and isinstance(v, float) and not math.isnan(v):
                cells.append(f"{v:.{MIOU_DIGITS}f}")
            else:
                cells.append(_cell(v))
        rows.append(cells)
    return rows


def to_text(rows: list[list[str]]) -> str:
    """Aligned plain text (first column left, the rest right)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_markdown(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- best config


def best_config_yaml(exp: Experiment, table: pd.DataFrame) -> str | None:
    """The best trial's full resolved config as YAML, ready for ``dssn train``; None when the
    directory is not a dssn search or no trial evaluated an epoch."""
    import yaml

    from dssn.config import from_dict
    from dssn.tune.space import apply_params

    metric_col = f"best_{exp.metric}"
    config_path = f"{exp.path}/{CONFIG_FILE}"
    if table.empty or table[metric_col].isna().all() or not files.exists(config_path):
        return None
    best = table.iloc[0]
    base = from_dict(yaml.safe_load(files.read_text(config_path)), where=config_path)
    params = {name: best[name] for name in exp.space}
    cfg = apply_params(base, params)
    # a fresh run name: ``dssn train`` with the trial's own name would continue that trial
    cfg.train.name = f"{exp.meta.get('name', base.name)}-best"
    cfg.train.storage = base.train.storage
    header = (
        f"# best trial {best['trial']} of {exp.path}: {exp.metric} "
        f"{best[metric_col]:.{MIOU_DIGITS}f} (epoch {best['best_epoch']} of {best['epochs']})\n"
        f"# train it: dssn train --config {BEST_CONFIG}\n"
    )
    return header + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- everything


def summarize(path: str, out: str | None = None, plots: bool = True) -> Summary:
    """Table (printed form + CSV/Parquet/Markdown), plots and best config of the search at
    ``path``, written to ``out`` (default ``<path>/results``)."""
    from dssn.tune import plots as plotting

    exp = load_experiment(path)
    out = files.absolute(out) if out else f"{exp.path}/{RESULTS_DIR}"
    table = trial_table(exp)
    notes: list[str] = []
    if table.empty:
        notes.append("no trials in this experiment yet")
    notes += [f"trial {t.trial_id} failed: {t.error}" for t in exp.trials if t.error]
    notes += unfinished_notes(exp)
    rows = display_rows(table) if not table.empty else [["trial"], ["-"]]
    text = to_text(rows)
    # write locally, then upload when ``out`` is a URI
    local = Path(out) if not files.is_uri(out) else Path(tempfile.mkdtemp(prefix="dssn-results-"))
    local.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["csv"] = local / f"{TABLE_STEM}.csv"
    table.to_csv(written["csv"], index=False)
    written["parquet"] = local / f"{TABLE_STEM}.parquet"
    _parquet_ready(table).to_parquet(written["parquet"], index=False)
    written["markdown"] = local / f"{TABLE_STEM}.md"
    written["markdown"].write_text(to_markdown(rows) + "\n")
    best_yaml = best_config_yaml(exp, table)
    if best_yaml is None:
        notes.append("no best config: not a dssn search, or no trial finished an epoch")
    else:
        written["best_config"] = local / BEST_CONFIG
        written["best_config"].write_text(best_yaml)
    if plots and not table.empty:
        made, plot_notes = plotting.plot_all(exp, table, local)
        written.update(made)
        notes += plot_notes
    if files.is_uri(out):
        files.upload_dir(local, out)
    paths = {k: f"{out}/{p.name}" for k, p in written.items()}
    return Summary(table=table, text=text, paths=paths, notes=notes, metric=exp.metric)


def unfinished_notes(exp: Experiment) -> list[str]:
    """A note when the search stopped before it ended (Ctrl-C, a lost driver): trials that
    did not finish, or fewer trials than ``num_samples``, and the command that continues it."""
    open_trials = [t for t in exp.trials if t.status not in (TERMINATED, ERROR)]
    planned = int(exp.meta.get("num_samples") or len(exp.trials))
    if not open_trials and len(exp.trials) >= planned:
        return []
    storage, _, name = str(exp.path).rstrip("/").rpartition("/")
    return [
        f"the search stopped before it ended: {len(exp.trials) - len(open_trials)} of {planned} "
        f"trials finished; `dssn tune --config {exp.path}/{CONFIG_FILE} --storage {storage} "
        f"--name {name} --resume` continues it (unfinished trials from their last checkpoint)"
    ]


def _parquet_ready(table: pd.DataFrame) -> pd.DataFrame:
    """Parameter columns mixing types (a choice of numbers and strings) as strings."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object and len({type(v) for v in out[c].dropna()}) > 1:
            out[c] = out[c].map(lambda v: None if v is None else str(v))
    return out


def report(summary: Summary) -> str:
    """The summary as printed at the end of a search and by ``dssn results``."""
    lines = [summary.text, ""]
    for what, where in summary.paths.items():
        lines.append(f"{what:>11}: {where}")
    lines += [f"note: {n}" for n in summary.notes]
    return "\n".join(lines)
