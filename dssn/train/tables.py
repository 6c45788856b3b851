"""Per-class IoU tables (text, Markdown, CSV) for ``dssn train`` summaries and ``dssn eval``.

Values are IoU in percent with one decimal, as segmentation papers print them; a class with no
IoU (absent from both target and prediction) shows ``-``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dssn.train.metrics import mean_iou

MISSING = "-"


def _pct(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.1f}"


def iou_rows(class_names: list[str], columns: dict[str, list[float]]) -> list[list[str]]:
    """Header row + one row per class + an mIoU row. columns: name -> per-class IoU (0..1)."""
    for name, values in columns.items():
        if len(values) != len(class_names):
            raise ValueError(
                f"column {name!r} has {len(values)} values for {len(class_names)} classes"
            )
    rows = [["class", *columns]]
    for i, cls in enumerate(class_names):
        rows.append([cls, *(_pct(v[i]) for v in columns.values())])
    rows.append(["mIoU", *(_pct(mean_iou(v)) for v in columns.values())])
    return rows


def to_text(rows: list[list[str]]) -> str:
    """Aligned plain-text table (first column left, numbers right)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_markdown(rows: list[list[str]]) -> str:
    """GitHub Markdown table."""
    head, *body = rows
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def to_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_tables(rows: list[list[str]], out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.md"]
    paths[0].write_text(to_csv(rows))
    paths[1].write_text(to_markdown(rows) + "\n")
    return paths


def class_names_for(num_classes: int, info: dict | None) -> list[str]:
    """Class names from a dataset.json dict when it matches ``num_classes``, else numbers."""
    names = (info or {}).get("classes")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


# ----------------------------------------------------------------------------- confusion


def confusion_rows(class_names: list[str], matrix) -> list[list[str]]:
    """Header + one row per true class: the pixels of each predicted class (a (C, C) matrix,
    rows = ground truth, columns = prediction)."""
    rows = [["truth \\ predicted", *class_names]]
    for name, counts in zip(class_names, matrix.tolist(), strict=True):
        rows.append([name, *(str(int(n)) for n in counts)])
    return rows


def top_confusions(class_names: list[str], matrix, count: int = 5) -> list[tuple[str, str, float]]:
    """The ``count`` largest confusions: (true class, predicted class, share of the true
    class's pixels predicted as the other), largest first; classes without pixels left out."""
    pairs = []
    for i, counts in enumerate(matrix.tolist()):
        total = sum(counts)
        for j, n in enumerate(counts):
            if i != j and n > 0:
                pairs.append((class_names[i], class_names[j], n / total))
    return sorted(pairs, key=lambda p: -p[2])[:count]


def plot_confusion(class_names: list[str], matrix, path: str | Path, title: str) -> Path:
    """The confusion matrix as a heatmap, each row as shares of its true class's pixels
    (annotated in percent when there are at most 25 classes)."""
    import numpy as np

    from dssn.train.history import pyplot

    counts = np.asarray(matrix.tolist(), dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    plt = pyplot()
    side = min(max(4.0, 0.45 * len(class_names) + 2), 24.0)  # inches: ~50 classes fill it
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(100 * shares, cmap="Blues", vmin=0, vmax=100)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if len(class_names) <= 25:
        for i, j in np.argwhere(shares >= 0.005):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{100 * shares[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color=colour)  # fmt: skip
    fig.colorbar(image, ax=ax, label="% of the true class's pixels")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_score(matrix) -> tuple[float, float]:
    """(mIoU, pixel accuracy) of one image's confusion matrix: the mean over the classes that
    its ground truth or its prediction holds (the others have no IoU there)."""
    from dssn.train.metrics import iou_per_class, pixel_accuracy

    return mean_iou(iou_per_class(matrix)), pixel_accuracy(matrix)


def per_image_rows(
    ids: list[str], scores: list[tuple[float, float]], class_names: list[str], matrices
) -> list[list[str]]:
    """Header + one row per image, worst mIoU first: id, mIoU, pixel accuracy, and the image's
    largest confusion in pixels ("9 as 3 (412 px)"; empty where every pixel is right)."""
    order = sorted(range(len(ids)), key=lambda i: worst_first(scores[i][0], ids[i]))
    rows = [["id", "miou", "pixel_accuracy", "largest_confusion"]]
    for i in order:
        counts = matrices[i].clone()
        counts.fill_diagonal_(0)
        true, predicted = divmod(int(counts.argmax()), counts.shape[1])
        pixels = int(counts[true, predicted])
        worst = f"{class_names[true]} as {class_names[predicted]} ({pixels} px)" if pixels else ""
        rows.append([ids[i], _pct(scores[i][0]), _pct(scores[i][1]), worst])
    return rows


def worst_first(miou: float, image_id: str) -> tuple[float, str]:
    """The order of :func:`per_image_rows`: lowest mIoU first (an image without any score
    last), ties by id."""
    return (math.inf if math.isnan(miou) else miou), image_id
