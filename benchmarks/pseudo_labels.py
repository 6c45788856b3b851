"""How good are a teacher's pseudo-labels, class by class, under each selection rule?

For every checkpoint named, its EMA teacher labels the unlabeled training scenes as the DSSN
step does (its argmax over the un-augmented image; BatchNorm on the batch's statistics, because
the reference never puts the teacher in eval mode: ``--bn eval`` uses the running statistics
instead). Then, per ground-truth class c and per selection rule (``dssn``, ``threshold``,
``topk`` with the checkpoint config's parameters, and ``none`` = every pixel):

- **selected**: the share of c's pixels the rule lets into the unlabeled losses;
- **right**: the share of c's pixels that are selected *and* pseudo-labelled c;
- **wrong**: the share selected with another pseudo-label: training pulls these pixels away
  from c ("mostly taken by": that label's most frequent value, under the run's own rule).

"right" is what a rule gives a class, "wrong" what it takes. A rule can only help a class whose
pixels the teacher labels correctly somewhere; where "right" is 0 under ``none``, no rule can.

The unlabeled rows carry no masks: for the built-in digits they are rendered again from the
generator options stored in each shard's footer (``--part val`` scores the val scenes instead,
for any dataset, from their stored masks).

    python benchmarks/pseudo_labels.py runs/digits-dssn runs/digits-threshold
    python benchmarks/pseudo_labels.py runs/digits-dssn --part val --bn eval

A run directory stands for its last ``checkpoint_epoch_*``. Scenes go through the teacher in
batches of ``data.batch_size`` (``--batch``); scenes of different sizes go one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from dssn.config import IGNORE_INDEX, Config
from dssn.data import digits
from dssn.data import format as fmt
from dssn.data.pipeline import decode_image, decode_mask
from dssn.method.selection import select
from dssn.train.checkpoint import is_checkpoint_dir, resolve_checkpoint
from dssn.train.evaluate import autocast_for
from dssn.train.inference import Loaded, load_for_inference
from dssn.train.tables import class_names_for

RULES = ("dssn", "threshold", "topk", "none")
PROGRESS_EVERY = 500  # scenes between progress lines (stderr)


def tally(logits: torch.Tensor, mask: torch.Tensor, cfg: Config, rules=RULES) -> dict:
    """Counts for one batch: logits (B, C, H, W), mask (B, H, W) with IGNORE_INDEX ignored.

    Returns {"pixels": (C,) ground-truth pixels per class, rule: (C, C) confusion matrix of the
    pixels the rule selects, rows = ground truth, columns = pseudo-label}.
    """
    classes = logits.shape[1]
    mask = mask.long()
    valid = mask != IGNORE_INDEX
    if (mask[valid] >= classes).any():
        bad = sorted(set(mask[valid].unique().tolist()) - set(range(classes)))
        raise ValueError(f"mask class ids {bad} outside 0..{classes - 1} (or {IGNORE_INDEX})")
    pair = mask * classes + logits.argmax(dim=1)  # (B, H, W): truth * C + pseudo-label
    out = {"pixels": torch.bincount(mask[valid], minlength=classes)}
    for rule in rules:
        chosen = select(logits, replace(cfg.dssn, selection=rule)) & valid
        out[rule] = torch.bincount(pair[chosen], minlength=classes * classes).view(classes, -1)
    return out


def add(total: dict | None, part: dict) -> dict:
    """Sum two :func:`tally` results."""
    return part if total is None else {k: total[k] + v for k, v in part.items()}


def checkpoint_dir(path: str) -> Path:
    """A checkpoint directory, or a run directory's last ``checkpoint_epoch_*``."""
    p = resolve_checkpoint(path)
    if not is_checkpoint_dir(p):
        sys.exit(f"pseudo_labels: {p} is neither a checkpoint nor a run with checkpoint_epoch_*")
    return p


def scenes(root: str, part: str, limit: int | None):
    """(id, image uint8 (3, H, W), mask uint8 (H, W)) of ``part``; digits' unlabeled masks are
    rendered again from the shard footers' generator options."""
    shards = fmt.list_shards(root, part)
    if not shards:
        sys.exit(f"pseudo_labels: no {part} shards under {root}")
    count = 0
    for path in shards:
        _, meta = fmt.read_shard_metadata(path)
        spec = (
            digits.DigitsSpec(**json.loads(meta[digits.FOOTER_KEY]))
            if digits.FOOTER_KEY in meta
            else None
        )
        for row in fmt.read_shard(path, ["id", "image", "mask"]).to_pylist():
            if limit is not None and count >= limit:
                return
            if row["mask"] is not None:
                mask = decode_mask(row["mask"])
            elif spec is not None:  # "train-00123": scene 123 of the training stream
                kind, index = row["id"].rsplit("-", 1)
                mask = torch.from_numpy(digits.render_scene(spec, kind, int(index))[1])
            else:
                sys.exit(
                    f"pseudo_labels: {path}: row '{row['id']}' has no mask (only the built-in "
                    "digits can be rendered again; use --part val)"
                )
            count += 1
            yield row["id"], decode_image(row["image"]), mask


def batches(samples, size: int):
    """Stacks of up to ``size`` samples of one image size."""
    group: list = []
    for _, image, mask in samples:
        if group and (len(group) == size or group[0][0].shape != image.shape):
            yield group
            group = []
        group.append((image, mask))
    if group:
        yield group


@torch.no_grad()
def score(path: str, args: argparse.Namespace) -> tuple[Loaded, dict, int]:
    loaded = load_for_inference(checkpoint_dir(path))
    cfg, teacher = loaded.cfg, loaded.models["teacher"]
    teacher.train(args.bn == "train")
    root = args.data or cfg.data.root
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    total, images = None, 0
    for group in batches(scenes(root, args.part, args.limit), args.batch or cfg.data.batch_size):
        x = (torch.stack([image for image, _ in group]).float() / 255 - mean) / std
        with autocast_for(cfg, torch.device("cpu")):
            logits = teacher(x).float()
        total = add(total, tally(logits, torch.stack([mask for _, mask in group]), cfg))
        images += len(group)
        if images // PROGRESS_EVERY > (images - len(group)) // PROGRESS_EVERY:
            print(f"{path}: {images} {args.part} scenes scored", file=sys.stderr, flush=True)
    if not (loaded.dataset or {}).get("classes"):  # class names from the shards instead
        with contextlib.suppress(fmt.ShardError):  # else numbers for names
            loaded.dataset = fmt.read_dataset_info(root)
    return loaded, total, images


def report(name: str, loaded, total: dict, images: int, part: str, bn: str) -> None:
    cfg = loaded.cfg
    names = class_names_for(cfg.model.num_classes, loaded.dataset)
    d = cfg.dssn
    own = d.selection if d.selection in RULES else "dssn"
    trained = "supervised-only" if cfg.method == "supervised" else f"with selection {d.selection}"
    print(
        f"\n{name}: teacher on {images} {part} scenes, BatchNorm {bn}; trained {trained}. "
        f"Rules: dssn (ratio {d.select_ratio}, floor {d.select_floor}), threshold "
        f"{d.threshold}, topk {d.topk_ratio}, none (every pixel)"
    )
    print(
        "percent of each class's pixels selected with the right pseudo-label / a wrong one; "
        f"the wrong one most often, under {own}"
    )
    header = (
        f"{'class':<12}{'pixels':>9}"
        + "".join(f"{r + ' right/wrong':>22}" for r in RULES)
        + f"{'mostly taken by':>20}"
    )
    print(header)
    print("-" * len(header))
    for c, cname in enumerate(names):
        n = total["pixels"][c].item()
        cells = [f"{cname:<12}{n:>9}"]
        for rule in RULES:
            row = total[rule][c]
            right, wrong = row[c].item(), row.sum().item() - row[c].item()
            cell = "-" if n == 0 else f"{100 * right / n:.1f} / {100 * wrong / n:>5.1f}"
            cells.append(f"{cell:>22}")
        row = total[own][c].clone()
        row[c] = 0
        if n and row.sum() > 0:
            cells.append(
                f"{names[row.argmax()]} ({100 * row.max().item() / row.sum().item():.0f}%)".rjust(
                    20
                )
            )
        print("".join(cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint or run directories")
    p.add_argument("--part", choices=["unlabeled", "val", "labeled"], default="unlabeled")
    p.add_argument("--data", help="shard root (default: the checkpoint config's data.root)")
    p.add_argument("--bn", choices=["train", "eval"], default="train")
    p.add_argument("--batch", type=int, help="scenes per teacher pass (default data.batch_size)")
    p.add_argument("--limit", type=int, help="score only the first N scenes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in args.checkpoints:
        loaded, total, images = score(path, args)
        report(path, loaded, total, images, args.part, args.bn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
