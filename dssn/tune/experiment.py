"""What the scripts in ``experiments/`` share: arguments -> config -> dssn.tune / dssn.train.

    python experiments/tune_voc.py --data shards/voc-92 --num-samples 16
    ray submit cluster/gpu.yaml experiments/tune_voc.py -- --data s3://BUCKET/shards/voc-92
    python experiments/tune_voc.py --smoke-test        # a tiny digits search on this machine

Each script names its experiment config (``configs/voc_r101.yaml`` ...) and whether it tunes or
trains; everything else is here, so the four scripts stay a few lines each.

Where things go. ``--data``: the Parquet shards (``dssn prepare ... --out``), a local/NFS path
or an s3:// / gs:// URI; the standard splits come from ``dssn prepare voc --split 92`` etc.
(``--split 92`` appends ``/<dataset>-92`` to ``--data``, the layout the README uses).
``--storage``: results and checkpoints, default ``$DSSN_STORAGE`` (the cluster YAMLs set it to
a bucket), else the config's ``train.storage``. On a cluster every node must reach both.

Which Ray. ``--address`` (default ``$DSSN_RAY_ADDRESS``; the cluster YAMLs set ``auto`` on the
head node, so a script run by ``ray submit`` joins the cluster). Inside ``ray job submit`` Ray
sets ``RAY_ADDRESS`` itself. With neither, a local Ray instance is started.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from dssn.config import Config, ConfigError, load_config

ENV_STORAGE = "DSSN_STORAGE"
ENV_ADDRESS = "DSSN_RAY_ADDRESS"
SMOKE_DATA = "smoke-digits"  # under the storage: the smoke test's generated shards
# The smoke test: tiny digit scenes, a tiny backbone at 32 px, 2 iterations an epoch.
SMOKE_DIGITS = {"n_train": 32, "n_val": 8, "labeled_fraction": 0.25, "seed": 0, "shard_rows": 16}
SMOKE_OVERRIDES = [
    "model.backbone=tiny",
    "model.width=8",
    "model.pretrained=null",
    "data.crop_size=32",
    "data.batch_size=2",
    "data.eval_mode=original",
    "train.iters_per_epoch=2",
    "train.epochs=2",
    "train.workers=1",
    "train.gpus_per_worker=0",
    "train.cpus_per_worker=0.5",
    "train.threads_per_worker=1",
    "train.log_every=1",
    "tune.num_samples=2",
    "tune.max_epochs=2",
    "dssn.ema=0.9",  # the teacher must move within 4 steps for its mIoU to mean anything
    "dssn.burn_in_epochs=0",  # both epochs train DSSN (a config's burn-in would take them)
]


def find_config(name: str) -> Path:
    """``configs/<name>`` in the working directory, else beside the installed package (a
    script copied to the head node by ``ray submit`` runs away from the repository)."""
    import dssn

    candidates = [Path.cwd() / "configs" / name, Path(dssn.__file__).parents[1] / "configs" / name]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"config {name} not found in {[str(c) for c in candidates]}")


def build_parser(description: str, tune: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="experiment YAML (default: the script's own)")
    p.add_argument("--data", help="Parquet shards root: path or s3:// / gs:// URI (data.root)")
    p.add_argument("--split", help="append /<dataset>-<split> to --data (e.g. 92, 1_16)")
    p.add_argument("--storage", help=f"results: path or URI (default ${ENV_STORAGE})")
    p.add_argument("--name", help="experiment / run name")
    p.add_argument("--address", default=os.environ.get(ENV_ADDRESS), help="Ray address")
    p.add_argument("--workers", type=int, help="Train workers per run (train.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="train.gpus_per_worker")
    p.add_argument("--cpus-per-worker", type=float, help="train.cpus_per_worker")
    p.add_argument("--epochs", type=int, help="train.epochs")
    if tune:
        p.add_argument("--num-samples", type=int, help="trials (tune.num_samples)")
        p.add_argument("--max-epochs", type=int, help="epochs of a full trial (tune.max_epochs)")
        p.add_argument("--max-concurrent", type=int, help="tune.max_concurrent_trials")
        p.add_argument("--resume", action="store_true", help="continue the search of that name")
    p.add_argument(
        "--smoke-test", action="store_true", help="a tiny digits run on this machine, then exit"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def dataset_prefix(cfg_name: str) -> str:
    """``voc`` for ``voc_r101``: how ``dssn prepare`` output directories are named."""
    return cfg_name.split("_", 1)[0]


def storage_of(args: argparse.Namespace, cfg: Config) -> str:
    return args.storage or os.environ.get(ENV_STORAGE) or cfg.train.storage


def prepare_smoke_data(storage: str) -> str:
    """Tiny digits shards under ``<storage>/smoke-digits`` (generated once; in a local temp
    dir when the storage is a URI: the generator writes local files); returns the root."""
    from dssn.data import format as fmt
    from dssn.data.digits import generate

    base = tempfile.gettempdir() if "://" in storage else storage.rstrip("/")
    root = f"{base}/{SMOKE_DATA}"
    try:
        fmt.read_dataset_info(root)
    except fmt.ShardError:
        print(f"smoke test: generating tiny digits shards in {root}", flush=True)
        generate(root, workers=1, **SMOKE_DIGITS)
    return root


def experiment_overrides(args: argparse.Namespace, tune: bool) -> list[str]:
    """The flags as ``key=value`` overrides, after the positional ones (flags win)."""
    out = list(args.overrides)
    flags = [
        ("workers", "train.workers"),
        ("gpus_per_worker", "train.gpus_per_worker"),
        ("cpus_per_worker", "train.cpus_per_worker"),
        ("epochs", "train.epochs"),
    ]
    if tune:
        flags += [
            ("num_samples", "tune.num_samples"),
            ("max_epochs", "tune.max_epochs"),
            ("max_concurrent", "tune.max_concurrent_trials"),
            ("name", "tune.name"),
        ]
    else:
        flags.append(("name", "train.name"))
    for flag, key in flags:
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def build_config(config_name: str, args: argparse.Namespace, tune: bool) -> Config:
    """The experiment's Config: its YAML, the smoke-test settings, then the flags."""
    path = Path(args.config) if args.config else find_config(config_name)
    base = load_config(path)
    storage = storage_of(args, base)
    overrides = [f"train.storage={storage}"]
    if tune:
        overrides.append(f"tune.storage_path={storage}")
    if args.smoke_test:
        from dssn.data.format import read_dataset_info

        root = prepare_smoke_data(storage)
        classes = len(read_dataset_info(root)["classes"])
        overrides += SMOKE_OVERRIDES + [f"data.root={root}", f"model.num_classes={classes}"]
        overrides.append(f"{'tune.name' if tune else 'train.name'}={base.name}-smoke")
    elif args.data:
        root = args.data.rstrip("/")
        if args.split:
            root = f"{root}/{dataset_prefix(base.name)}-{args.split}"
        overrides.append(f"data.root={root}")
    return load_config(path, overrides + experiment_overrides(args, tune))


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` if one is named; True when connected here."""
    import ray

    from dssn.train.launcher import init_ray

    if not address or ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return False
    init_ray(address=address)
    return True


def run_tune(cfg: Config, resume: bool) -> int:
    from dssn.tune.results import report, summarize
    from dssn.tune.tuner import run_search

    path = run_search(cfg, resume=resume)
    summary = summarize(path)
    print(report(summary), flush=True)
    return 0 if summary.ok else 1


def run_train(cfg: Config) -> int:
    from dssn.train.launcher import fit, run_dir
    from dssn.train.summary import summary_rows, summary_text, write_summary

    result = fit(cfg)
    if result.metrics is None:
        print("no epoch finished: nothing to summarise", file=sys.stderr)
        return 1
    rows = summary_rows(result.metrics, cfg)
    print(summary_text(result.metrics, rows), flush=True)
    for path in write_summary(result.metrics, rows, run_dir(cfg)):
        print(f"wrote {path}")
    return 0


def main(config_name: str, tune: bool, description: str, argv: list[str] | None = None) -> int:
    """The body of every script in ``experiments/``."""
    args = build_parser(description, tune).parse_args(argv)
    if args.smoke_test and not args.storage and not os.environ.get(ENV_STORAGE):
        args.storage = tempfile.mkdtemp(prefix="dssn-smoke-")
    from dssn.data.format import ShardError
    from dssn.data.pipeline import check_training_data

    try:
        cfg = build_config(config_name, args, tune)
        check_training_data(cfg)  # the shards against the config, before any trial starts
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    if not args.smoke_test and not args.data and cfg.data.root == Config().data.root:
        print(f"note: no --data given; using data.root={cfg.data.root}", flush=True)
    connected = connect(args.address)
    try:
        return run_tune(cfg, getattr(args, "resume", False)) if tune else run_train(cfg)
    finally:
        if connected:
            import ray

            ray.shutdown()
