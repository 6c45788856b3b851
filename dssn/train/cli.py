"""``dssn train``, ``dssn eval``, ``dssn predict`` and ``dssn compare``.

    dssn train --config configs/digits.yaml [--workers N] [--gpus-per-worker G]
               [--cpus-per-worker C] [--storage PATH] [--name NAME] [--print-config]
               [key=value ...]
    dssn eval --checkpoint DIR|FILE.pth --data SHARDS [--mode M] [--out DIR]
    dssn predict --checkpoint DIR --images DIR --out DIR
    dssn compare RUN_DIR [RUN_DIR ...] [--which final|best] [--out DIR]
    dssn export --checkpoint DIR|FILE.pth --out FILE.pt2 [--model teacher|student]

Heavy imports (torch, Ray) happen inside the handlers so ``dssn --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODES = ("original", "center_crop", "sliding_window")
WORST_IMAGES = 8  # dssn eval: pictures of the val images scored lowest


def register(sub: argparse._SubParsersAction) -> None:
    """Add the train / eval / predict subcommands."""
    p = sub.add_parser("train", help="train on Ray Train (local Ray, or RAY_ADDRESS's cluster)")
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/digits.yaml")
    p.add_argument("--workers", type=int, help="train workers (train.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (train.gpus_per_worker)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (train.cpus_per_worker)")
    p.add_argument("--storage", help="where runs are stored (train.storage; path or URI)")
    p.add_argument("--name", help="run name (train.name); the same name continues a run")
    p.add_argument(
        "--no-resume", action="store_true", help="refuse to continue an existing run of that name"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file, flags and overrides over the defaults) and exit",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=train_command)

    p = sub.add_parser("eval", help="per-class IoU of a checkpoint's student and teacher")
    _checkpoint_args(p)
    p.add_argument("--data", required=True, help="Parquet shards root (its val/ part is used)")
    p.add_argument("--mode", choices=MODES, help="inference mode (default: data.eval_mode)")
    p.add_argument("--crop", type=int, help="window of center_crop / sliding_window")
    _tta_args(p)
    p.add_argument("--out", help="directory for eval.csv / eval.md (default: beside the ckpt)")
    p.add_argument(
        "--worst",
        type=_count,
        default=WORST_IMAGES,
        metavar="K",
        help=f"draw the K val images the teacher scores lowest on (default {WORST_IMAGES}; 0: none)",
    )
    p.set_defaults(func=eval_command)

    p = sub.add_parser("compare", help="per-class teacher IoU of finished runs side by side")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (<storage>/<name>)")
    p.add_argument("--which", choices=("final", "best"), default="final", help="epoch to show")
    p.add_argument(
        "--out",
        help="also write compare.csv, compare.md and compare.png (mIoU curves) into this directory",
    )
    p.set_defaults(func=_compare)

    p = sub.add_parser("predict", help="coloured masks and overlays for a folder of images")
    _checkpoint_args(p)
    p.add_argument(
        "--images",
        required=True,
        help="a folder of .png/.jpg/.bmp images (searched recursively), or one",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", choices=("teacher", "student"), default="teacher")
    p.add_argument("--mode", choices=("original", "sliding_window"), default="original")
    _tta_args(p)
    p.set_defaults(func=predict_command)

    p = sub.add_parser("export", help="a checkpoint's network as a torch.export program (.pt2)")
    _checkpoint_args(p)
    p.add_argument("--out", required=True, help="the .pt2 (torch.export) or .onnx file to write")
    p.add_argument("--model", choices=("teacher", "student"), default="teacher")
    p.add_argument("--size", type=int, help="side of the traced example (default: data.crop_size)")
    p.set_defaults(func=_export)


def _tta_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scales",
        type=_scale,
        nargs="+",
        metavar="S",
        help="test-time scales whose class probabilities are added, e.g. 0.75 1 1.25 "
        "(default: data.eval_scales, [1.0])",
    )
    p.add_argument(
        "--flip",
        action="store_true",
        help="add the left-right mirrored image's probabilities too (default: data.eval_flip)",
    )


def apply_tta(cfg, args: argparse.Namespace) -> None:
    """``--scales`` / ``--flip`` into ``cfg.data`` (the config's own values otherwise). A
    flip for a model trained without mirrored images (``data.hflip_p: 0``, as the digits,
    whose mirrored 2 reads as a 5) gets a note: it adds predictions on inputs unlike any the
    model learnt from (on the digits, -5 mIoU)."""
    cfg.data.eval_scales = args.scales or cfg.data.eval_scales
    cfg.data.eval_flip = args.flip or cfg.data.eval_flip
    if cfg.data.eval_flip and cfg.data.hflip_p == 0:
        print(
            f"dssn {args.command}: note: --flip, but this model trained without mirrored "
            "images (data.hflip_p: 0): it adds predictions on inputs unlike its training data",
            file=sys.stderr,
        )


def tta_label(cfg, scales: str = ", scales {}", sep: str = " ", flip: str = ", flip") -> str:
    """'' for the reference's single pass; else e.g. ', scales 0.75 1 1.25, flip' (the
    arguments give other spellings: :func:`default_eval_dir`'s ``-x0.75-1-1.25-flip``)."""
    values = [float(x) for x in cfg.data.eval_scales]
    label = "" if values == [1.0] else scales.format(sep.join(f"{x:g}" for x in values))
    return label + (flip if cfg.data.eval_flip else "")


def _scale(text: str) -> float:
    """An argparse type: a positive number."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive scale")
    return value


def _count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give a count >= 0")
    return value


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a dssn checkpoint directory, or a reference best.pth/latest.pth (needs --config)",
    )
    p.add_argument("--config", help="config YAML (required for a reference .pth file)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


# ----------------------------------------------------------------------------- train


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The flags as ``key=value`` overrides, after the positional ones (flags win)."""
    out = list(args.overrides)
    for flag, key in (
        ("workers", "train.workers"),
        ("gpus_per_worker", "train.gpus_per_worker"),
        ("cpus_per_worker", "train.cpus_per_worker"),
        ("storage", "train.storage"),
        ("name", "train.name"),
    ):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def _export(args: argparse.Namespace) -> int:
    from dssn.train.export import export_command

    return export_command(args)


def _compare(args: argparse.Namespace) -> int:
    from dssn.train.compare import compare_command

    return compare_command(args)


def train_command(args: argparse.Namespace) -> int:
    from dssn.config import load_config

    cfg = load_config(args.config, train_overrides(args))
    if args.print_config:  # what the run would train with; nothing is read, started or written
        sys.stdout.write(cfg.to_yaml())
        return 0
    import ray

    from dssn.data.pipeline import check_training_data
    from dssn.train.launcher import (
        describe_schedule,
        ensure_ray,
        failure_causes,
        finished_run,
        fit,
        run_dir,
    )

    done = None if args.no_resume else finished_run(cfg)
    if done is not None:  # nothing to train: no Ray start, the summary of the run as it ended
        directory, state = done
        print(
            f"dssn: {run_dir(cfg)} already ran its {state['epoch']} epochs "
            f"(train.epochs={cfg.train.epochs}); its summary follows. To train it further, "
            "raise train.epochs; for a new run, pass another --name",
            flush=True,
        )
        return summarise(state["metrics"], directory, cfg)
    info = check_training_data(cfg)  # a wrong root or class count: one line, before Ray starts
    print(describe_schedule(cfg, info), flush=True)
    if cfg.model.init:  # a missing file or another architecture: one line, before Ray starts
        from dssn.model import build_model
        from dssn.train.checkpoint import load_init_weights
        from dssn.train.setup import init_architecture

        model = build_model(init_architecture(cfg))
        print(f"dssn: starting from {load_init_weights(model, cfg)}", flush=True)
    started = ensure_ray(cfg)
    try:
        result = fit(cfg, resume=not args.no_resume)
    except FileExistsError as e:  # --no-resume and the run exists
        print(f"dssn train: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train's SIGINT handler aborts the
        # run, then exits (SystemExit); before its handler is set, Python's KeyboardInterrupt
        print(interrupted_message(cfg), file=sys.stderr)
        return 130
    except Exception as e:  # Ray wraps worker errors: show the cause, not a driver traceback
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        print(f"dssn train: the run failed: {e}", file=sys.stderr)
        for line in failure_causes(e):  # last: the cause, which Ray's snippet may have cut off
            print(f"dssn train: the run failed: {line}", file=sys.stderr)
        return 1
    finally:
        if started:
            ray.shutdown()
    if result.metrics is None:
        print("dssn train: no epoch finished, so there is nothing to summarise", file=sys.stderr)
        return 1
    if result.metrics.get("epoch", cfg.train.epochs) < cfg.train.epochs:  # aborted (Ctrl-C)
        print(interrupted_message(cfg), file=sys.stderr)
        return 130
    return summarise(result.metrics, result.checkpoint and result.checkpoint.path, cfg)


def interrupted_message(cfg) -> str:
    """What a stopped ``dssn train`` keeps: its last complete checkpoint, and the way on."""
    from dssn.train.launcher import latest_checkpoint_state, run_dir

    latest = latest_checkpoint_state(cfg)
    if latest is None:
        return (
            f"dssn train: interrupted before the first epoch ended: {run_dir(cfg)} holds no "
            "checkpoint; the same command starts the run again"
        )
    directory, state = latest
    return (
        f"dssn train: interrupted; the last checkpoint is {directory} (epoch {state['epoch']}/"
        f"{cfg.train.epochs}, iteration {state.get('iteration', '?')}). The same command "
        "(the same --name and --storage) continues from it"
    )


def summarise(metrics: dict, checkpoint_dir: str | None, cfg) -> int:
    """Print the run's summary table; on local storage write it, ``history.csv`` and
    ``curves.png`` (from the latest checkpoint) into the run directory."""
    from dssn.train.history import write_run_history
    from dssn.train.launcher import run_dir
    from dssn.train.summary import summary_rows, summary_text, write_summary

    rows = summary_rows(metrics, cfg)
    print(summary_text(metrics, rows))
    paths = write_summary(metrics, rows, run_dir(cfg))
    if paths and checkpoint_dir is not None:  # local storage: the curves beside the table
        paths += write_run_history(checkpoint_dir, cfg)
    for path in paths:
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- eval


def eval_command(args: argparse.Namespace) -> int:
    import torch

    from dssn.data.format import iter_rows, read_dataset_info
    from dssn.data.pipeline import check_classes, iter_val_samples
    from dssn.train.evaluate import evaluate
    from dssn.train.inference import dataset_info, load_for_inference, with_progress
    from dssn.train.tables import (
        class_names_for,
        confusion_rows,
        image_score,
        iou_rows,
        per_image_rows,
        plot_confusion,
        to_csv,
        to_text,
        top_confusions,
        worst_first,
        write_tables,
    )

    loaded = load_for_inference(args.checkpoint, args.config, args.overrides)
    cfg = loaded.cfg
    cfg.data.root = args.data
    info = check_classes(cfg, read_dataset_info(args.data))  # the model's classes: the data's
    cfg.data.eval_mode = args.mode or cfg.data.eval_mode
    cfg.data.eval_crop = args.crop or cfg.data.eval_crop
    apply_tta(cfg, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {name: m.to(device) for name, m in loaded.models.items()}
    samples = iter_val_samples(cfg, shard="val", rank=0, world_size=1)  # every row, no Ray
    ids = [row["id"] for row in iter_rows(args.data, "val", ["id"])]  # in the samples' order
    total = int(info["counts"].get("val", 0))
    matrices: dict[str, list] = {name: [] for name in models}  # each image's, per model
    shown = "teacher" if "teacher" in models else next(iter(models))
    current: list = []  # the sample being evaluated
    worst: list = []  # (order key, sample) of the shown model's args.worst lowest so far

    def remember(samples):
        for sample in samples:
            current[:] = [sample]
            yield sample

    def keep(image: dict[str, torch.Tensor]) -> None:
        for name, matrix in image.items():
            matrices[name].append(matrix.cpu())
        if args.worst:  # kept as they come: the val rows are read once
            index = len(matrices[shown]) - 1
            image_id = ids[index] if index < len(ids) else ""  # a mismatch is named below
            key = worst_first(image_score(matrices[shown][-1])[0], image_id)
            worst.append((key, current[0]))
            if len(worst) > args.worst:
                worst.remove(max(worst, key=lambda item: item[0]))

    samples = remember(with_progress(samples, total, "eval"))
    results = evaluate(models, samples, cfg, device, per_image=keep)
    names = class_names_for(cfg.model.num_classes, dataset_info(loaded))
    rows = iou_rows(names, {name: r.iou for name, r in results.items()})
    any_result = next(iter(results.values()))
    print(f"{loaded.source}: {any_result.images} val images of {args.data}, mode "
          f"{cfg.data.eval_mode}{tta_label(cfg)}")  # fmt: skip
    print(to_text(rows))
    out = Path(args.out) if args.out else default_eval_dir(args.checkpoint, cfg)
    paths = write_tables(rows, out, "eval")
    summary = {
        "checkpoint": loaded.source,
        "data": args.data,
        "mode": cfg.data.eval_mode,
        "scales": [float(x) for x in cfg.data.eval_scales],
        "flip": cfg.data.eval_flip,
        "images": any_result.images,
        **{f"{name}_miou": r.miou for name, r in results.items()},
        **{f"{name}_iou": r.iou for name, r in results.items()},
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    for name, r in results.items():  # pixels: rows = ground truth, columns = prediction
        paths.append(out / f"confusion-{name}.csv")
        paths[-1].write_text(to_csv(confusion_rows(names, r.confusion)))
    confusions = top_confusions(names, results[shown].confusion)
    if confusions:
        listed = "; ".join(f"{t} as {p} {100 * s:.1f}%" for t, p, s in confusions)
        print(f"{shown}'s largest confusions (share of the true class's pixels): {listed}")
    title = f"{shown}, {any_result.images} val images, {cfg.data.eval_mode}{tta_label(cfg)}"
    paths.append(plot_confusion(names, results[shown].confusion, out / "confusion.png", title))
    if len(ids) != any_result.images:
        raise RuntimeError(f"{args.data}: {len(ids)} val ids for {any_result.images} images")
    for name, per_image in matrices.items():
        scores = [image_score(matrix) for matrix in per_image]
        table = per_image_rows(ids, scores, names, per_image)
        paths.append(out / f"per-image-{name}.csv")
        paths[-1].write_text(to_csv(table))
        if name == shown:
            listed = ", ".join(f"{row[0]} {row[1]}" for row in table[1:6])
            print(f"{shown}'s lowest per-image mIoU: {listed}")
            chosen = [(key[1], sample) for key, sample in sorted(worst, key=lambda w: w[0])]
            paths += draw_images(loaded, cfg, models[shown], chosen, out / f"worst-{shown}", device)
    for path in [*paths, out / "eval.json"]:
        print(f"wrote {path}")
    return 0


def draw_images(loaded, cfg, model, chosen: list, out: Path, device) -> list[Path]:
    """``<out>/<rank>_<id>.png`` for the ``chosen`` (id, (image, mask)) val samples, in that
    order: image | ground truth | prediction, in the dataset's palette (as TensorBoard's
    predictions)."""
    import numpy as np
    from PIL import Image

    from dssn.train.board import prediction_pictures
    from dssn.train.inference import dataset_info, palette_for

    if not chosen:
        return []
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # an earlier eval's pictures would mix with these
        old.unlink()
    palette = palette_for(cfg.model.num_classes, dataset_info(loaded))
    pictures = prediction_pictures(model, [sample for _, sample in chosen], cfg, device, palette)
    paths = []
    for rank, ((image_id, _), picture) in enumerate(zip(chosen, pictures, strict=True), start=1):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)
        paths.append(out / f"{rank:02d}_{safe}.png")
        Image.fromarray(np.ascontiguousarray(picture)).save(paths[-1])
    return paths


def default_eval_dir(checkpoint: str, cfg) -> Path:
    """``<checkpoint dir>/eval-<mode>``, or ``<dir of file>/<stem>-eval-<mode>`` for a file;
    test-time augmentation adds ``-x<scales>`` and ``-flip`` (e.g. ``eval-original-x0.75-1-1.25-flip``)."""
    name = f"eval-{cfg.data.eval_mode}" + tta_label(cfg, "-x{}", "-", "-flip")
    path = Path(checkpoint)
    if path.is_dir():
        return path / name
    return path.parent / f"{path.stem}-{name}"


# ----------------------------------------------------------------------------- predict


def predict_command(args: argparse.Namespace) -> int:
    from dssn.train.inference import (
        dataset_info,
        list_images,
        load_for_inference,
        palette_for,
        predict_folder,
    )

    loaded = load_for_inference(args.checkpoint, args.config, args.overrides)
    apply_tta(loaded.cfg, args)
    if args.model not in loaded.models:
        print(f"dssn predict: {loaded.source} holds no {args.model}; it has "
              f"{sorted(loaded.models)}", file=sys.stderr)  # fmt: skip
        return 2
    palette = palette_for(loaded.cfg.model.num_classes, dataset_info(loaded))
    try:
        images = list_images(args.images)
    except FileNotFoundError as e:
        print(f"dssn predict: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).absolute()  # earlier outputs inside --images are no inputs
    images = [p for p in images if not p.absolute().is_relative_to(out)]
    root = Path(args.images) if Path(args.images).is_dir() else None  # keep its subfolders
    done = predict_folder(
        loaded.models[args.model], images, args.out, loaded.cfg, palette, args.mode, root=root
    )
    drawn = len(images) - len(done.skipped)
    print(f"{args.model} of {loaded.source} ({args.mode}{tta_label(loaded.cfg)}): {drawn} "
          f"images -> {len(done.written)} PNGs in {args.out}")  # fmt: skip
    if done.skipped:  # the rest are drawn; the status tells a script that some were not
        print(f"dssn predict: {len(done.skipped)} of {len(images)} images could not be read: "
              + ", ".join(str(path) for path, _ in done.skipped), file=sys.stderr)  # fmt: skip
        return 1
    return 0
