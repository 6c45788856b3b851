"""The end-of-run summary of ``dssn train``: best and final mIoU, and the per-class table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dssn.config import Config
from dssn.data.format import ShardError, read_dataset_info
from dssn.train.tables import class_names_for, iou_rows, to_markdown, to_text, write_tables

SUMMARY_STEM = "summary"


def summary_rows(metrics: dict[str, Any], cfg: Config) -> list[list[str]]:
    """Per-class IoU: teacher at its best epoch, teacher and student at the final epoch."""
    try:
        info = read_dataset_info(cfg.data.root)
    except ShardError:
        info = None
    names = class_names_for(cfg.model.num_classes, info)
    columns = {
        f"teacher best (epoch {metrics['best_epoch']})": metrics["best_teacher_iou"],
        "teacher final": metrics["teacher_iou"],
        "student final": metrics["student_iou"],
    }
    return iou_rows(names, columns)


def headline(metrics: dict[str, Any]) -> str:
    """One paragraph: best and final mIoU of teacher and student, position, counters."""
    return (
        f"epochs {metrics['epoch']}, iterations {metrics['iteration']}: "
        f"teacher mIoU best {100 * metrics['best_teacher_miou']:.2f} "
        f"(epoch {metrics['best_epoch']}), final {100 * metrics['final_teacher_miou']:.2f}; "
        f"student mIoU best {100 * metrics['best_student_miou']:.2f}, final "
        f"{100 * metrics['final_student_miou']:.2f}; restarts {metrics['restarts']}, "
        f"skipped non-finite steps {metrics['nan_skipped']}"
        + (
            f", fp16 overflow steps {metrics['overflow_skipped']}"
            if metrics.get("overflow_skipped")
            else ""
        )
    )


def summary_text(metrics: dict[str, Any], rows: list[list[str]]) -> str:
    return headline(metrics) + "\n\n" + to_text(rows)


def write_summary(metrics: dict[str, Any], rows: list[list[str]], run_dir: str) -> list[Path]:
    """``summary.csv``, ``summary.md`` (headline + table) and ``summary.json`` in the run dir
    (local storage only; for a URI storage the summary is printed only)."""
    if "://" in run_dir:
        return []
    paths = write_tables(rows, run_dir, SUMMARY_STEM)
    paths[1].write_text(headline(metrics) + "\n\n" + to_markdown(rows) + "\n")
    json_path = Path(run_dir) / f"{SUMMARY_STEM}.json"
    json_path.write_text(json.dumps(metrics, indent=1, default=str))
    return [*paths, json_path]
