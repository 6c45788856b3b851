"""Ray Data pipeline: Parquet shards -> decode -> augment -> per-worker training batches.

In the driver::

    datasets = build_datasets(cfg)        # {"labeled", "unlabeled", "mix", "val"}: Ray Datasets
    TorchTrainer(..., datasets=datasets)  # Ray Train splits each across the workers

In each Ray Train worker::

    for raw in iter_train_batches(cfg, epoch):   # exactly batches_per_epoch(cfg, world) dicts
        batch = to_device(raw, device, cfg)
    for image, mask in iter_val_samples(cfg):    # this worker's val rows, unaugmented

Design (why it looks like this):

- Decoding and augmentation are ``map_batches`` tasks that ask only for CPUs, so on a cluster
  they run on whichever nodes have CPUs free, CPU-only nodes included.
- Three training streams, each split by Ray Train across workers (``streaming_split``, equal
  row counts): ``labeled`` (image_x, mask_x), ``unlabeled`` (weak, 2 strong, ignore, 2 boxes)
  and ``mix``, an independently shuffled and augmented pass over the unlabeled set (the CutMix
  partner u' of METHOD.md; the reference reads it from a second unlabeled loader).
- An epoch is one pass over the unlabeled set: ``n_unlabeled // (batch * workers)`` steps. The
  driver plans one read per row group (32 rows), repeating a part's row groups until they cover
  ``steps * batch * workers`` rows (the labeled set 115 times for VOC 92), so no worker runs
  dry and every worker takes the same number of steps; the rest of the last copy is unread.
- Shuffling without an all-to-all shuffle of image bytes: ``dssn prepare`` writes shards in a
  random order of samples; each epoch the row-group reads come in a new random order
  (``randomize_block_order``), each read permutes its rows (so repeated copies of the labeled
  set come in different orders), and ``iter_torch_batches`` keeps a local shuffle buffer.
- One task per row group (``data.row_groups_per_task``: 1, or 2 for small images) reads and
  augments it (:func:`read_and_augment`), so even a small part spreads over all free CPUs and
  no encoded bytes pass through the object store.
- Augmentation draws come from fresh entropy per batch: Ray Data's execution order is not
  deterministic, so per-sample seeds would not make a run repeatable anyway. The augmentation
  functions themselves (``dssn.data.augment``) are seeded and reproducible.
- Validation rows are read with pyarrow directly (no Ray Data): worker ``rank`` takes rows
  ``rank, rank + world, ...``, so every row is evaluated exactly once (an equal split would
  drop up to world - 1 rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dssn.data import augment
from dssn.data import format as fmt

# batch keys iter_train_batches yields for each training stream (CONTRACTS.md "Method")
LABELED_KEYS = ("image_x", "mask_x")
UNLABELED_KEYS = ("image_u_w", "image_u_s1", "image_u_s2", "ignore_u", "box_u1", "box_u2")
MIX_KEYS = ("image_mix_w", "image_mix_s1", "image_mix_s2", "ignore_mix")
TRAIN_STREAMS = {"labeled": LABELED_KEYS, "unlabeled": UNLABELED_KEYS, "mix": MIX_KEYS}
# what the Ray Datasets carry: ignore masks as padding extents (B, 3) and boxes as (B, 4)
# parameters, expanded to masks in the worker (a quarter less data through the object store)
STREAM_COLUMNS = {
    "labeled": LABELED_KEYS,
    "unlabeled": ("image_u_w", "image_u_s1", "image_u_s2", "extent_u", "boxp_u1", "boxp_u2"),
    "mix": ("image_mix_w", "image_mix_s1", "image_mix_s2", "extent_mix"),
}
READ_COLUMNS = ["id", "image", "mask"]
# local shuffle seeds of the three streams: data.seed + offset (independent orders)
STREAM_SEED_OFFSET = {"labeled": 0, "unlabeled": 1, "mix": 2}


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 (3, H, W) (torchvision's libjpeg-turbo / libpng)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return tv_decode(raw, mode=ImageReadMode.RGB)


def decode_mask(data: bytes) -> torch.Tensor:
    """PNG mask bytes -> uint8 (H, W) class ids (palette indices, not colours)."""
    return torch.from_numpy(fmt.decode_mask(data))


def decode_row(batch: dict[str, np.ndarray], i: int, column: str = "image") -> torch.Tensor:
    """Row ``i``'s image or mask, decoded (:func:`decode_named`), named by its "shard" and "id"."""
    shard = batch["shard"][i] if "shard" in batch else "a shard"
    return decode_named(batch[column][i], column, shard, batch["id"][i])


def decode_named(data: bytes, column: str, shard: str, row_id: str) -> torch.Tensor:
    """An image or mask column's bytes, decoded; a ShardError naming the shard and the row if
    they do not decode. ``dssn prepare`` verified every row, so this is a shard changed or
    damaged since (or written by other means): the error says where, instead of a bare
    decoder message from inside a Ray Data task."""
    try:
        return (decode_image if column == "image" else decode_mask)(data)
    except Exception as e:
        raise fmt.ShardError(
            f"{shard}: row '{row_id}': its {column} does not decode "
            f"({type(e).__name__}: {e}); prepare the dataset again (`dssn prepare`), which "
            f"verifies every row"
        ) from e


# ----------------------------------------------------------------------------- batch functions
# Plain functions of a numpy batch (what map_batches hands over), so they run without Ray too.


def labeled_batch(batch: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
    """Decode + geometric augmentation of labeled rows -> image_x (N,3,S,S), mask_x (N,S,S)."""
    rng = np.random.default_rng()
    n, crop = len(batch["image"]), cfg.crop_size
    images = np.empty((n, 3, crop, crop), np.uint8)
    masks = np.empty((n, crop, crop), np.uint8)
    for i, mask_data in enumerate(batch["mask"]):
        if mask_data is None:
            raise fmt.ShardError(f"labeled row '{batch['id'][i]}' has no mask")
        image, mask = decode_row(batch, i), decode_row(batch, i, "mask")
        _, masks[i] = augment.augment_labeled(image, mask, cfg, rng, out=images[i])
    return {"image_x": images, "mask_x": masks}


def unlabeled_batch(
    batch: dict[str, np.ndarray], cfg: Any, prefix: str = "u"
) -> dict[str, np.ndarray]:
    """Decode + weak / 2 strong views of unlabeled rows, with the padding extent and the two
    CutMix boxes as numbers (STREAM_COLUMNS; :func:`expand_batch` turns them into masks).

    ``prefix`` "u" for the unlabeled stream, "mix" for the CutMix partner (no boxes needed).
    """
    rng = np.random.default_rng()
    n, crop = len(batch["image"]), cfg.crop_size
    # outputs allocated once per batch; the views are written straight into them
    images = {
        view: np.empty((n, 3, crop, crop), np.uint8) for view in ("weak", "strong1", "strong2")
    }
    extents = np.empty((n, 3), np.int32)
    boxes = {box: np.empty((n, 4), np.int32) for box in ("box1", "box2")}
    for i in range(n):
        rows = {view: array[i] for view, array in images.items()}
        views = augment.unlabeled_views(decode_row(batch, i), cfg, rng, out=rows)
        extents[i] = views["extent"]
        for box, array in boxes.items():
            array[i] = views[box]
    out = {
        f"image_{prefix}_w": images["weak"],
        f"image_{prefix}_s1": images["strong1"],
        f"image_{prefix}_s2": images["strong2"],
        f"extent_{prefix}": extents,
    }
    if prefix == "u":
        out.update(boxp_u1=boxes["box1"], boxp_u2=boxes["box2"])
    return out


def mix_batch(batch: dict[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
    """The CutMix partner stream: unlabeled views under the image_mix_* / extent_mix keys."""
    return unlabeled_batch(batch, cfg, "mix")


def expand_batch(raw: dict[str, torch.Tensor], crop: int) -> dict[str, torch.Tensor]:
    """Stream columns -> the batch keys of CONTRACTS.md: padding extents become ignore masks
    (B, S, S) and box parameters CutMix box masks (B, S, S), on the tensors' device."""
    out = dict(raw)
    for extent, ignore in (("extent_u", "ignore_u"), ("extent_mix", "ignore_mix")):
        if extent in out:
            out[ignore] = augment.ignore_from_extent(out.pop(extent), crop)
    for params, box in (("boxp_u1", "box_u1"), ("boxp_u2", "box_u2")):
        if params in out:
            out[box] = augment.boxes_from_params(out.pop(params), crop)
    return out


def val_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode val rows (no augmentation); images keep their own sizes (object columns)."""
    images = np.empty(len(batch["image"]), dtype=object)
    masks = np.empty(len(batch["image"]), dtype=object)
    for i in range(len(images)):
        images[i] = decode_row(batch, i).numpy()
        masks[i] = decode_row(batch, i, "mask").numpy()
    return {"id": batch["id"], "image": images, "mask": masks}


def read_row_groups(batch: dict[str, np.ndarray]):
    """Read the row groups named in ``batch`` ("path", "row_group") -> one pyarrow Table,
    its rows permuted (so repeated copies of a part come in different orders), with a
    "shard" column naming each row's file (for errors: :func:`decode_row`)."""
    import pyarrow as pa

    tables = []
    for path, index in zip(batch["path"], batch["row_group"], strict=True):
        table = fmt.read_row_group(path, int(index), READ_COLUMNS)
        shard = pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(table.num_rows, np.int32)), pa.array([str(path)])
        )
        tables.append(table.append_column("shard", shard))
    table = concat(tables)
    return table.take(np.random.default_rng().permutation(table.num_rows))


def read_and_augment(batch: dict[str, np.ndarray], stream: str, cfg: Any) -> dict[str, np.ndarray]:
    """One task per planned row group (``data.row_groups_per_task`` of them): read them
    (:func:`read_row_groups`), then decode and augment them for ``stream`` into one output
    batch, so the task's output is one block whose columns are single arrays. (Yielding it in
    slices gave no earlier start: Ray Data joins a task's outputs into one block up to
    ``target_max_block_size``, 128 MiB, so the block held one chunk per slice, and a consumer
    slicing batches out of it had to concatenate the chunks, a copy of every view in the
    consuming process.)"""
    table = read_row_groups(batch)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in READ_COLUMNS}
    rows["shard"] = table.column("shard").to_numpy(zero_copy_only=False)
    return BATCH_FUNCTIONS[stream](rows, cfg)


def read_shards_in_order(batch: dict[str, np.ndarray]):
    """Read the shards named in ``batch["path"]`` -> one pyarrow Table, rows in order."""
    return concat([fmt.read_shard(path, READ_COLUMNS) for path in batch["path"]])


def concat(tables: list):
    """One table from shards' tables whose schemas may differ in what the format leaves open
    to other writers: nullability (``pq.write_table`` marks every column nullable, ``dssn
    prepare`` does not) and the width of the types (polars writes ``large_binary``)."""
    import pyarrow as pa

    return pa.concat_tables(tables, promote_options="permissive")


BATCH_FUNCTIONS = {"labeled": labeled_batch, "unlabeled": unlabeled_batch, "mix": mix_batch}
STREAM_PART = {"labeled": "labeled", "unlabeled": "unlabeled", "mix": "unlabeled"}


# ----------------------------------------------------------------------------- sizes


def stream_names(cfg: Any, epoch: int | None = None) -> tuple[str, ...]:
    """The training streams a run needs (``epoch`` None) or reads in ``epoch``: labeled rows
    only for the supervised baseline and during ``dssn.burn_in_epochs``."""
    if cfg.method == "supervised" or (epoch is not None and cfg.labeled_only(epoch)):
        return ("labeled",)
    return tuple(TRAIN_STREAMS)


def iters_per_epoch(cfg: Any, world_size: int, info: dict | None = None) -> int:
    """Steps per epoch: ``train.iters_per_epoch``, else one pass over the unlabeled set (the
    labeled set if there is none): n // (batch * workers * accumulate), at least 1."""
    if cfg.train.iters_per_epoch is not None:
        return cfg.train.iters_per_epoch
    counts = (info or fmt.read_dataset_info(cfg.data.root))["counts"]
    rows = int(counts.get("unlabeled", 0)) or int(counts["labeled"])
    return max(1, rows // (cfg.data.batch_size * world_size * cfg.train.accumulate))


def batches_per_epoch(cfg: Any, world_size: int, info: dict | None = None) -> int:
    """Batches each worker takes from each stream an epoch: ``train.accumulate`` a step."""
    return iters_per_epoch(cfg, world_size, info) * cfg.train.accumulate


def shard_plan(root: str, part: str, count: int, rows_needed: int) -> list[dict[str, Any]]:
    """One item per row-group read: the part's row groups, repeated until they hold at least
    ``rows_needed`` rows. (Repeating paths in ``read_parquet`` does not work: Ray Data reads
    each file once.)"""
    files = fmt.list_shards(root, part)
    if not files or count <= 0:
        raise fmt.ShardError(f"{root}: part '{part}' has no rows; prepare the dataset first")
    groups = [
        {"path": path, "row_group": index}
        for path in files
        for index, rows in enumerate(fmt.shard_row_groups(path))
        if rows
    ]
    copies = math.ceil(rows_needed / count)
    return [{**group, "copy": c} for c in range(copies) for group in groups]


# ----------------------------------------------------------------------------- Ray datasets


def check_classes(cfg: Any, info: dict) -> dict:
    """``info`` (a dataset.json), if its class count is ``model.num_classes``; else a
    ConfigError naming both. More classes in the data put targets out of the model's range;
    fewer leave classes that never occur, and each one predicted anywhere scores 0 IoU."""
    from dssn.config import ConfigError

    classes = len(info["classes"])
    if cfg.model.num_classes != classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes}, but {cfg.data.root} ({info['name']}) "
            f"has {classes} classes: set model.num_classes={classes}, or data.root to the "
            "dataset the config is for"
        )
    return info


def check_training_data(cfg: Any) -> dict:
    """``cfg.data.root``'s dataset.json, checked against ``cfg`` before any Ray starts: the
    class count is ``model.num_classes`` (ConfigError naming both), and the parts a run
    reads have rows (ShardError naming the part). A mismatch would otherwise surface inside
    a train worker, as a target out of range in the loss or a device-side assert."""
    root = cfg.data.root
    info = check_classes(cfg, fmt.read_dataset_info(root))
    needed = ["labeled", "val"] + (["unlabeled"] if cfg.method != "supervised" else [])
    empty = [part for part in needed if int(info["counts"].get(part, 0)) <= 0]
    if empty:
        raise fmt.ShardError(
            f"{root}: {' and '.join(repr(p) for p in empty)} "
            f"{'has' if len(empty) == 1 else 'have'} no rows (dataset.json counts "
            f"{info['counts']}); method {cfg.method!r} needs {', '.join(needed)}"
        )
    return info


def build_datasets(cfg: Any) -> dict[str, Any]:
    """Ray Datasets for training ("labeled", "unlabeled", "mix"; only "labeled" when
    ``cfg.method == "supervised"``) and "val" (decoded rows, for users of Ray Data; training
    evaluation reads val with :func:`iter_val_samples` instead).

    Sized for ``cfg.train.workers`` workers: every worker gets at least
    ``batches_per_epoch * batch_size`` rows of each training stream per epoch.
    """
    import ray.data

    root = cfg.data.root
    info = fmt.read_dataset_info(root)
    world = cfg.train.workers
    rows_needed = batches_per_epoch(cfg, world, info) * cfg.data.batch_size * world
    datasets = {name: train_stream(cfg, name, info, rows_needed) for name in stream_names(cfg)}
    val_shards = fmt.list_shards(root, "val")
    val = ray.data.from_items(
        [{"path": path} for path in val_shards], override_num_blocks=max(1, len(val_shards))
    )
    val = val.map_batches(read_shards_in_order, batch_size=1, batch_format="numpy")
    datasets["val"] = val.map_batches(
        val_batch, batch_size=cfg.data.map_batch_rows, batch_format="numpy"
    )
    return datasets


def train_stream(cfg: Any, stream: str, info: dict, rows_needed: int):
    """One training stream ("labeled", "unlabeled" or "mix") as a Ray Dataset of augmented
    numpy batches, covering at least ``rows_needed`` rows per execution (epoch)."""
    import ray.data

    part = STREAM_PART[stream]
    plan = shard_plan(cfg.data.root, part, int(info["counts"][part]), rows_needed)
    # one block per row group, in a new random order every epoch (every execution)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan)).randomize_block_order()
    # One task reads its row groups and augments them: no separate read task, no object-store
    # round trip of the encoded bytes, a third of the tasks (each costs the driver, raylet and
    # GCS). data.row_groups_per_task plan items per task (Ray Data bundles that many of the
    # shuffled one-item blocks, so the groups of a task change every epoch); 1 spreads even a
    # small part over all free CPUs, 2 halves the tasks' cost for small images.
    return ds.map_batches(
        read_and_augment,
        fn_kwargs={"stream": stream, "cfg": cfg.data},
        batch_size=cfg.data.row_groups_per_task,
        batch_format="numpy",
        num_cpus=1,
    )


def _world() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else Ray Train's context, else 0/1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:  # not inside a Ray Train worker
        return 0, 1


def iter_train_batches(
    cfg: Any, epoch: int, datasets: dict[str, Any] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Exactly ``batches_per_epoch(cfg, world)`` training batches for this worker
    (``train.accumulate`` a step).

    Each dict holds the LABELED_KEYS, UNLABELED_KEYS and MIX_KEYS: uint8 images (B, 3, S, S),
    uint8 masks / ignore / boxes (B, S, S); in labeled-only epochs (supervised, burn-in) the
    LABELED_KEYS alone. Inside Ray Train the streams come from
    ``ray.train.get_dataset_shard``; ``datasets`` (e.g. ``build_datasets(cfg)``) overrides that.
    """
    rank, world = _world()
    if datasets is None:
        import ray.train

        datasets = {name: ray.train.get_dataset_shard(name) for name in stream_names(cfg, epoch)}
    steps = batches_per_epoch(cfg, world)
    buffer = cfg.data.shuffle_buffer or None
    iterators = {
        name: iter(
            datasets[name].iter_torch_batches(
                batch_size=cfg.data.batch_size,
                drop_last=True,
                local_shuffle_buffer_size=buffer,
                local_shuffle_seed=None
                if buffer is None
                else cfg.data.seed + 1000 * epoch + 10 * rank + STREAM_SEED_OFFSET[name],
            )
        )
        for name in stream_names(cfg, epoch)
    }
    for step in range(steps):
        batch: dict[str, torch.Tensor] = {}
        for name, it in iterators.items():
            try:
                batch.update(expand_batch(next(it), cfg.data.crop_size))
            except StopIteration:
                raise RuntimeError(
                    f"stream '{name}' ran dry at batch {step + 1}/{steps} of epoch {epoch + 1} on "
                    f"worker {rank}/{world}: build_datasets sized it for train.workers="
                    f"{cfg.train.workers}; is that the number of workers running?"
                ) from None
        yield batch


def to_device(raw: dict[str, torch.Tensor], device: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """uint8 batch -> device tensors: images float normalized with data.mean/std (optionally
    channels_last), masks / ignore / boxes long."""
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1) * augment.MAX_VALUE
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1) * augment.MAX_VALUE
    out = {}
    for key, value in raw.items():
        value = value.to(device, non_blocking=True)
        if key.startswith("image_"):
            value = (value.float() - mean) / std  # (B, 3, H, W)
            if cfg.train.channels_last:
                value = value.contiguous(memory_format=torch.channels_last)
        else:
            value = value.long()  # (B, H, W)
        out[key] = value
    return out


# ----------------------------------------------------------------------------- validation


def iter_val_samples(
    cfg: Any, shard: str = "val", rank: int | None = None, world_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image uint8 (3, H, W), mask uint8 (H, W)) for this worker's rows of ``shard``.

    Rows are dealt round-robin over workers (rank, rank + world, ...), so together the workers
    see every row exactly once. Reads Parquet with pyarrow: works with or without Ray.
    """
    if rank is None or world_size is None:
        rank, world_size = _world()
    index = 0
    for path in fmt.list_shards(cfg.data.root, shard):
        table = fmt.read_shard(path, ["id", "image", "mask"])
        n = table.num_rows
        mine = np.array([i for i in range(n) if (index + i) % world_size == rank], np.int64)
        index += n
        for row in table.take(mine).to_pylist():
            if row["mask"] is None:
                raise fmt.ShardError(f"{path}: row '{row['id']}' has no mask")
            yield (
                decode_named(row["image"], "image", path, row["id"]),
                decode_named(row["mask"], "mask", path, row["id"]),
            )
