"""The shard format: encode/decode, atomic idempotent shard writes, dataset.json, bad files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dssn.data import format as fmt


def make_rows(n: int, labeled: bool = True, size: tuple[int, int] = (6, 8), start: int = 0):
    rng = np.random.default_rng(start)
    h, w = size
    for i in range(start, start + n):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 5, (h, w), dtype=np.uint8)
        yield {
            "id": f"s{i}",
            "image": fmt.encode_image(image),
            "mask": fmt.encode_mask(mask) if labeled else None,
            "height": h,
            "width": w,
        }


def test_image_and_mask_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (5, 7), dtype=np.uint8)
    mask[0, 0] = 255
    assert np.array_equal(fmt.decode_image(fmt.encode_image(image)), image)
    assert np.array_equal(fmt.decode_mask(fmt.encode_mask(mask)), mask)
    jpeg = fmt.encode_image(image, "jpeg")
    assert fmt.image_format(jpeg) == "jpeg" and fmt.decode_image(jpeg).shape == (5, 7, 3)
    assert fmt.image_format(fmt.encode_image(image)) == "png"


def test_palette_mask_gives_indices_not_colours():
    indices = np.array([[0, 1, 15], [20, 255, 3]], dtype=np.uint8)
    im = Image.fromarray(indices, "P")
    im.putpalette([v for c in fmt.default_palette(256) for v in c])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert np.array_equal(fmt.decode_mask(buf.getvalue()), indices)


def test_rgb_mask_and_garbage_are_rejected():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        fmt.decode_mask(buf.getvalue())
    with pytest.raises(ValueError, match="does not decode"):
        fmt.decode_image(b"\xff\xd8\xff garbage")


def test_voc_palette_is_the_standard_colormap():
    palette = fmt.default_palette(21)
    assert palette[:4] == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[15] == [192, 128, 128]  # person
    assert palette[20] == [0, 64, 128]  # tvmonitor


def test_write_part_round_trip_and_shard_size(tmp_path):
    rows = list(make_rows(7))
    assert fmt.write_part(tmp_path, "labeled", rows, shard_rows=3) == 7
    shards = fmt.list_shards(tmp_path, "labeled")
    assert [os.path.basename(s) for s in shards] == [fmt.shard_name(i) for i in range(3)]
    assert [pq.read_metadata(s).num_rows for s in shards] == [3, 3, 1]
    assert pq.read_schema(shards[0]).remove_metadata().equals(fmt.SCHEMA)
    back = list(fmt.iter_rows(tmp_path, "labeled"))
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    assert back[4]["image"] == rows[4]["image"] and back[4]["mask"] == rows[4]["mask"]
    assert fmt.write_part(tmp_path, "unlabeled", make_rows(2, labeled=False)) == 2
    assert all(r["mask"] is None for r in fmt.iter_rows(tmp_path, "unlabeled"))


def test_write_is_idempotent_and_trims_stale_shards(tmp_path):
    rows = list(make_rows(5))
    fmt.write_part(tmp_path, "val", rows, shard_rows=2)
    first = fmt.list_shards(tmp_path, "val")[0]
    stamp = os.stat(first).st_mtime_ns
    _, written = fmt.write_shard(tmp_path, "val", 0, rows[:2])
    assert not written and os.stat(first).st_mtime_ns == stamp
    fmt.write_part(tmp_path, "val", rows[:3], shard_rows=2)  # a shorter run: shard 2 is stale
    assert len(fmt.list_shards(tmp_path, "val")) == 2


def test_leftover_temp_file_is_not_a_shard(tmp_path):
    part = tmp_path / "labeled"
    part.mkdir()
    (part / ".part-00000.parquet.123.abcd.tmp").write_bytes(b"half a shard")
    assert fmt.list_shards(tmp_path, "labeled") == []
    _, written = fmt.write_shard(tmp_path, "labeled", 0, list(make_rows(2)))
    assert written and len(fmt.list_shards(tmp_path, "labeled")) == 1


def test_truncated_shard_is_rewritten_not_trusted(tmp_path):
    rows = list(make_rows(3))
    path, _ = fmt.write_shard(tmp_path, "labeled", 0, rows)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # a crash of a non-atomic writer
    assert not fmt.shard_complete(path)
    _, written = fmt.write_shard(tmp_path, "labeled", 0, rows)
    assert written and fmt.read_shard(path).num_rows == 3


def test_failed_write_leaves_nothing(tmp_path):
    bad = [{"id": "x", "image": "not bytes", "mask": None, "height": "tall", "width": 1}]
    with pytest.raises((TypeError, ValueError, OSError)):
        fmt.write_shard(tmp_path, "unlabeled", 0, bad)
    assert not (tmp_path / "unlabeled").exists() or not any((tmp_path / "unlabeled").iterdir())


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet", "truncated"])
def test_garbage_or_truncated_parquet_error_names_the_file(tmp_path, content):
    path, _ = fmt.write_shard(tmp_path, "val", 0, list(make_rows(3)))
    if content == "truncated":
        content = Path(path).read_bytes()[:-20]
    Path(path).write_bytes(content)
    with pytest.raises(fmt.ShardError, match="part-00000.parquet"):
        fmt.read_shard(path)
    with pytest.raises(fmt.ShardError, match="part-00000.parquet"):
        list(fmt.iter_rows(tmp_path, "val"))


def test_dataset_info_round_trip_and_errors(tmp_path):
    with pytest.raises(fmt.ShardError, match="dataset.json: not found"):
        fmt.read_dataset_info(tmp_path)
    fmt.write_dataset_info(tmp_path, {"name": "t", "classes": ["a", "b"], "counts": {"val": 3}})
    info = fmt.read_dataset_info(tmp_path)
    assert info["name"] == "t" and info["num_classes"] == 2 and info["ignore_index"] == 255
    assert info["palette"] == [[0, 0, 0], [128, 0, 0]] and info["counts"] == {"val": 3}
    (tmp_path / "dataset.json").write_text("{ not json")
    with pytest.raises(fmt.ShardError, match="not a valid dataset.json"):
        fmt.read_dataset_info(tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        fmt.write_dataset_info(tmp_path, {"name": "no classes"})


def test_row_groups(tmp_path):
    rows = list(make_rows(fmt.ROW_GROUP_ROWS * 2 + 5))
    path, _ = fmt.write_shard(tmp_path, "labeled", 0, rows)
    assert fmt.shard_row_groups(path) == [fmt.ROW_GROUP_ROWS, fmt.ROW_GROUP_ROWS, 5]
    last = fmt.read_row_group(path, 2, ["id"])
    assert last["id"].to_pylist() == [r["id"] for r in rows[-5:]]
    with pytest.raises(fmt.ShardError, match="row group 3"):
        fmt.read_row_group(path, 3)


def test_footer_metadata(tmp_path):
    path, _ = fmt.write_shard(tmp_path, "unlabeled", 0, [], {"k": "v"})
    assert fmt.read_shard_metadata(path) == (0, {"k": "v"})
    with pytest.raises(ValueError, match="unknown part"):
        fmt.list_shards(tmp_path, "train")
