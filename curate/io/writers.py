"""Atomic writers: every output is written to a temporary name in the same folder and renamed
into place, so a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; if the block succeeds, it replaces ``folder`` as a
    whole (an existing ``folder`` is removed first), else it is deleted."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_parquet(table: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as parquet atomically (the table's schema is written explicitly)."""
    with atomic_path(path) as tmp:
        table.write_parquet(tmp, compression="zstd", statistics=True)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike[str], *, sort_keys: bool = False, ensure_ascii: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=str)
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
