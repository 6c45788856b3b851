"""ASHA versus no early stopping, with the same trial budget: does ASHA find as good a trial for
a fraction of the epochs?

    .venv/bin/python benchmarks/search.py [--config configs/digits.yaml] [--num-samples 8]
                                          [--max-epochs 4] [--storage DIR] [key=value ...]

Both searches draw their trials with the same seeded Optuna TPE sampler, over the same space,
on the same data, with the demo's short epochs (dssn.demo.DEMO_OVERRIDES) unless overridden. "full" trains every trial for max_epochs; "asha" lets ASHA stop trials at
its rungs. Target (issue 5): ASHA's best teacher mIoU within 1 point of the full search's best,
using at most 50% of its epochs. Prints a table (also written to <storage>/search.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dssn.config import load_config

TARGET_POINTS = 1.0  # mIoU points (percent)
TARGET_EPOCH_SHARE = 0.5


def run(config: str, name: str, asha: bool, args: argparse.Namespace) -> dict[str, float]:
    """One search; its best mIoU, epochs trained and wall time."""
    from dssn.demo import DEMO, DEMO_OVERRIDES
    from dssn.tune.tuner import run_search

    cfg = load_config(
        config,
        [
            *DEMO_OVERRIDES,
            f"tune.max_concurrent_trials={DEMO['max_concurrent_trials']}",
            *args.overrides,
            f"tune.name={name}",
            f"tune.storage_path={args.storage}",
            f"tune.num_samples={args.num_samples}",
            f"tune.max_epochs={args.max_epochs}",
            f"tune.asha={'true' if asha else 'false'}",
        ],
    )
    start = time.perf_counter()
    path = run_search(cfg)
    return finished(path, time.perf_counter() - start)


def finished(path: str | Path, wall: float | None) -> dict[str, float]:
    """A finished search's best mIoU, epochs trained, trials stopped early (printed)."""
    from dssn.tune.results import report, summarize

    summary = summarize(path)
    print(report(summary), flush=True)
    table = summary.table
    return {
        "best": float(table["best_teacher_miou"].max()),
        "epochs": int(table["epochs"].sum()),
        "stopped": int(table["stopped_early"].sum()),
        "wall": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--storage", default=None, help="default: a temporary directory")
    p.add_argument(
        "--full",
        default=None,
        metavar="DIR",
        help="compare against this finished full search (same config, trials and seed: the "
        "sampler draws the same trials) instead of running it again",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    args.storage = args.storage or tempfile.mkdtemp(prefix="dssn-search-bench-")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.full:
        full = finished(args.full, None)
    else:
        full = run(args.config, f"bench-full-{stamp}", False, args)
    asha = run(args.config, f"bench-asha-{stamp}", True, args)
    budget = args.num_samples * args.max_epochs
    rows = [
        ["search", "trials", "epochs run", "share of full", "stopped early",
         "best teacher mIoU", "wall (s)"],
        ["full", str(args.num_samples), str(full["epochs"]), f"{full['epochs'] / budget:.0%}",
         str(full["stopped"]), f"{full['best']:.2f}",
         "earlier run" if full["wall"] is None else f"{full['wall']:.0f}"],
        ["asha", str(args.num_samples), str(asha["epochs"]), f"{asha['epochs'] / budget:.0%}",
         str(asha["stopped"]), f"{asha['best']:.2f}", f"{asha['wall']:.0f}"],
    ]  # fmt: skip
    gap = full["best"] - asha["best"]
    share = asha["epochs"] / max(full["epochs"], 1)
    met = gap <= TARGET_POINTS and share <= TARGET_EPOCH_SHARE
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    verdict = (
        f"ASHA's best teacher mIoU {asha['best']:.2f} vs the full search's {full['best']:.2f} "
        f"(gap {gap:.2f} points) with {share:.0%} of its epochs: target (gap <= "
        f"{TARGET_POINTS:g} point, <= {TARGET_EPOCH_SHARE:.0%} of the epochs) "
        f"{'met' if met else 'NOT met'}"
    )
    text = "\n".join(lines) + "\n\n" + verdict
    print("\n" + text)
    out = Path(args.storage) / "search.md"
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
