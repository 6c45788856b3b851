"""``dssn prepare {voc,cityscapes,folder,digits}``: build Parquet shards (dssn.data.format).

    dssn prepare voc --root VOCdevkit/VOC2012 --split 92 --out shards/voc-92
    dssn prepare cityscapes --root cityscapes --split 1_16 --out shards/cityscapes-1_16
    dssn prepare folder --images imgs --masks masks --val-list val.txt --classes cls.txt --out d
    dssn prepare digits --out shards/digits

Exit codes: 0 done; 1 some labeled / val samples are bad (listed; dataset.json not written);
2 the inputs cannot be prepared (message names the file).
"""

from __future__ import annotations

import argparse
import os
import sys

MAX_LISTED = 20  # bad / skipped samples printed in full; the rest are counted
IGNORE_HINT_SHARE = 0.05  # with a class absent, this much 255 in the masks earns a hint
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare`` and its dataset subcommands."""
    prepare = subparsers.add_parser(
        "prepare", help="build Parquet shards from a dataset", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    kinds = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    voc = kinds.add_parser("voc", help="PASCAL VOC 2012 + SBD (train_aug)")
    voc.add_argument("--root", required=True, help="VOCdevkit/VOC2012 (JPEGImages, ...)")
    _split_args(voc, "92, 183, 366, 732, 1464, 1_16, 1_8, 1_4, u2pl_1_16, ...")
    _common_args(voc)
    voc.set_defaults(func=_prepare_voc)

    city = kinds.add_parser("cityscapes", help="Cityscapes fine (labelTrainIds)")
    city.add_argument("--root", required=True, help="folder with leftImg8bit/ and gtFine/")
    _split_args(city, "1_16, 1_8, 1_4, 1_2, 1_30")
    _common_args(city)
    city.set_defaults(func=_prepare_cityscapes)

    folder = kinds.add_parser("folder", help="any folder of images (+ PNG masks)")
    folder.add_argument("--images", required=True, help="image folder (searched recursively)")
    folder.add_argument(
        "--masks", help="mask folder: <same relative name>.png, class ids (or RGB colours)"
    )
    folder.add_argument("--labeled-list", help="images that are labeled (default: all with masks)")
    folder.add_argument("--val-list", required=True, help="images to evaluate on (need masks)")
    folder.add_argument(
        "--classes",
        required=True,
        help="one class name per line, optionally 'name r g b' (then RGB colour masks are "
        "read by colour; 'ignore r g b' lines name ignored colours)",
    )
    _common_args(folder)
    folder.set_defaults(func=_prepare_folder)

    digits = kinds.add_parser("digits", help="the built-in synthetic digit scenes")
    digits.add_argument("--n-train", type=int, help="training scenes")
    digits.add_argument("--n-val", type=int, help="validation scenes")
    digits.add_argument("--labeled-fraction", type=float, help="share of training scenes labeled")
    digits.add_argument("--seed", type=int, help="generator seed (same seed, same bytes)")
    digits.add_argument("--shard-rows", type=int, help="rows per shard")
    digits.add_argument("--workers", type=int, help="processes")
    digits.add_argument("--out", required=True, help="output directory")
    digits.set_defaults(func=_prepare_digits)


def _split_args(parser: argparse.ArgumentParser, names: str) -> None:
    parser.add_argument("--split", help=f"a shipped split: {names}")
    parser.add_argument("--split-file", help="custom labeled list ('<image> <mask>' per line)")
    parser.add_argument(
        "--splits-dir", help="a split directory laid out like dssn/splits/<dataset> (default)"
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    # defaults resolved in the handler: importing pyarrow here would slow down `dssn --help`
    parser.add_argument("--out", required=True, help="output directory (local path)")
    parser.add_argument("--shard-rows", type=int, help="rows per shard (default 256)")
    parser.add_argument(
        "--shard-mb", type=float, help="a shard also closes at this many MB of images (64)"
    )
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="processes")
    parser.add_argument("--seed", type=int, default=0, help="order of samples in the shards")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prepare_voc(args: argparse.Namespace) -> int:
    from dssn.data import prepare

    return _run(
        lambda: prepare.voc_plan(args.root, args.split, args.split_file, args.splits_dir), args
    )


def _prepare_cityscapes(args: argparse.Namespace) -> int:
    from dssn.data import prepare

    return _run(
        lambda: prepare.cityscapes_plan(args.root, args.split, args.split_file, args.splits_dir),
        args,
    )


def _prepare_folder(args: argparse.Namespace) -> int:
    from dssn.data import prepare

    return _run(
        lambda: prepare.folder_plan(
            args.images, args.classes, args.masks, args.labeled_list, args.val_list
        ),
        args,
    )


def _run(make_plan, args: argparse.Namespace) -> int:
    """Plan, run, print the summary; the exit code."""
    from dssn.data import prepare
    from dssn.data.format import DEFAULT_SHARD_ROWS

    shard_mb = args.shard_mb if args.shard_mb is not None else prepare.DEFAULT_SHARD_BYTES / 2**20
    try:
        plan = make_plan()
        summary = prepare.run(
            plan,
            args.out,
            shard_rows=args.shard_rows or DEFAULT_SHARD_ROWS,
            shard_bytes=int(shard_mb * 2**20),
            workers=args.workers,
            seed=args.seed,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except prepare.PrepareError as e:
        print(f"dssn prepare: error: {e}", file=sys.stderr)
        return 2
    print_summary(plan.name, plan.split, summary, plan.classes)
    return 0 if summary.ok else 1


def print_summary(name: str, split: str | None, summary, classes: list[str] | None = None) -> None:
    """Rows per part, skipped unlabeled images, bad samples; with ``classes``, those no
    labeled or val mask holds."""
    print(f"{name} (split {split}) -> {summary.out}")
    for part, rows in summary.counts.items():
        skipped = summary.skipped[part]
        note = f"  ({skipped} unreadable, skipped)" if skipped else ""
        print(f"  {part:10s} {rows:7d} rows{note}")
    print(f"  shards: {summary.shards_written} written, {summary.shards_reused} already complete")
    for line in summary.skipped_samples[:MAX_LISTED]:
        print(f"  skipped: {line}")
    if len(summary.skipped_samples) > MAX_LISTED:
        print(f"  ... and {len(summary.skipped_samples) - MAX_LISTED} more skipped")
    if summary.errors:
        for line in summary.errors[:MAX_LISTED]:
            print(f"  bad sample: {line}", file=sys.stderr)
        if len(summary.errors) > MAX_LISTED:
            print(f"  ... and {len(summary.errors) - MAX_LISTED} more", file=sys.stderr)
        print(
            f"dssn prepare: {len(summary.errors)} bad labeled/val samples; their shards and "
            "dataset.json were not written. Fix them and re-run (finished shards are kept).",
            file=sys.stderr,
        )
    else:
        print(f"  wrote {summary.out}/dataset.json")
    absent = summary.absent_classes(len(classes)) if classes and summary.ok else []
    if absent:
        named = ", ".join(f"'{classes[c]}' ({c})" for c in absent)
        print(f"dssn prepare: warning: no labeled or val mask holds class {named}; a model "
              "trained on these masks never learns it", file=sys.stderr)  # fmt: skip
        share = summary.ignore_share()
        if share >= IGNORE_HINT_SHARE:
            print(f"dssn prepare: {100 * share:.1f}% of the mask pixels are 255, which means "
                  "ignore: if your masks mark a class with 255 (binary 0/255 masks do), "
                  "store that class's id instead", file=sys.stderr)  # fmt: skip


def _prepare_digits(args: argparse.Namespace) -> int:
    from dssn.data import digits

    options = {
        key: getattr(args, key)
        for key in ("n_train", "n_val", "labeled_fraction", "seed", "shard_rows", "workers")
        if getattr(args, key) is not None
    }
    info = digits.generate(args.out, **options)
    counts = info.get("counts", {})
    print(f"digits -> {args.out}")
    for part, rows in counts.items():
        print(f"  {part:10s} {rows:7d} rows")
    return 0
