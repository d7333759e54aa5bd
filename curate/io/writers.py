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

from curate.errors import param_error


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` can only be
    read by setting it, which would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        # mkstemp creates 0600; the output gets the mode a plain open() would give (0666 & ~umask)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _replaceable(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, if removing it removes nothing but the folder its last part names."""
    path = Path(folder)
    raw = os.fspath(folder)
    last = raw.rstrip("/").rsplit("/", 1)[-1]
    # Path("a/..").name is "..", but Path("a/.").name is "a": look at the text the caller gave too.
    if last in ("", ".", "..") or path.name in ("", ".", ".."):
        raise param_error("atomic_dir", "folder", "a folder path whose last part is a plain name", raw)
    return path


@contextlib.contextmanager
def atomic_dir(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; if the block succeeds, it replaces ``folder`` as a
    whole (an existing ``folder`` is removed first), else it is deleted.

    Only ``folder`` itself is ever removed: a path whose last part is ``..``, ``.`` or empty (which
    would name a folder above the one meant) is refused with ``ParameterError``, and a symlink at
    ``folder`` is replaced as a link, never followed."""
    folder = _replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the folder the umask's mode
    try:
        yield tmp
        if folder.is_symlink():
            folder.unlink()
        elif folder.exists():
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
