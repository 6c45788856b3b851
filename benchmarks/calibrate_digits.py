"""Calibrate the built-in digits dataset: is it learnable on a 2-core CPU in the demo's budget?

A plain-PyTorch supervised trainer (no Ray) over digits shards: DeepLabV3+ from
``configs/digits.yaml`` (and the flags / ``key=value`` overrides), the labeled cross-entropy of
``dssn.method``, the optimizer and poly schedule of ``dssn.train.schedule``, the labeled
augmentation of ``dssn.data.augment``; val mIoU from a confusion matrix every ``--eval-every``
iterations and a per-class IoU table at the end. Run it with every training scene labeled and
with the demo's 1/16 split only: the gap is the room semi-supervision has to fill.

    python benchmarks/calibrate_digits.py --labeled all   --iters 3000
    python benchmarks/calibrate_digits.py --labeled split --iters 3000

``--method dssn`` trains the DSSN step instead (in this process, no Ray: a quick way to try
method settings before a Ray run), on the 1/16 split with the other training scenes unlabeled,
after ``--burn-in`` supervised-only iterations, and scores the EMA teacher as the Ray runs do:

    python benchmarks/calibrate_digits.py --labeled split --method dssn --burn-in 1000 \
        --iters 2500 --threads 1 dssn.selection=topk

The training scenes are generated (seconds) with the generator options of ``--digits`` (e.g.
``--digits size_min=32 digits_max=2``) and ``labeled_fraction=1``: the same scenes as the
demo's shards, all with masks; ``split`` keeps the first ``round(n_train * 1/16)`` of them,
which are exactly the demo's labeled scenes.

Timing on a shared machine: wall-clock time depends on who else runs. Every progress line gives
the iterations, the wall seconds and this process's CPU seconds (all threads), and the budget can
be CPU time (``--cpu-minutes``): ten minutes on two idle cores are at most 20 CPU-minutes.
OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, set before torch loads): spinning
threads on oversubscribed cores burn 5-10x the CPU of the work itself. On idle cores the
passive wake-ups cost instead (a two-thread bf16 DSSN step of the digits: 0.24 s against 0.14
s spinning): there, run with ``OMP_WAIT_POLICY=ACTIVE`` in the environment.

``train.amp=bf16`` and ``train.channels_last`` of the config apply here as in the Ray workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from dssn.config import Config, load_config  # noqa: E402
from dssn.data import format as fmt  # noqa: E402
from dssn.data.augment import augment_labeled, augment_unlabeled  # noqa: E402
from dssn.data.digits import CLASSES, generate, labeled_count, make_spec  # noqa: E402
from dssn.method import EMATeacher, step  # noqa: E402
from dssn.method.losses import labeled_ce  # noqa: E402
from dssn.model import build_model  # noqa: E402
from dssn.train.evaluate import amp_enabled, autocast_for  # noqa: E402
from dssn.train.metrics import confusion_matrix, iou_per_class, mean_iou  # noqa: E402
from dssn.train.schedule import build_optimizer, set_poly_lr  # noqa: E402

EVAL_CHUNK = 64  # val images per forward pass
CPU = torch.device("cpu")


def build_network(cfg: Config) -> torch.nn.Module:
    """The config's network, channels-last if ``train.channels_last`` (as the Ray workers)."""
    model = build_model(cfg.model)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def load_part(root: str, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a part, decoded: images (N, 3, H, W) uint8, masks (N, H, W) uint8."""
    images, masks = [], []
    for row in fmt.iter_rows(root, part, ["image", "mask"]):
        image = fmt.decode_image(row["image"]).copy()  # PIL's array is read-only
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        masks.append(torch.from_numpy(fmt.decode_mask(row["mask"])))
    return torch.stack(images), torch.stack(masks)


def normalize(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet-normalized (as the training pipeline)."""
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor], cfg: Config):
    """Per-class IoU on whole val scenes (eval_mode original)."""
    model.eval()
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    images, masks = val
    for start in range(0, len(images), EVAL_CHUNK):
        with autocast_for(cfg, CPU):
            logits = model(normalize(images[start : start + EVAL_CHUNK], cfg))  # (b, C, H, W)
        matrix += confusion_matrix(
            logits.argmax(1), masks[start : start + EVAL_CHUNK], len(CLASSES)
        )
    model.train()
    return iou_per_class(matrix)


def train_batch(train, cfg: Config, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random labeled batch through the geometric augmentation: (B,3,S,S) float, (B,S,S) long."""
    images, masks = train
    idx = rng.integers(0, len(images), cfg.data.batch_size)
    pairs = [augment_labeled(images[i], masks[i], cfg.data, rng) for i in idx]
    x = normalize(torch.stack([a for a, _ in pairs]), cfg)
    return x, torch.stack([m for _, m in pairs]).long()


def dssn_batch(
    train, cfg: Config, rng: np.random.Generator, unlabeled: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A DSSN batch (docs/CONTRACTS.md keys) through the real augmentations: B labeled scenes
    of ``train``, B unlabeled and B CutMix partners from ``unlabeled`` (default: ``train``'s
    images, masks unused)."""
    x, y = train_batch(train, cfg, rng)
    images = train[0] if unlabeled is None else unlabeled
    views = {"u": [], "mix": []}
    for key in views:
        for i in rng.integers(0, len(images), cfg.data.batch_size):
            views[key].append(augment_unlabeled(images[i], cfg.data, rng))

    def stack(key: str, name: str, image: bool = True) -> torch.Tensor:
        out = torch.stack([v[name] for v in views[key]])
        return normalize(out, cfg) if image else out.long()

    return {
        "image_x": x,
        "mask_x": y,
        "image_u_w": stack("u", "weak"),
        "image_u_s1": stack("u", "strong1"),
        "image_u_s2": stack("u", "strong2"),
        "ignore_u": stack("u", "ignore", False),
        "box_u1": stack("u", "box1", False),
        "box_u2": stack("u", "box2", False),
        "image_mix_w": stack("mix", "weak"),
        "image_mix_s1": stack("mix", "strong1"),
        "image_mix_s2": stack("mix", "strong2"),
        "ignore_mix": stack("mix", "ignore", False),
    }


def step_costs(train, cfg: Config, iters: int, rng: np.random.Generator) -> dict[str, float]:
    """CPU seconds (this process, all threads) per iteration, median of ``iters`` after one
    warm-up: the supervised step, the DSSN step (forward, backward, optimizer, EMA update) and
    the augmentation of one DSSN batch (which Ray Data runs on the same cores)."""
    model = build_network(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMATeacher(model, cfg.dssn.ema, fused=cfg.dssn.fused_ema)
    costs: dict[str, list[float]] = {"augment": [], "supervised": [], "dssn": []}
    for it in range(iters + 1):
        c0 = time.process_time()
        batch = dssn_batch(train, cfg, rng)
        c1 = time.process_time()
        with autocast_for(cfg, CPU):
            loss = labeled_ce(model(batch["image_x"]), batch["mask_x"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        c2 = time.process_time()
        with autocast_for(cfg, CPU):
            loss, _ = step(model, ema.teacher, batch, cfg, iteration=it + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        c3 = time.process_time()
        if it:  # the first is warm-up
            for name, seconds in zip(costs, (c1 - c0, c2 - c1, c3 - c2), strict=True):
                costs[name].append(seconds)
    return {name: float(np.median(values)) for name, values in costs.items()}


def parse_options(items: list[str]) -> dict:
    """``["size_min=32", ...]`` -> {"size_min": 32, ...} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--digits: '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        out[key] = yaml.safe_load(raw)
    return out


def build_config(args: argparse.Namespace) -> Config:
    flags = {
        "model.backbone": args.backbone,
        "model.width": args.width,
        "model.output_stride": args.os,
        "optim.optimizer": args.optimizer,
        "optim.lr": args.lr,
        "data.batch_size": args.batch,
        "data.crop_size": args.crop,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = load_config(args.config, overrides)
    if args.batch is None and cfg.train.workers > 1:
        # one process plays all the workers of a Ray run: a step sees their global batch
        global_batch = cfg.data.batch_size * cfg.train.workers
        cfg = load_config(args.config, [*overrides, f"data.batch_size={global_batch}"])
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--labeled", choices=["all", "split"], default="all")
    p.add_argument("--digits", nargs="*", default=[], metavar="KEY=VALUE", help="generator")
    p.add_argument("--data", help="existing shards with every training scene labeled")
    p.add_argument("--iters", type=int, default=3000, help="iterations (the poly schedule)")
    p.add_argument("--minutes", type=float, default=math.inf, help="wall-clock budget")
    p.add_argument("--cpu-minutes", type=float, default=math.inf, help="process CPU budget")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument(
        "--method",
        choices=["supervised", "dssn"],
        default="supervised",
        help="dssn: the DSSN step (dssn.* overrides apply) on the split, the rest unlabeled; "
        "the EMA teacher is evaluated",
    )
    p.add_argument(
        "--burn-in",
        type=int,
        help="dssn: supervised-only first iterations (default: the config's "
        "dssn.burn_in_epochs x train.iters_per_epoch)",
    )
    p.add_argument(
        "--score",
        choices=["student", "teacher"],
        help="network evaluated (default: the EMA teacher for dssn, the student otherwise)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backbone")
    p.add_argument("--width", type=int)
    p.add_argument("--os", type=int, help="output stride (8 or 16)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--batch", type=int, help="scenes a step (default: data.batch_size x train.workers)"
    )
    p.add_argument("--crop", type=int)
    p.add_argument(
        "--step-cost",
        type=int,
        default=0,
        metavar="N",
        help="first time N supervised and N DSSN iterations (CPU s per iteration)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    burn_in = args.burn_in
    if burn_in is None:
        burn_in = cfg.dssn.burn_in_epochs * cfg.train.iters_per_epoch
    # this loop runs the burn-in itself, by iteration: step() must not see burn-in epochs too
    # (it is called with epoch 0, which would make every step a labeled-only one)
    cfg.dssn.burn_in_epochs = 0
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)

    options = parse_options(args.digits)
    spec = make_spec(**options)
    root = args.data or tempfile.mkdtemp(prefix="digits-all-")
    if args.data is None:
        generate(root, **{**options, "labeled_fraction": 1.0})
    try:
        train = load_part(root, "labeled")
        val = load_part(root, "val")
    finally:
        if args.data is None:
            shutil.rmtree(root, ignore_errors=True)
    unlabeled = train[0]  # DSSN's unlabeled pool: every training scene's image
    if args.labeled == "split":  # the demo's labeled scenes are the first ones
        n = labeled_count(spec)
        train, unlabeled = (train[0][:n], train[1][:n]), train[0][n:]
    if args.method == "dssn" and args.labeled == "all":
        raise SystemExit("--method dssn needs --labeled split (the rest are its unlabeled)")

    model = build_network(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{len(train[0])} training scenes ({args.labeled} labeled), {len(val[0])} val | "
        f"{cfg.model.backbone} width {cfg.model.width} OS {cfg.model.output_stride} "
        f"({params / 1e6:.2f}M) | {cfg.optim.optimizer} lr {cfg.optim.lr} x{cfg.optim.lr_multi}"
        f" | batch {cfg.data.batch_size} crop {cfg.data.crop_size} | {args.iters} iters | "
        f"{args.threads} threads{' bf16' if amp_enabled(cfg, CPU) else ''}"
        f"{' channels-last' if cfg.train.channels_last else ''} | "
        f"digits {options or 'defaults'} | {args.method}"
        + (f" ({cfg.dssn.selection}, burn-in {burn_in})" if args.method == "dssn" else ""),
        flush=True,
    )
    if args.step_cost:
        costs = step_costs(train, cfg, args.step_cost, np.random.default_rng(cfg.train.seed))
        print(
            f"CPU s per iteration (batch {cfg.data.batch_size}, crop {cfg.data.crop_size}): "
            f"supervised {costs['supervised']:.3f} | DSSN {costs['dssn']:.3f} "
            f"({costs['dssn'] / costs['supervised']:.1f}x) + its augmentation "
            f"{costs['augment']:.3f} -> DSSN {cfg.data.batch_size * 3 / (costs['dssn'] + costs['augment']):.1f} "
            f"images per CPU-s (labeled + unlabeled + partner)",
            flush=True,
        )
    wall0, cpu0 = time.perf_counter(), time.process_time()
    it, best, losses, dssn_steps = 0, 0.0, [], 0

    def spent() -> tuple[float, float]:
        return time.perf_counter() - wall0, time.process_time() - cpu0

    ema = EMATeacher(model, cfg.dssn.ema, fused=cfg.dssn.fused_ema)
    # the Ray runs report the EMA teacher; the calibration tables are of the student
    score = args.score or ("teacher" if args.method == "dssn" else "student")
    scored = ema.teacher if score == "teacher" else model
    while it < args.iters:
        wall, cpu = spent()
        if wall > 60 * args.minutes or cpu > 60 * args.cpu_minutes:
            break
        if args.method == "dssn" and it >= burn_in:
            batch = dssn_batch(train, cfg, rng, unlabeled)
            with autocast_for(cfg, CPU):
                loss, metrics = step(model, ema.teacher, batch, cfg, iteration=it)
            dssn_steps += "loss_fa" in metrics  # the unlabeled terms were computed
        else:
            x, y = train_batch(train, cfg, rng)
            with autocast_for(cfg, CPU):
                loss = labeled_ce(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        set_poly_lr(optimizer, it, args.iters, cfg.optim.poly_power)
        losses.append(loss.item())
        it += 1
        if it % args.eval_every == 0:
            miou = mean_iou(evaluate(scored, val, cfg))
            best = max(best, miou)
            wall, cpu = spent()
            print(
                f"iter {it:5d}  loss {np.mean(losses[-args.eval_every :]):.3f}  "
                f"val mIoU {100 * miou:5.1f}  wall {wall:6.0f} s  cpu {cpu:6.0f} s  "
                f"({it * cfg.data.batch_size / cpu:5.1f} img per cpu-s)",
                flush=True,
            )
    ious = evaluate(scored, val, cfg)
    wall, cpu = spent()
    print(
        f"\nfinal: {it} iterations ({dssn_steps} DSSN steps), wall {wall:.0f} s, cpu {cpu:.0f} s ({args.labeled} labeled,"
        f" {score} IoU)"
    )
    for name, iou in zip(CLASSES, ious, strict=True):
        print(f"  {name:>10s}  {100 * iou:5.1f}")
    best = max(best, mean_iou(ious))
    print(f"  {'mIoU':>10s}  {100 * mean_iou(ious):5.1f}   (best of the run {100 * best:.1f})")


if __name__ == "__main__":
    main()
