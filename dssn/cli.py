"""The ``dssn`` command: ``prepare``, ``train``, ``eval``, ``predict``, ``compare``, ``tune``,
``results``.

Each room registers its own subcommands (``register(subparsers)``) and imports its heavy
dependencies (Ray, torch) only when its command runs, so ``dssn --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> it defines ``register(subparsers)``; a room that is missing is skipped
COMMAND_MODULES = ("dssn.data.cli", "dssn.train.cli", "dssn.tune.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dssn", description="DSSN semi-supervised segmentation on Ray"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dssn.config import ConfigError
    from dssn.data.format import ShardError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"dssn: config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:  # a missing or bad dataset.json / shard, named
        print(f"dssn: data error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a checkpoint that is missing or does not fit, named
        checkpoint = sys.modules.get("dssn.train.checkpoint")  # imported where one is loaded
        if checkpoint is None or not isinstance(e, checkpoint.CheckpointError):
            raise
        print(f"dssn: checkpoint error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
