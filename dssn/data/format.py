"""The shard format: one schema, one place.

A prepared dataset is a directory (local path or a ``pyarrow.fs`` URI such as ``s3://…``)::

    <root>/dataset.json                      name, classes, palette, ignore_index, counts, …
    <root>/labeled/part-00000.parquet        columns id, image, mask, height, width
    <root>/unlabeled/part-00000.parquet      (mask is null here)
    <root>/val/part-00000.parquet

``image`` holds encoded JPEG or PNG bytes (stored as found on disk, never re-encoded), ``mask``
holds a single-channel PNG of uint8 class ids (255 = ignore). Shards hold ``shard_rows`` rows
(default 256: a few tens of MB of VOC images, small enough to stream).

Writing is atomic and idempotent: a shard is written to a hidden temporary name and renamed,
so a file named ``part-*.parquet`` is always complete; a shard that already exists is skipped::

    from dssn.data import format as fmt
    rows = ({"id": k, "image": fmt.encode_image(img), "mask": fmt.encode_mask(m),
             "height": h, "width": w} for k, img, m, h, w in samples)
    counts = {"labeled": fmt.write_part(root, "labeled", rows, shard_rows=256), …}
    fmt.write_dataset_info(root, {"name": "digits", "classes": [...], "counts": counts, …})

    info = fmt.read_dataset_info(root)
    for path in fmt.list_shards(root, "val"):
        table = fmt.read_shard(path)              # ShardError naming the file if unreadable
        image = fmt.decode_image(table["image"][0].as_py())   # (H, W, 3) uint8
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from dssn.config import IGNORE_INDEX

PARTS = ("labeled", "unlabeled", "val")
DATASET_INFO = "dataset.json"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
DEFAULT_SHARD_ROWS = 256
# rows per Parquet row group: the unit the training pipeline reads and shuffles (a read of one
# row group is one Ray Data block, so augmentation parallelises over row groups, not shards)
ROW_GROUP_ROWS = 32
FORMAT_VERSION = 1
JPEG_QUALITY = 95  # only used when an image must be encoded (generated data)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),  # null for unlabeled rows
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ShardError(ValueError):
    """A shard or dataset.json is missing, unreadable, or does not follow the schema."""


# ----------------------------------------------------------------------------- encode / decode


def image_format(data: bytes) -> str | None:
    """``"jpeg"`` or ``"png"`` from the magic bytes, else None."""
    if data[:3] == _JPEG_MAGIC:
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    return None


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    """(H, W, 3) uint8 RGB -> PNG (lossless, default) or JPEG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_image wants (H, W, 3) uint8, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    elif fmt in ("jpeg", "jpg"):
        Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"encode_image: unknown format {fmt!r} (png or jpeg)")
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class ids -> single-channel PNG bytes."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"encode_mask wants (H, W) uint8, got {mask.shape} {mask.dtype}")
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB. Raises ValueError if it does not decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode fully now: a truncated file fails here, not later
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ...)
        raise ValueError(f"image does not decode: {e}") from e


def decode_mask(data: bytes) -> np.ndarray:
    """PNG mask bytes -> (H, W) uint8 class ids.

    Palette PNGs (VOC) give their index values, not the RGB colours; grayscale PNGs
    (Cityscapes labelTrainIds) their values. An RGB mask is an error: its classes are ambiguous.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L"):
                return np.array(im, dtype=np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.array(im)
                if arr.max(initial=0) > np.iinfo(np.uint8).max:
                    raise ValueError(f"mask values up to {arr.max()} do not fit uint8")
                return arr.astype(np.uint8)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"mask does not decode: {e}") from e
    raise ValueError(f"mask has mode {mode!r}; expected a palette (P) or grayscale (L) PNG")


# ----------------------------------------------------------------------------- file systems


def _fs(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI (s3://, gs://, file://)."""
    root = str(root)
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).absolute())


def _join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``part-00000.parquet``."""
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def list_shards(root: str | os.PathLike, part: str) -> list[str]:
    """Sorted paths (URIs keep their scheme) of the finished shards of ``part``.

    Temporary files (hidden names) are never listed. A missing part directory gives [].
    """
    _check_part(part)
    fs, base = _fs(root)
    selector = pafs.FileSelector(_join(base, part), allow_not_found=True)
    names = sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
        and info.base_name.startswith(SHARD_PREFIX)
        and info.base_name.endswith(SHARD_SUFFIX)
    )
    prefix = str(root).rstrip("/") if "://" in str(root) else base
    return [_join(prefix, part, n) for n in names]


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


# ----------------------------------------------------------------------------- writing


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the schema's keys) -> a table with exactly SCHEMA."""
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def shard_complete(path: str | os.PathLike, num_rows: int | None = None) -> bool:
    """True when ``path`` is a readable shard (footer valid, row count as expected)."""
    return _shard_ok(*_fs(path), num_rows)


def _shard_ok(fs: pafs.FileSystem, path: str, num_rows: int | None) -> bool:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        with fs.open_input_file(path) as f:
            meta = pq.read_metadata(f)
    except Exception:  # garbage or truncated: not complete, rewrite it
        return False
    return num_rows is None or meta.num_rows == num_rows


def write_shard(
    root: str | os.PathLike,
    part: str,
    index: int,
    rows: list[dict[str, Any]],
    metadata: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """Write shard ``index`` of ``part`` atomically; skip it if already complete.

    Returns (path, written). The shard goes to a hidden temporary file in the same directory
    and is renamed into place, so a crash never leaves a partial ``part-*.parquet``.
    ``metadata`` (str -> str) is stored in the Parquet footer (see :func:`read_shard_metadata`).
    """
    _check_part(part)
    fs, base = _fs(root)
    directory = _join(base, part)
    final = _join(directory, shard_name(index))
    if _shard_ok(fs, final, len(rows)):
        return final, False
    fs.create_dir(directory, recursive=True)
    tmp = _join(directory, f".{shard_name(index)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    table = rows_to_table(rows)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    try:
        with fs.open_output_stream(tmp) as out:
            # images are compressed already
            pq.write_table(table, out, compression="none", row_group_size=ROW_GROUP_ROWS)
        fs.move(tmp, final)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise
    return final, True


def chunked(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {size}")
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_part(
    root: str | os.PathLike,
    part: str,
    rows: Iterable[dict[str, Any]],
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> int:
    """Write ``rows`` as consecutive shards of ``shard_rows`` rows; return the row count.

    Idempotent: shards already complete are skipped (their rows are still counted). Shards
    left over from an earlier, longer run of the same part are removed.
    """
    count, index = 0, 0
    for index, chunk in enumerate(chunked(rows, shard_rows)):
        write_shard(root, part, index, chunk)
        count += len(chunk)
    remove_shards_from(root, part, index + 1 if count else 0)
    return count


def remove_shards_from(root: str | os.PathLike, part: str, first: int) -> None:
    """Delete shards numbered ``first`` and above (stale ones from an earlier run)."""
    fs, _ = _fs(root)
    for path in list_shards(root, part):
        name = path.rsplit("/", 1)[-1]
        if int(name[len(SHARD_PREFIX) : -len(SHARD_SUFFIX)]) >= first:
            fs.delete_file(_fs(path)[1])


def write_dataset_info(root: str | os.PathLike, info: dict[str, Any]) -> str:
    """Write ``<root>/dataset.json`` atomically (filling defaults); return its path.

    Expected keys: name, classes (list of names), palette (list of [r, g, b]); optional:
    counts {part: rows}, skipped {part: rows}, source, split. ``ignore_index`` defaults to 255.
    """
    missing = [k for k in ("name", "classes") if k not in info]
    if missing:
        raise ValueError(f"dataset info lacks {missing}")
    full = {
        "name": info["name"],
        "classes": info["classes"],
        "num_classes": len(info["classes"]),
        "palette": default_palette(len(info["classes"])),
        "ignore_index": IGNORE_INDEX,
        "counts": {p: 0 for p in PARTS},
        "skipped": {p: 0 for p in PARTS},
        "source": None,
        "split": None,
        "format_version": FORMAT_VERSION,
    }
    full.update(info)  # keeps the order above for the keys it has
    fs, base = _fs(root)
    fs.create_dir(base, recursive=True)
    final = _join(base, DATASET_INFO)
    tmp = _join(base, f".{DATASET_INFO}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open_output_stream(tmp) as out:
        out.write(_dumps_flat(full).encode())
    fs.move(tmp, final)
    return final


def _dumps_flat(info: dict[str, Any]) -> str:
    """JSON with one top-level key per line (a palette stays one readable line)."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in info.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def read_dataset_info(root: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``<root>/dataset.json``; ShardError naming the file if missing or invalid."""
    fs, base = _fs(root)
    path = _join(base, DATASET_INFO)
    try:
        with fs.open_input_stream(path) as f:
            info = json.loads(f.read().decode())
    except FileNotFoundError as e:
        raise ShardError(f"{path}: not found (prepare the dataset with `dssn prepare`)") from e
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not a valid dataset.json: {e}") from e
    for key in ("name", "classes", "counts"):
        if key not in info:
            raise ShardError(f"{path}: missing key '{key}'")
    return info


def default_palette(num_classes: int) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved), the usual default for any class count."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


# ----------------------------------------------------------------------------- reading


def _footer(path: str | os.PathLike) -> pq.FileMetaData:
    """The Parquet footer of a shard; ShardError naming the file if it is unreadable."""
    fs, p = _fs(path)
    try:
        with fs.open_input_file(p) as f:
            return pq.read_metadata(f)
    except Exception as e:
        raise ShardError(f"{path}: not a readable Parquet shard: {e}") from e


def read_shard_metadata(path: str | os.PathLike) -> tuple[int, dict[str, str]]:
    """(row count, footer key/value metadata) of a shard, reading only its footer."""
    meta = _footer(path)
    kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
    return meta.num_rows, {k: v for k, v in kv.items() if not k.startswith("ARROW:")}


def read_shard(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one shard; ShardError naming the file if it is not valid Parquet of this schema."""
    fs, p = _fs(path)
    try:
        with fs.open_input_file(p) as f:
            table = pq.read_table(f, columns=columns)
    except Exception as e:
        raise ShardError(f"{path}: not a readable Parquet shard: {e}") from e
    wanted = columns or list(COLUMNS)
    absent = [c for c in wanted if c not in table.column_names]
    if absent:
        raise ShardError(f"{path}: missing columns {absent} (expected {list(COLUMNS)})")
    return table


def shard_row_groups(path: str | os.PathLike) -> list[int]:
    """Row counts of each row group of a shard (reads only the footer)."""
    meta = _footer(path)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_row_group(path: str | os.PathLike, index: int, columns: list[str] | None = None):
    """One row group of a shard as a table; ShardError naming the file if unreadable."""
    fs, p = _fs(path)
    try:
        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).read_row_group(index, columns=columns)
    except Exception as e:
        raise ShardError(f"{path}: row group {index} not readable: {e}") from e


def iter_rows(
    root: str | os.PathLike, part: str, columns: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Every row of ``part`` as a dict, shard by shard (no Ray needed)."""
    for path in list_shards(root, part):
        yield from read_shard(path, columns).to_pylist()
