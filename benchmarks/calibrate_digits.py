"""Calibrate the built-in digits dataset: is it learnable on a 2-core CPU in the demo's budget?

A plain-PyTorch supervised trainer (no Ray): DeepLabV3+ from ``configs/digits.yaml`` (or the
flags), the labeled-only loss, evaluated on val every ``--eval-every`` iterations. Run it with all
training scenes labeled and with only the 1/16 split; the gap is the room semi-supervision fills.

    python benchmarks/calibrate_digits.py --labeled all --minutes 10
    python benchmarks/calibrate_digits.py --labeled split --minutes 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dssn.config import load_config
from dssn.data import format as fmt
from dssn.data.augment import augment_labeled
from dssn.data.digits import CLASSES, generate
from dssn.method.losses import labeled_ce
from dssn.model import build_model
from dssn.train.metrics import confusion_matrix, iou_per_class, mean_iou


def load_part(root: str, part: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    samples = []
    for path in fmt.list_shards(root, part):
        table = fmt.read_shard(path).to_pydict()
        for image, mask in zip(table["image"], table["mask"], strict=True):
            img = torch.from_numpy(fmt.decode_image(image)).permute(2, 0, 1).contiguous()
            samples.append((img, torch.from_numpy(fmt.decode_mask(mask))))
    return samples


def normalize(images: torch.Tensor, cfg) -> torch.Tensor:
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


@torch.no_grad()
def evaluate(model, val, cfg) -> list[float]:
    model.eval()
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for start in range(0, len(val), 64):
        chunk = val[start : start + 64]
        images = normalize(torch.stack([s[0] for s in chunk]), cfg)
        masks = torch.stack([s[1] for s in chunk])
        pred = model(images).argmax(1)
        matrix += confusion_matrix(pred, masks, len(CLASSES))
    model.train()
    return iou_per_class(matrix)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--labeled", choices=["all", "split"], default="all")
    p.add_argument("--data", help="digits shards with every training scene labeled (generated)")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget")
    p.add_argument("--iters", type=int, default=100_000, help="iteration budget")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="config key=value")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)

    # every training scene labeled: the same scenes as the demo's shards (same seed and size)
    root = args.data or tempfile.mkdtemp(prefix="digits-all-")
    info = fmt.read_dataset_info(cfg.data.root) if Path(cfg.data.root).exists() else None
    gen = dict(info["generator"]) if info else {}
    gen.pop("labeled_fraction", None)
    if args.data is None:
        generate(root, labeled_fraction=1.0, **gen)
    train = load_part(root, "labeled")
    if args.labeled == "split":
        n_split = round(len(train) * (gen.get("labeled_fraction") or 1 / 16))
        n_split = info["counts"]["labeled"] if info else max(1, n_split)
        train = train[:n_split]  # the demo's labeled scenes are the first ones
    val = load_part(root, "val")
    print(f"train scenes {len(train)}  val scenes {len(val)}  ({args.labeled} labeled)")

    model = build_model(cfg.model)
    if cfg.optim.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=1e-4)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay
        )
    budget = args.minutes * 60
    start, it, best = time.time(), 0, 0.0
    batch = cfg.data.batch_size
    while it < args.iters and time.time() - start < budget:
        idx = rng.integers(0, len(train), batch)
        pairs = [augment_labeled(*train[i], cfg.data, rng) for i in idx]
        images = normalize(torch.stack([a for a, _ in pairs]), cfg)
        masks = torch.stack([m for _, m in pairs]).long()
        loss = labeled_ce(model(images), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        if it % args.eval_every == 0:
            miou = mean_iou(evaluate(model, val, cfg))
            best = max(best, miou)
            print(
                f"iter {it:5d}  loss {loss.item():.3f}  val mIoU {100 * miou:5.1f}  "
                f"({time.time() - start:5.0f} s, {it * batch / (time.time() - start):.1f} img/s)",
                flush=True,
            )
    ious = evaluate(model, val, cfg)
    elapsed = time.time() - start
    print(f"\nfinal after {it} iterations, {elapsed:.0f} s ({args.labeled} labeled):")
    for name, iou in zip(CLASSES, ious, strict=True):
        print(f"  {name:>10s}  {100 * iou:5.1f}")
    print(f"  {'mIoU':>10s}  {100 * mean_iou(ious):5.1f}   (best during run {100 * best:.1f})")


if __name__ == "__main__":
    main()
