"""Data throughput: the unlabeled augmentation per CPU core, ours vs the reference's PIL way,
and Ray Data end to end from Parquet shards with 1 and 2 CPUs.

    .venv/bin/python benchmarks/data.py                 # crop 321, VOC-sized JPEGs (500x375)
    .venv/bin/python benchmarks/data.py --samples 32 --ray-rows 128   # quicker

One unlabeled sample = decode + rescale/pad/crop/flip + two strong views + two CutMix boxes +
ignore mask (what DSSN needs per unlabeled image). "PIL reference" runs the same operations as
the DSSN / UniMatch dataset code: one PIL round trip per op, torchvision transforms on PIL
images; "+ normalize" adds its ToTensor/Normalize of the three views (ours normalizes on the
training device instead, see pipeline.to_device).

The Ray Data part ends with where the CPU goes, process by process: Ray's task worker processes,
the same task function (``pipeline.read_and_augment``) run in this process without Ray, Ray's
own actors and agents, the driver that consumes the batches, and GCS / raylet; against the CPU a
sample may cost to meet the target (80% of the per-core rate).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from copy import deepcopy

import numpy as np
import torch
from cluster_cpu import ClusterCPU
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision import transforms

from dssn.config import DataConfig
from dssn.data import augment, pipeline
from dssn.data import format as fmt

VOC_SIZE = (500, 375)  # width, height of most VOC images
IDLE_PROBE_S = 5.0  # seconds the idle cluster's own CPU use is measured


def fabricate_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """VOC-sized JPEGs with photo-like statistics (smooth shapes + texture), quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = VOC_SIZE if i % 4 else VOC_SIZE[::-1]  # a quarter portrait, as in VOC
        coarse = rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        arr = np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ----------------------------------------------------------------------------- PIL reference
# The reference's transforms (UniMatch / DSSN dataset code), written out to time them.


def pil_resize(img, mask, ratio_range):
    w, h = img.size
    long_side = random.randint(int(max(h, w) * ratio_range[0]), int(max(h, w) * ratio_range[1]))
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def pil_crop(img, mask, size, ignore_value):
    w, h = img.size
    padw, padh = max(size - w, 0), max(size - h, 0)
    img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
    mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=ignore_value)
    w, h = img.size
    x, y = random.randint(0, w - size), random.randint(0, h - size)
    return img.crop((x, y, x + size, y + size)), mask.crop((x, y, x + size, y + size))


def pil_hflip(img, mask, p=0.5):
    if random.random() < p:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def pil_blur(img, p=0.5):
    if random.random() < p:
        img = img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))
    return img


def _enhance(cls):
    return lambda img: cls(img).enhance(0.95 - 0.9 * random.random())


def _hue(img):
    v = 0.5 * random.random() * (1 if np.random.random() < 0.5 else -1)
    h, s, val = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.uint8(int(v * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, val)).convert("RGB")


PIL_OPS = [
    lambda img: img,
    ImageOps.autocontrast,
    ImageOps.equalize,
    lambda img: img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0))),
    _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Brightness),
    _enhance(ImageEnhance.Color),
    _enhance(ImageEnhance.Sharpness),
    lambda img: ImageOps.posterize(img, 8 - max(1, int(np.ceil(4 * random.random())))),
    lambda img: ImageOps.solarize(img, 256 - max(1, int(np.ceil(255 * random.random())))),
    _hue,
]
JITTER = transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)
GRAY = transforms.RandomGrayscale(p=0.2)


def pil_strong(img):
    if random.random() < 0.8:
        img = JITTER(img)
    img = pil_blur(GRAY(img), p=0.5)
    for op in random.choices(PIL_OPS, k=np.random.randint(1, 4)):
        img = op(img)
    return img


def pil_cutmix_box(size, p=0.5):
    mask = torch.zeros(size, size)
    if random.random() > p:
        return mask
    area = np.random.uniform(0.02, 0.4) * size * size
    while True:
        ratio = np.random.uniform(0.3, 1 / 0.3)
        w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
        x, y = np.random.randint(0, size), np.random.randint(0, size)
        if x + w <= size and y + h <= size:
            break
    mask[y : y + h, x : x + w] = 1
    return mask


NORMALIZE = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
)


def pil_unlabeled(data: bytes, crop: int, normalize: bool):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    mask = Image.fromarray(np.zeros((img.size[1], img.size[0]), dtype=np.uint8))
    img, mask = pil_resize(img, mask, (0.5, 2.0))
    img, mask = pil_crop(img, mask, crop, 254)
    img, mask = pil_hflip(img, mask)
    img_w, img_s1, img_s2 = deepcopy(img), deepcopy(img), deepcopy(img)
    img_s1, box1 = pil_strong(img_s1), pil_cutmix_box(crop)
    img_s2, box2 = pil_strong(img_s2), pil_cutmix_box(crop)
    ignore = torch.from_numpy(np.array(mask)).long()
    ignore = torch.where(ignore == 254, 255, 0)
    if normalize:
        return NORMALIZE(img_w), NORMALIZE(img_s1), NORMALIZE(img_s2), ignore, box1, box2
    views = [torch.from_numpy(np.array(v)).permute(2, 0, 1) for v in (img_w, img_s1, img_s2)]
    return (*views, ignore, box1, box2)


# ----------------------------------------------------------------------------- timing


def per_core_rate(fn, images: list[bytes], repeats: int) -> float:
    """Samples per CPU-second of ``fn(bytes)`` on one thread (best of ``repeats`` passes).

    CPU time, not wall time: this machine is shared, and other processes would otherwise
    count against whichever implementation they happened to overlap.
    """
    fn(images[0])  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for data in images:
            fn(data)
        best = min(best, time.process_time() - start)
    return len(images) / best


def ours_rate(images: list[bytes], cfg: DataConfig, repeats: int) -> float:
    """Per-core rate of our unlabeled augmentation in this process, on one torch thread: what
    a Ray Data task computes per row (the masks are rebuilt in the train worker)."""
    torch.set_num_threads(1)  # what a Ray Data task gets (OMP_NUM_THREADS=1)
    rng = np.random.default_rng(0)
    return per_core_rate(
        lambda data: augment.unlabeled_views(pipeline.decode_image(data), cfg, rng),
        images,
        repeats,
    )


def task_cost(root: str, cfg: DataConfig, rows: int) -> float:
    """CPU seconds per sample of the pipeline's own task function in this process, on one
    torch thread: ``pipeline.read_and_augment`` over the row groups of a ``rows``-row epoch,
    i.e. read + decode + augment into the output arrays, without Ray."""
    torch.set_num_threads(1)
    info = fmt.read_dataset_info(root)
    plan = pipeline.shard_plan(root, "unlabeled", int(info["counts"]["unlabeled"]), rows)
    start, count = time.process_time(), 0
    for item in plan:
        batch = {k: np.array([item[k]]) for k in ("path", "row_group")}
        count += len(pipeline.read_and_augment(batch, "unlabeled", cfg)["image_u_w"])
    return (time.process_time() - start) / count


def separate_reads_stream(cfg, info: dict, rows: int):
    """The unlabeled stream as it was before reads were fused into the augmentation: a read
    task per row group (0.25 CPU, so Ray Data does not fuse it), then augmentation tasks of
    ``map_batch_rows`` rows; for the side-by-side comparison only."""
    import ray.data

    plan = pipeline.shard_plan(cfg.data.root, "unlabeled", int(info["counts"]["unlabeled"]), rows)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan)).randomize_block_order()
    ds = ds.map_batches(pipeline.read_row_groups, batch_size=1, batch_format="numpy", num_cpus=0.25)
    return ds.map_batches(
        pipeline.unlabeled_batch,
        fn_kwargs={"cfg": cfg.data},
        batch_size=cfg.data.map_batch_rows,
        batch_format="numpy",
        num_cpus=1,
    )


def one_pass(ds, background: float) -> dict:
    """Stream ``ds`` once into the driver in batches of 8; wall rate and cluster CPU."""
    with ClusterCPU() as meter:
        start, count = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
            count += len(batch["image_u_w"])
        wall = time.perf_counter() - start
    return {
        "wall_rate": count / wall,
        "wall_s": wall,
        "cpu_per_sample": meter.seconds() / count,
        # what the pipeline adds to an idle cluster's own CPU use
        "pipeline_cpu_per_sample": (meter.seconds() - background * wall) / count,
        **{f"{kind}_cpu_per_sample": meter.seconds(kind) / count for kind in meter.KINDS},
        "new_processes": meter.started,
        "exited_processes": meter.exited,
    }


def ray_rate(
    root: str, cfg: DataConfig, cpus: int, rows: int, images: list[bytes], passes: int = 3
) -> dict:
    """Throughput of the unlabeled stream over ``rows`` rows, for the pipeline as built
    (``pipeline.train_stream``: one read + augment task per row group) and, alternating pass by
    pass, with separate read tasks. The first (cold) pass of each starts Ray's workers; of the
    ``passes`` warm passes after it, the one that cost the cluster the least CPU is kept (on a
    shared machine Ray sometimes restarts workers mid-pass: their start-up, ~3 CPU-s of imports
    each, is reported in the "processes started / exited" column). A pass in which a process
    exited may have lost that process's last second of CPU, so it is kept only if every pass
    had one.

    Between passes the in-process per-core rate is measured again (this machine's speed drifts
    by tens of percent over minutes); the target uses its median over the run. Also the
    per-core rate of the same augmentation as one plain Ray task (no Ray Data)."""
    import ray

    from dssn.config import Config
    from dssn.train.launcher import init_ray

    init_ray(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        in_worker = ray.get(ray.remote(num_cpus=1)(ours_rate).remote(images, cfg, passes))
        time.sleep(2.0)  # let the task's worker go idle
        with ClusterCPU() as idle:  # the cluster's own processes, no dataset running
            time.sleep(IDLE_PROBE_S)
        background = idle.seconds() / IDLE_PROBE_S  # CPU-s per second
        full = Config()
        full.data = cfg
        info = fmt.read_dataset_info(root)
        variants = {
            "fused": pipeline.train_stream(full, "unlabeled", info, rows),
            "separate reads": separate_reads_stream(full, info, rows),
        }
        results: dict[str, list[dict]] = {name: [] for name in variants}
        in_process, task = [], []
        for _ in range(passes + 1):
            for name, ds in variants.items():
                results[name].append(one_pass(ds, background))
            in_process.append(ours_rate(images, cfg, 1))
            task.append(task_cost(root, cfg, rows))
    finally:
        ray.shutdown()
    out = {}
    for name, runs in results.items():
        whole = [r for r in runs[1:] if not r["exited_processes"]] or runs[1:]
        best = min(whole, key=lambda r: r["cpu_per_sample"])
        out[name] = {**best, "cold_s": runs[0]["wall_s"]}
    return {
        "variants": out,
        "in_worker_rate": in_worker,
        "in_process_rate": float(np.median(in_process)),
        "task_cpu_per_sample": float(np.median(task)),
        "background_cpus": background,
    }


def print_breakdown(results: dict[int, dict]) -> None:
    """Where the fused pipeline's CPU goes, ms a sample, process by process (the kept pass)."""
    print("\nWhere the CPU goes (fused layout, the kept pass), ms a sample. Ray workers: the")
    print("processes that run the read + augment tasks; task function in one process:")
    print("pipeline.read_and_augment over the same row groups without Ray (median between")
    print("passes); Ray's share: the difference (task machinery, output blocks into the object")
    print("store); Ray's actors and agents: Ray Data's stats and autoscaling actors, the")
    print("dashboard and runtime-env agents; driver: this process consuming the batches (Ray")
    print("Data's executor and iterator threads); daemons: GCS, raylet. Budget: the CPU a sample")
    print("may cost to meet the target, i.e. 1 / (80% x per-core in-process rate).\n")
    print("| CPUs | Ray workers | task function in one process | Ray's share in the workers | "
          "Ray's actors and agents | driver | daemons | all | budget |")  # fmt: skip
    print("|-----:|------------:|-----------------------------:|---------------------------:|"
          "------------------------:|-------:|--------:|----:|-------:|")  # fmt: skip
    for cpus, r in results.items():
        v = r["variants"]["fused"]
        ms = {k: 1000 * v[f"{k}_cpu_per_sample"] for k in ClusterCPU.KINDS}
        task = 1000 * r["task_cpu_per_sample"]
        budget = 1000 / (0.8 * r["in_process_rate"])
        print(f"| {cpus:4d} | {ms['worker']:11.2f} | {task:28.2f} | {ms['worker'] - task:26.2f} | "
              f"{ms['service']:23.2f} | {ms['driver']:6.2f} | {ms['daemon']:7.2f} | {1000 * v['cpu_per_sample']:.2f} | "
              f"{budget:6.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="distinct JPEGs")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best is kept)")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument(
        "--ray-rows", type=int, default=1536, help="rows streamed per pass (an epoch)"
    )
    parser.add_argument(
        "--map-batch-rows", type=int, default=DataConfig.map_batch_rows, help="rows per task"
    )
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    cfg = DataConfig(crop_size=args.crop, map_batch_rows=args.map_batch_rows)
    images = fabricate_jpegs(args.samples)

    rates = {
        "ours (fused kernels, crop first)": ours_rate(images, cfg, args.repeats),
        "PIL reference (uint8 outputs)": per_core_rate(
            lambda d: pil_unlabeled(d, args.crop, False), images, args.repeats
        ),
        "PIL reference + normalize": per_core_rate(
            lambda d: pil_unlabeled(d, args.crop, True), images, args.repeats
        ),
    }
    base = rates["ours (fused kernels, crop first)"]
    kb = np.mean([len(d) for d in images]) / 1024
    print(f"\nunlabeled sample (weak + 2 strong + 2 boxes), crop {args.crop}, ")
    print(f"{args.samples} fabricated {VOC_SIZE[0]}x{VOC_SIZE[1]} JPEGs (~{kb:.0f} KB), 1 thread\n")
    print(f"| {'implementation':32s} | samples/s/core | ms/sample | ours is |")
    print(f"|{'-' * 34}|---------------:|----------:|--------:|")
    for name, rate in rates.items():
        print(f"| {name:32s} | {rate:14.1f} | {1000 / rate:9.1f} | {base / rate:6.2f}x |")

    if args.no_ray:
        return
    with tempfile.TemporaryDirectory() as root:
        rows = [
            {"id": f"u{i}", "image": images[i % len(images)], "mask": None,
             "height": VOC_SIZE[1], "width": VOC_SIZE[0]}
            for i in range(args.ray_rows)
        ]  # fmt: skip
        count = fmt.write_part(root, "unlabeled", rows, shard_rows=32)
        counts = {"labeled": 0, "unlabeled": count, "val": 0}
        fmt.write_dataset_info(root, {"name": "bench", "classes": ["a", "b"], "counts": counts})
        cfg.root = root
        print(
            f"\nRay Data end to end: {args.ray_rows} rows from Parquet shards -> decode + augment"
        )
        print("-> numpy batches in the driver; best of 3 warm passes, the two task layouts")
        print("alternating (fused: one read + augment task per row group, as the pipeline is")
        print("built; separate: a read task, then augment tasks). CPU ms/sample: all")
        print("processes of the local cluster (in brackets: the task workers only).")
        print(
            "CPU-based rate = CPUs / cluster CPU-seconds per sample: the rate on dedicated cores.\n"
        )
        print("Idle cluster: CPUs that the local Ray's own processes use with no dataset running")
        print("(GCS, raylet, agents, actors, idle workers); pipeline-only: CPUs / (CPU per sample")
        print("less that background), against the same target.\n")
        print("| CPUs | tasks | wall samples/s | CPU ms/sample (workers) | CPU-based samples/s | "
              "per-core in-process (median) | target: 80% x per-core x CPUs | processes started / exited | "
              "cold pass s | per-core in a Ray task | idle cluster CPUs | "
              "pipeline-only samples/s |")  # fmt: skip
        print("|-----:|:------|---------------:|------------------------:|--------------------:|"
              "-----------------------------:|------------------------------:|--------------:|"
              "------------:|-----------------------:|------------------:|"
              "------------------------:|")  # fmt: skip
        by_cpus = {}
        for cpus in (1, 2):
            r = by_cpus[cpus] = ray_rate(root, cfg, cpus, args.ray_rows, images)
            per_core = r["in_process_rate"]
            target = 0.8 * per_core * cpus
            for name, v in r["variants"].items():
                projected = cpus / v["cpu_per_sample"]
                verdict = "met" if projected >= target else "missed"
                pipeline_only = cpus / v["pipeline_cpu_per_sample"]
                verdict_pipe = "met" if pipeline_only >= target else "missed"
                churn = f"{v['new_processes']} / {v['exited_processes']}"
                cpu_ms = (
                    f"{1000 * v['cpu_per_sample']:.1f} ({1000 * v['worker_cpu_per_sample']:.1f})"
                )
                print(f"| {cpus:4d} | {name:5s} | {v['wall_rate']:14.1f} | {cpu_ms:>23s} | "
                      f"{projected:19.1f} | {per_core:28.1f} | "
                      f"{target:21.1f} ({verdict:6s}) | {churn:>26s} | "
                      f"{v['cold_s']:11.1f} | {r['in_worker_rate']:22.1f} | "
                      f"{r['background_cpus']:17.2f} | {pipeline_only:14.1f} ({verdict_pipe:6s}) |")  # fmt: skip
        print_breakdown(by_cpus)
    print(
        f"\nload average during the run: {os.getloadavg()[0]:.1f} (this machine: "
        f"{os.cpu_count()} CPUs, shared)"
    )


if __name__ == "__main__":
    main()
