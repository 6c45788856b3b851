"""The data pipeline: batch functions and readers without Ray, and one real TorchTrainer run
(2 CPU workers) checking shapes, dtypes, equal step counts and disjoint rows per worker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dssn.config import Config
from dssn.data import format as fmt
from dssn.data import pipeline

CROP = 32


def constant_rows(values, labeled: bool, size=(40, 44), prefix="r"):
    """Rows whose image is one constant grey level: a weak view reveals which row it was."""
    h, w = size
    for v in values:
        image = np.full((h, w, 3), v, dtype=np.uint8)
        mask = np.full((h, w), v % 3, dtype=np.uint8)
        yield {
            "id": f"{prefix}{v}",
            "image": fmt.encode_image(image, "jpeg" if v % 2 else "png"),
            "mask": fmt.encode_mask(mask) if labeled else None,
            "height": h,
            "width": w,
        }


def make_shards(root: Path, n_labeled=3, n_unlabeled=20, n_val=5, shard_rows=4) -> Path:
    counts = {
        "labeled": fmt.write_part(root, "labeled", constant_rows(range(200, 200 + n_labeled), True), shard_rows),
        "unlabeled": fmt.write_part(root, "unlabeled", constant_rows(range(1, 1 + n_unlabeled), False), shard_rows),
        "val": fmt.write_part(root, "val", constant_rows(range(100, 100 + n_val), True), shard_rows),
    }  # fmt: skip
    fmt.write_dataset_info(root, {"name": "const", "classes": ["a", "b", "c"], "counts": counts})
    return root


def make_cfg(root: Path, workers: int = 1) -> Config:
    cfg = Config()
    cfg.data.root = str(root)
    cfg.data.crop_size = CROP
    cfg.data.batch_size = 2
    cfg.data.map_batch_rows = 4
    cfg.train.workers = workers
    return cfg


def numpy_batch(root: Path, part: str) -> dict[str, np.ndarray]:
    table = fmt.read_shard(fmt.list_shards(root, part)[0], pipeline.READ_COLUMNS)
    return {name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names}


def test_batch_functions_shapes_and_dtypes(tmp_path):
    root = make_shards(tmp_path)
    cfg = make_cfg(root)
    labeled = pipeline.labeled_batch(numpy_batch(root, "labeled"), cfg.data)
    assert labeled["image_x"].shape == (3, 3, CROP, CROP) and labeled["mask_x"].shape == (
        3,
        CROP,
        CROP,
    )
    assert labeled["image_x"].dtype == labeled["mask_x"].dtype == np.uint8
    assert set(np.unique(labeled["mask_x"])) <= {0, 1, 2, 255}
    unlabeled = pipeline.unlabeled_batch(numpy_batch(root, "unlabeled"), cfg.data)
    assert tuple(unlabeled) == pipeline.STREAM_COLUMNS["unlabeled"]
    assert unlabeled["image_u_s1"].shape == (4, 3, CROP, CROP)
    assert unlabeled["extent_u"].shape == (4, 3) and unlabeled["boxp_u2"].shape == (4, 4)
    mix = pipeline.mix_batch(numpy_batch(root, "unlabeled"), cfg.data)
    assert tuple(mix) == pipeline.STREAM_COLUMNS["mix"]
    batch = pipeline.expand_batch({k: torch.from_numpy(v) for k, v in unlabeled.items()}, CROP)
    assert set(batch) == set(pipeline.UNLABELED_KEYS)
    assert batch["box_u2"].shape == batch["ignore_u"].shape == (4, CROP, CROP)
    # a constant image stays constant in the weak view (geometry only); padding is 0 / ignore
    weak, ignore = batch["image_u_w"], batch["ignore_u"]
    for i, value in enumerate(range(1, 5)):
        assert set(weak[i][:, ignore[i] == 0].unique().tolist()) == {value}
        assert (weak[i][:, ignore[i] == 255] == 0).all()
    for i in range(4):  # each box mask is the rectangle its parameters name
        top, left, height, width = unlabeled["boxp_u1"][i].tolist()
        box = batch["box_u1"][i]
        assert int(box.sum()) == height * width
        assert height == 0 or int(box[top : top + height, left : left + width].min()) == 1


def test_expand_batch_matches_the_sample_functions():
    from dssn.data import augment

    cfg = make_cfg(Path("unused")).data
    image = torch.full((3, 20, 50), 9, dtype=torch.uint8)
    for seed in range(10):
        views = augment.unlabeled_views(image, cfg, np.random.default_rng(seed))
        full = augment.augment_unlabeled(image, cfg, np.random.default_rng(seed))
        raw = {"extent_u": torch.from_numpy(views["extent"])[None],
               "boxp_u1": torch.from_numpy(views["box1"])[None]}  # fmt: skip
        batch = pipeline.expand_batch(raw, CROP)
        assert torch.equal(batch["ignore_u"][0], full["ignore"])
        assert torch.equal(batch["box_u1"][0], full["box1"])
        assert torch.equal(full["ignore"] == 255, (full["weak"] == 0).all(0))


def test_iters_per_epoch_and_shard_plan(tmp_path):
    root = make_shards(tmp_path)
    cfg = make_cfg(root)
    assert pipeline.iters_per_epoch(cfg, 1) == 10 and pipeline.iters_per_epoch(cfg, 2) == 5
    assert pipeline.iters_per_epoch(cfg, 16) == 1  # never zero: the streams repeat instead
    cfg.train.accumulate = 2  # 2 batches a step: half the steps, the same batches
    assert pipeline.iters_per_epoch(cfg, 1) == 5 and pipeline.batches_per_epoch(cfg, 1) == 10
    assert pipeline.iters_per_epoch(cfg, 2) == 2 and pipeline.batches_per_epoch(cfg, 2) == 4
    cfg.train.iters_per_epoch = 7
    assert pipeline.iters_per_epoch(cfg, 2) == 7 and pipeline.batches_per_epoch(cfg, 2) == 14
    cfg.train.accumulate = 1
    assert pipeline.iters_per_epoch(cfg, 2) == 7
    # no unlabeled rows: an epoch is a pass over the labeled set; supervised reads only that
    only_labeled = make_shards(tmp_path / "sup", n_labeled=9, n_unlabeled=0)
    cfg = make_cfg(only_labeled)
    assert pipeline.iters_per_epoch(cfg, 1) == 4
    assert pipeline.stream_names(cfg) == ("labeled", "unlabeled", "mix")
    cfg.dssn.burn_in_epochs = 2  # labeled-only epochs 0 and 1; the run still needs all three
    assert pipeline.stream_names(cfg) == ("labeled", "unlabeled", "mix")
    assert [pipeline.stream_names(cfg, e) for e in range(3)] == [("labeled",)] * 2 + [
        ("labeled", "unlabeled", "mix")
    ]
    cfg.method = "supervised"
    assert pipeline.stream_names(cfg) == pipeline.stream_names(cfg, 5) == ("labeled",)
    plan = pipeline.shard_plan(str(root), "labeled", 3, rows_needed=20)
    assert len(plan) == 7 and {p["copy"] for p in plan} == set(range(7))  # 7 copies x 3 rows
    big = make_shards(tmp_path / "big", n_unlabeled=70, shard_rows=256)
    plan = pipeline.shard_plan(str(big), "unlabeled", 70, rows_needed=70)
    assert [p["row_group"] for p in plan] == [0, 1, 2]  # 32 + 32 + 6 rows
    with pytest.raises(fmt.ShardError, match="no rows"):
        pipeline.shard_plan(str(tmp_path / "none"), "labeled", 0, 4)


def test_row_group_reads_permute_rows(tmp_path):
    root = make_shards(tmp_path, n_unlabeled=12, shard_rows=12)
    batch = {"path": np.array(fmt.list_shards(root, "unlabeled")), "row_group": np.array([0])}
    orders = {tuple(pipeline.read_row_groups(batch)["id"].to_pylist()) for _ in range(5)}
    assert len(orders) > 1 and all(sorted(o) == sorted(next(iter(orders))) for o in orders)


def test_read_and_augment_outputs_one_batch_per_row_group(tmp_path):
    """The fused task of a training stream: one row group in, one batch out (so one block of
    single-array columns), every row of the group exactly once (the constant grey level of a
    weak view names it)."""
    root = make_shards(tmp_path, n_labeled=10, n_unlabeled=10, shard_rows=10)
    cfg = make_cfg(root)  # map_batch_rows 4: no longer splits a training task's output
    for stream, part in (("unlabeled", "unlabeled"), ("mix", "unlabeled"), ("labeled", "labeled")):
        plan = {"path": np.array(fmt.list_shards(root, part)), "row_group": np.array([0])}
        out = pipeline.read_and_augment(plan, stream, cfg.data)
        assert tuple(out) == pipeline.STREAM_COLUMNS[stream]
        assert {len(column) for column in out.values()} == {10}
        if stream != "labeled":  # the weak view's grey level is the row's value (1..10)
            weak = out[pipeline.STREAM_COLUMNS[stream][0]]
            levels = sorted(int(np.median(view[view > 0])) for view in weak)
            assert all(abs(a - b) <= 2 for a, b in zip(levels, range(1, 11), strict=True))


def damaged(rows, bad_id: str, column: str):
    """``rows`` with ``bad_id``'s ``column`` cut to its first 40 bytes (a damaged file)."""
    for row in rows:
        yield {**row, column: row[column][:40]} if row["id"] == bad_id else row


def test_a_row_that_no_longer_decodes_is_named_with_its_shard(tmp_path):
    """Shards changed after `dssn prepare` verified them: the error inside the read / augment
    task (and the val reader) names the file and the row, not only the decoder's complaint."""
    rows = {
        "labeled": damaged(constant_rows(range(200, 206), True), "r204", "image"),
        "unlabeled": damaged(constant_rows(range(1, 9), False), "r6", "image"),
        "val": damaged(constant_rows(range(100, 106), True), "r104", "mask"),
    }
    counts = {part: fmt.write_part(tmp_path, part, rows[part], 4) for part in rows}
    fmt.write_dataset_info(tmp_path, {"name": "bad", "classes": ["a", "b", "c"], "counts": counts})
    cfg = make_cfg(tmp_path)
    for stream, part, bad in (("labeled", "labeled", "r204"), ("unlabeled", "unlabeled", "r6"),
                              ("mix", "unlabeled", "r6")):  # fmt: skip
        shard = fmt.list_shards(tmp_path, part)[1]  # rows 4.. of the part
        plan = {"path": np.array([shard]), "row_group": np.array([0])}
        with pytest.raises(fmt.ShardError) as error:
            pipeline.read_and_augment(plan, stream, cfg.data)
        assert f"{shard}: row '{bad}': its image does not decode" in str(error.value), stream
    with pytest.raises(fmt.ShardError, match=r"part-00001\.parquet: row 'r104': its mask does"):
        list(pipeline.iter_val_samples(cfg, rank=0, world_size=1))
    good = {"path": np.array(fmt.list_shards(tmp_path, "unlabeled")[:1]), "row_group": [0]}
    assert len(pipeline.read_and_augment(good, "unlabeled", cfg.data)["image_u_w"]) == 4


def test_shards_from_other_writers_read_together(tmp_path):
    """A task's row groups can come from shards of different writers: ``dssn prepare``'s
    (columns not null, ``binary``) and, say, plain ``pq.write_table`` with ``large_binary``
    images (every column nullable). Their tables differ in schema; the read joins them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_shards(tmp_path, n_unlabeled=4, shard_rows=4)
    other = list(constant_rows(range(5, 9), False))
    columns = {k: [row[k] for row in other] for k in fmt.COLUMNS}
    table = pa.table(columns | {"image": pa.array(columns["image"], pa.large_binary())})
    assert table.schema.field("id").nullable and table.schema != fmt.SCHEMA
    pq.write_table(table, root / "unlabeled" / "part-00001.parquet")
    shards = fmt.list_shards(root, "unlabeled")
    batch = {"path": np.array(shards), "row_group": np.array([0, 0])}
    ids = pipeline.read_row_groups(batch)["id"].to_pylist()
    assert sorted(ids) == [f"r{v}" for v in range(1, 9)]
    out = pipeline.read_and_augment(batch, "unlabeled", make_cfg(root).data)
    assert len(out["image_u_w"]) == 8
    in_order = pipeline.read_shards_in_order({"path": np.array(shards)})
    assert in_order["id"].to_pylist() == [f"r{v}" for v in range(1, 9)]


@pytest.mark.ray
def test_training_stream_blocks_have_one_chunk(ray_instance, tmp_path):
    """Each block a training stream delivers holds one row group with every column in one
    chunk: a consumer slicing batches out of it needs no concatenating copy."""
    import ray

    root = make_shards(tmp_path, n_unlabeled=12, shard_rows=6)
    cfg = make_cfg(root)
    info = fmt.read_dataset_info(root)
    ds = pipeline.train_stream(cfg, "unlabeled", info, rows_needed=12)
    blocks = [
        ray.get(ref) for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs
    ]
    assert sorted(block.num_rows for block in blocks) == [6, 6]
    assert all(column.num_chunks == 1 for block in blocks for column in block.columns)
    cfg.data.row_groups_per_task = 2  # both row groups in one task, still one chunk a column
    ds = pipeline.train_stream(cfg, "unlabeled", info, rows_needed=12)
    blocks = [
        ray.get(ref) for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs
    ]
    assert [block.num_rows for block in blocks] == [12]
    assert all(column.num_chunks == 1 for block in blocks for column in block.columns)


def test_to_device_normalizes_and_casts(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.train.channels_last = True
    raw = {
        "image_x": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8),
        "mask_x": torch.full((2, 4, 4), 255, dtype=torch.uint8),
        "box_u1": torch.ones(2, 4, 4, dtype=torch.uint8),
    }
    out = pipeline.to_device(raw, "cpu", cfg)
    expected = [(1 - m) / s for m, s in zip(cfg.data.mean, cfg.data.std, strict=True)]
    assert torch.allclose(out["image_x"][0, :, 0, 0], torch.tensor(expected))
    assert out["image_x"].is_contiguous(memory_format=torch.channels_last)
    assert out["mask_x"].dtype == out["box_u1"].dtype == torch.long
    assert int(out["mask_x"].max()) == 255


def test_val_samples_without_ray_cover_every_row_once(tmp_path):
    root = make_shards(tmp_path, n_val=7, shard_rows=3)
    cfg = make_cfg(root)
    everything = [int(image[0, 0, 0]) for image, _ in pipeline.iter_val_samples(cfg)]
    assert everything == list(range(100, 107))
    parts = [
        [int(image[0, 0, 0]) for image, _ in pipeline.iter_val_samples(cfg, rank=r, world_size=3)]
        for r in range(3)
    ]
    assert sorted(sum(parts, [])) == everything and [len(p) for p in parts] == [3, 2, 2]
    image, mask = next(pipeline.iter_val_samples(cfg))
    assert image.shape == (3, 40, 44) and image.dtype == torch.uint8
    assert mask.shape == (40, 44) and mask.dtype == torch.uint8 and int(mask[0, 0]) == 100 % 3


def _worker_loop(config: dict) -> None:
    """Inside each Ray Train worker: two epochs; record row identities and shapes."""
    import ray.train

    from dssn.config import from_dict

    cfg = from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    record = {"epochs": []}
    for epoch in range(3):  # epoch 0: the burn-in reads the labeled stream alone
        seen = {"unlabeled": [], "mix": [], "steps": 0}
        for raw in pipeline.iter_train_batches(cfg, epoch):
            seen["steps"] += 1
            seen["shapes"] = {k: [list(v.shape), str(v.dtype)] for k, v in raw.items()}
            for key, stream in (("image_u_w", "unlabeled"), ("image_mix_w", "mix")):
                seen[stream] += [int(v) for v in raw[key].amax(dim=(1, 2, 3))] if key in raw else []
        seen["val"] = [int(image[0, 0, 0]) for image, _ in pipeline.iter_val_samples(cfg)]
        record["epochs"].append(seen)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


@pytest.mark.ray
def test_torch_trainer_two_workers_get_disjoint_rows(ray_instance, tmp_path):
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    # the workers cannot import this test module: ship _worker_loop by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = make_shards(tmp_path / "shards")
    cfg = make_cfg(root, workers=2)
    cfg.train.epochs, cfg.dssn.burn_in_epochs = 3, 1
    out = tmp_path / "records"
    out.mkdir()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="pipeline", storage_path=str(tmp_path / "runs")),
        datasets=pipeline.build_datasets(cfg),
    )
    trainer.fit()
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    burn_in = records[0]["epochs"][0]
    assert burn_in["steps"] == 5 and set(burn_in["shapes"]) == set(pipeline.LABELED_KEYS)
    # after a burn-in epoch that left them unread, the unlabeled streams start cleanly
    for epoch in (1, 2):
        a, b = (rec["epochs"][epoch] for rec in records)
        assert a["steps"] == b["steps"] == 5  # 20 unlabeled rows / (batch 2 x 2 workers)
        for stream in ("unlabeled", "mix"):
            # each worker saw distinct rows; together, one pass over the unlabeled set
            assert len(set(a[stream])) == len(a[stream]) == 10
            assert set(a[stream]).isdisjoint(b[stream])
            assert set(a[stream]) | set(b[stream]) == set(range(1, 21))
        assert sorted(a["val"] + b["val"]) == list(range(100, 105))
        assert set(a["val"]).isdisjoint(b["val"])
    shapes = records[0]["epochs"][1]["shapes"]
    for key in pipeline.LABELED_KEYS + pipeline.UNLABELED_KEYS + pipeline.MIX_KEYS:
        shape, dtype = shapes[key]
        assert dtype == "torch.uint8"
        assert shape == ([2, 3, CROP, CROP] if key.startswith("image_") else [2, CROP, CROP])
