"""``make demo``: a small hyperparameter search on the built-in digit scenes, on this machine.

    python -m dssn.demo [--num-samples N] [--max-epochs E] [--storage runs] [key=value ...]

Generates the digits shards into ``shards/digits`` if they are missing (seconds, nothing is
downloaded), runs ``dssn tune`` with ``configs/digits.yaml`` sized by ``DEMO`` below (6-14
minutes on 2 CPU cores, the longer without native bf16), then prints the result table and
where the plots and the best config are. Each run is a new experiment
``runs/digits-demo-<time>``.
"""

from __future__ import annotations

import argparse
import sys
import time

# The demo's size: what fits well under 15 minutes on a 2-core laptop. Two trials share the
# two cores (~0.7 s a step each) and each trial pays ~40 s to start its TorchTrainer and Ray
# Data streams, so the epochs are short: 6 trials x at most 3 epochs x 25 steps, 2 at a time,
# ASHA stopping the weaker ones at epochs 1 and 2. Measured here: see the README.
DEMO = {"num_samples": 6, "max_epochs": 3, "max_concurrent_trials": 2}
DEMO_OVERRIDES = [
    "train.iters_per_epoch=25",
    # 75 steps at most: the teacher (ASHA's metric) must follow the student that quickly
    "dssn.ema=0.98",
    # every epoch of a 3-epoch trial trains DSSN: ASHA's rungs wait for the end of a
    # labeled-only burn-in (the searched terms do nothing in it), which would leave none
    "dssn.burn_in_epochs=0",
    # two trials share the two cores: one torch thread each (two would oversubscribe them)
    "train.threads_per_worker=1",
]
DATA_ROOT = "shards/digits"
CONFIG = "digits.yaml"


def ensure_digits(root: str) -> str:
    """The digits shards at ``root``, generated when missing."""
    from dssn.data import format as fmt
    from dssn.data.digits import generate

    try:
        fmt.read_dataset_info(root)
    except fmt.ShardError:
        print(f"demo: generating the digits shards in {root} ...", flush=True)
        generate(root)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=DEMO["num_samples"])
    p.add_argument("--max-epochs", type=int, default=DEMO["max_epochs"])
    p.add_argument("--max-concurrent", type=int, default=DEMO["max_concurrent_trials"])
    p.add_argument("--storage", default="runs", help="where the experiment goes")
    p.add_argument("--data", default=DATA_ROOT, help="digits shards (generated if missing)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    from dssn.config import load_config
    from dssn.tune.experiment import find_config
    from dssn.tune.results import report, summarize
    from dssn.tune.tuner import run_search

    start = time.perf_counter()
    root = ensure_digits(args.data)
    cfg = load_config(
        find_config(CONFIG),
        [
            f"data.root={root}",
            f"tune.num_samples={args.num_samples}",
            f"tune.max_epochs={args.max_epochs}",
            f"tune.max_concurrent_trials={args.max_concurrent}",
            f"tune.storage_path={args.storage}",
            f"tune.name=digits-demo-{time.strftime('%Y%m%d-%H%M%S')}",
            *DEMO_OVERRIDES,
            *args.overrides,
        ],
    )
    path = run_search(cfg)
    summary = summarize(path)
    minutes = (time.perf_counter() - start) / 60
    print("\n" + report(summary))
    print(f"\ndemo: {len(summary.table)} trials in {minutes:.1f} minutes; experiment in {path}")
    if "best_config" in summary.paths:
        print(f"demo: train the best configuration with\n  dssn train --config "
              f"{summary.paths['best_config']}")  # fmt: skip
    print(f"demo: see the plots in {path}/results/ (curves.png, params.png, importance.png)")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
