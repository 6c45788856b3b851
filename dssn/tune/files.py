"""Reading and writing experiment files on a local path or a URI pyarrow reads (s3://, gs://).

Experiments live on shared storage on a cluster, so every small file a search writes or reads
(``search.json``, ``config.yaml``, tables, plots) goes through ``pyarrow.fs``.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path (Ray needs one), or the URI as given without a trailing slash."""
    if is_uri(path):
        return str(path).rstrip("/")
    return str(Path(path).expanduser().absolute())


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``path`` and the path inside it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), absolute(path)


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, creating the parent directory."""
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def upload_dir(local_dir: str | Path, dest: str) -> None:
    """Copy a local directory's files into ``dest`` (a URI or another local path)."""
    fs, inner = filesystem(dest)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(Path(local_dir).absolute()), inner, destination_filesystem=fs)
