"""``dssn tune`` and ``dssn results``.

    dssn tune --config configs/digits.yaml --num-samples N [--max-epochs E] [--storage PATH]
              [--name NAME] [--max-concurrent K] [--no-asha] [--resume] [--print-space]
              [key=value ...]
    dssn results DIR [--out DIR] [--no-plots]

Heavy imports (Ray, torch, matplotlib) happen inside the handlers so ``dssn --help`` stays
instant.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the tune / results subcommands."""
    p = sub.add_parser(
        "tune",
        help="hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, a TorchTrainer per trial",
    )
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/digits.yaml")
    p.add_argument("--num-samples", type=int, help="trials (tune.num_samples)")
    p.add_argument("--max-epochs", type=int, help="epochs of a full trial (tune.max_epochs)")
    p.add_argument("--storage", help="where experiments go (tune.storage_path; path or URI)")
    p.add_argument("--name", help="experiment name (tune.name; default <name>-tune)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (tune.max_concurrent_trials)")
    p.add_argument("--no-asha", action="store_true", help="no early stopping (tune.asha=false)")
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted search of that name"
    )
    p.add_argument("--print-space", action="store_true", help="print the search space and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=tune_command)

    p = sub.add_parser("results", help="table, plots and best config of a search directory")
    p.add_argument("path", metavar="DIR", help="an experiment directory (path or URI)")
    p.add_argument("--out", help="where to write them (default DIR/results)")
    p.add_argument("--no-plots", action="store_true", help="tables and best config only")
    p.set_defaults(func=results_command)


def tune_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as ``key=value`` overrides, after the positional ones (flags win)."""
    out = list(args.overrides)
    for flag, key in (
        ("num_samples", "tune.num_samples"),
        ("max_epochs", "tune.max_epochs"),
        ("storage", "tune.storage_path"),
        ("name", "tune.name"),
        ("max_concurrent", "tune.max_concurrent_trials"),
    ):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    if args.no_asha:
        out.append("tune.asha=false")
    return out


def tune_command(args: argparse.Namespace) -> int:
    from dssn.config import load_config
    from dssn.tune.space import format_space

    cfg = load_config(args.config, tune_overrides(args))
    if args.print_space:
        print(format_space(cfg))
        return 0
    from dssn.data.pipeline import check_training_data
    from dssn.tune.results import report, summarize
    from dssn.tune.tuner import run_search

    check_training_data(cfg)  # every trial reads it: a wrong root or class count fails here
    try:
        path = run_search(cfg, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"dssn tune: {e}", file=sys.stderr)
        return 2
    summary = summarize(path)
    print(report(summary))
    return 0 if summary.ok else 1


def results_command(args: argparse.Namespace) -> int:
    from dssn.tune.results import report, summarize

    try:
        summary = summarize(args.path, out=args.out, plots=not args.no_plots)
    except FileNotFoundError as e:
        print(f"dssn results: {e}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0
