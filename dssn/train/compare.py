"""Side by side per-class IoU of finished runs: ``dssn compare RUN_DIR [RUN_DIR ...]``.

Reads each run's ``summary.json`` (written by ``dssn train`` when a run ends) and prints one
column per run: the teacher's final-epoch IoU per class (``--which best`` for its best epoch),
the mIoU, and the mean over the rarest classes of the dataset's training prior (digits: the
three rarest digits), where a single global confidence threshold is expected to fall short.
Below it, the settings that differ between the runs (their ``config.yaml``; name and storage
left out), and, where a recipe was run with several seeds, each recipe's mean ± standard
deviation over its runs. With ``--out DIR`` it also writes both tables (CSV, Markdown) and ``compare.png``:
the runs' teacher and student mIoU against the iteration, from their ``history.csv``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dssn.config import ConfigError, load_config
from dssn.data.format import ShardError, read_dataset_info
from dssn.train import history
from dssn.train.metrics import mean_iou
from dssn.train.summary import SUMMARY_STEM
from dssn.train.tables import class_names_for, iou_rows, to_text, write_tables

RAREST = 3  # classes averaged in the "rarest" row
WHERE_KEYS = ("train.name", "train.storage")  # where a run is kept, not how it trained
# draws of the same recipe: runs that differ only here are repeats, summarised over seeds
SEED_KEYS = ("train.seed", "data.seed", "tune.seed")


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """(metrics of the last epoch, resolved Config) of a finished run directory."""
    run_dir = Path(run_dir)
    path = run_dir / f"{SUMMARY_STEM}.json"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir}: no {path.name} (written when `dssn train` finishes a run): is the run "
            "finished, and is this its directory (<storage>/<name>)?"
        )
    return json.loads(path.read_text()), load_config(run_dir / "config.yaml")


def rarest_classes(info: dict | None, n: int = RAREST) -> list[int]:
    """Class ids of the ``n`` rarest classes: by the dataset's ``class_prior`` (the digits:
    foreground classes only, background is 0), else by its ``class_pixels`` (``dssn prepare``:
    pixels over the labeled and val masks; classes no mask holds left out). [] when the dataset
    has neither, or no more than ``n`` classes to choose from."""
    prior = (info or {}).get("class_prior")
    if prior:
        order = sorted(range(len(prior)), key=lambda i: prior[i])
        return [i + 1 for i in order[:n]]
    pixels = (info or {}).get("class_pixels") or []
    present = [i for i, count in enumerate(pixels) if count > 0]
    if len(present) <= n:
        return []
    return sorted(present, key=lambda i: pixels[i])[:n]


def compare_rows(runs: dict[str, tuple[dict[str, Any], Any]], which: str = "final"):
    """Header + per-class rows + mIoU (+ rarest-classes row) with one column per run."""
    key = "teacher_iou" if which == "final" else "best_teacher_iou"
    cfgs = [cfg for _, cfg in runs.values()]
    classes = {cfg.model.num_classes for cfg in cfgs}
    if len(classes) != 1:
        raise ConfigError(f"the runs have different class counts {sorted(classes)}")
    try:
        info = read_dataset_info(cfgs[0].data.root)
    except ShardError:
        info = None
    names = class_names_for(classes.pop(), info)
    columns = {name: metrics[key] for name, (metrics, _) in runs.items()}
    rows = iou_rows(names, columns)
    rare = rarest_classes(info)
    if rare:
        label = "rarest " + ", ".join(names[i] for i in rare)
        rows.append([label, *(_mean_pct([v[i] for i in rare]) for v in columns.values())])
    return rows


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_rows(runs: dict[str, tuple[dict[str, Any], Any]]) -> list[list[str]]:
    """Header + one row per setting (dotted key) whose value differs between the runs'
    resolved configs, with each run's value; [] when they trained with the same settings."""
    flat = {name: _flatten(cfg.to_dict()) for name, (_, cfg) in runs.items()}
    keys = dict.fromkeys(key for values in flat.values() for key in values)
    rows = [
        [key, *(str(values.get(key, "(unset)")) for values in flat.values())]
        for key in keys
        if key not in WHERE_KEYS and len({repr(values.get(key)) for values in flat.values()}) > 1
    ]
    return [["setting", *flat], *rows] if rows else []


def seed_groups(runs: dict[str, tuple[dict[str, Any], Any]]) -> list[list[str]]:
    """The runs grouped by recipe: the same settings apart from where they are kept and their
    seeds (``SEED_KEYS``), in the order first seen."""
    groups: dict[str, list[str]] = {}
    for name, (_, cfg) in runs.items():
        flat = _flatten(cfg.to_dict())
        recipe = repr(
            sorted((k, repr(v)) for k, v in flat.items() if k not in WHERE_KEYS + SEED_KEYS)
        )
        groups.setdefault(recipe, []).append(name)
    return list(groups.values())


def seed_rows(runs: dict[str, tuple[dict[str, Any], Any]], rows: list[list[str]]):
    """The comparison over seeds: one column per recipe (``seed_groups``) with the mean ± the
    sample standard deviation of its runs' values in ``rows`` (:func:`compare_rows`' table of
    the same runs: per class, mIoU and the rarest classes); [] when no recipe ran twice."""
    groups = seed_groups(runs)
    if all(len(group) == 1 for group in groups):
        return []
    names = list(runs)
    header = ["class"] + [f"{group[0]} (n={len(group)})" for group in groups]
    out = [header]
    for row in rows[1:]:
        cells = [row[0]]
        for group in groups:
            values = [row[1 + names.index(name)] for name in group]
            numbers = [float(v) for v in values if v not in ("-", "")]
            cells.append(_mean_std(numbers))
        out.append(cells)
    return out


def paired_rows(runs: dict[str, tuple[dict[str, Any], Any]], rows: list[list[str]]):
    """Each recipe against the first (``seed_groups``), paired by ``train.seed``: for the
    seeds both ran, the mean ± standard deviation of the per-seed differences of the last rows
    of ``rows`` (mIoU, and the rarest classes where the table has them) and how many seeds
    came out ahead; [] when no two recipes share a seed. A paired difference cancels what a
    seed does to both (initial weights, data order), which the spread of each alone does not."""
    groups = seed_groups(runs)
    names = list(runs)
    last = [row for row in rows[1:] if row[0] == "mIoU" or row[0].startswith("rarest ")]

    def by_seed(group: list[str], row: list[str]) -> dict[int, float]:
        values = {}
        for name in group:
            cell = row[1 + names.index(name)]
            if cell not in ("-", ""):
                values.setdefault(runs[name][1].train.seed, float(cell))  # first run of a seed
        return values

    header = ["recipe", "against", "seeds"]
    for row in last:
        header += [f"{row[0]} difference", f"{row[0]} ahead"]
    out = []
    for group in groups[1:]:
        cells: list[str] = [group[0], groups[0][0], ""]
        shared: set[int] = set()
        for row in last:
            mine, base = by_seed(group, row), by_seed(groups[0], row)
            seeds = sorted(set(mine) & set(base))
            shared |= set(seeds)
            diffs = [mine[k] - base[k] for k in seeds]
            ahead = f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else "-"
            cells += [_mean_std(diffs, signed=True), ahead]
        if shared:
            cells[2] = " ".join(str(k) for k in sorted(shared))
            out.append(cells)
    return [header, *out] if out else []


def _mean_std(values: list[float], signed: bool = False) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    if len(values) == 1:
        return text
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{text} ± {std:.1f}"


def _mean_pct(values: list[float]) -> str:
    m = mean_iou(values)
    return "-" if math.isnan(m) else f"{100 * m:.1f}"


def run_labels(paths: list[str]) -> list[str]:
    """Column names for run directories: each one's name, or, where two share a name
    (``a/run``, ``b/run``), the path as given."""
    names = [Path(p).name for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths, strict=True)]


def compare_command(args) -> int:
    labels = run_labels(args.runs)
    if len(set(labels)) < len(labels):
        raise ConfigError(f"a run is named twice: {' '.join(args.runs)}")
    runs = {label: load_run(d) for label, d in zip(labels, args.runs, strict=True)}
    rows = compare_rows(runs, args.which)
    print(f"teacher IoU ({args.which} epoch), percent")
    print(to_text(rows))
    for name, (metrics, _) in runs.items():
        print(
            f"{name}: {metrics['iteration']} iterations, teacher mIoU best "
            f"{100 * metrics['best_teacher_miou']:.2f} (epoch {metrics['best_epoch']}), final "
            f"{100 * metrics['final_teacher_miou']:.2f}"
        )
    settings = settings_rows(runs)
    if settings:
        print(f"\nsettings that differ ({len(settings) - 1}):\n{to_text(settings)}")
    elif len(runs) > 1:
        print("\nthe runs trained with the same settings (apart from their names)")
    seeds = seed_rows(runs, rows)
    if seeds:
        groups = seed_groups(runs)
        print(f"\nrepeats: each recipe's runs (the same settings apart from "
              f"{', '.join(SEED_KEYS)}), mean ± standard deviation, percent")  # fmt: skip
        print(to_text(seeds))
        for group in groups:
            print(f"{group[0]} (n={len(group)}): {', '.join(group)}")
    paired = paired_rows(runs, rows) if seeds else []
    if paired:
        print("\npaired by train.seed: each recipe minus the first, over the seeds both ran "
              "(mean ± standard deviation of the differences, points)")  # fmt: skip
        print(to_text(paired))
    if args.out:
        tables = [(rows, "compare")] + ([(settings, "compare-settings")] if settings else [])
        tables += [(seeds, "compare-seeds")] if seeds else []
        tables += [(paired, "compare-paired")] if paired else []
        for table, stem in tables:
            for path in write_tables(table, args.out, stem):
                print(f"wrote {path}")
        curves = {
            label: Path(d) / history.HISTORY_CSV for label, d in zip(labels, args.runs, strict=True)
        }
        missing = [name for name, path in curves.items() if not path.is_file()]
        if missing:  # runs finished before history.csv existed (2026-12-07)
            print(f"no {history.HISTORY_CSV} in {', '.join(missing)}: left out of the plot")
        found = {n: history.read_csv(p) for n, p in curves.items() if n not in missing}
        if found:
            print(f"wrote {history.plot_runs(found, Path(args.out) / history.COMPARE_PNG)}")
    return 0
