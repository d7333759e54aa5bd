"""Names that become paths, and the identity of files that parameters name.

Two guards for run folders, caches and feature stores:

- :func:`check_name` refuses a name (a feature set, a step output, a recipe ``name``) that would
  leave the folder it is joined to, or collide with the temporary entries writers create: ``..``,
  ``.``, an absolute path, a backslash, a control character, a leading dot, an empty part.
- :func:`content_params` replaces every parameter value that names an existing file or folder by
  that file's content identity (size and SHA-256; for a folder, every file's relative path, size and
  SHA-256), so a cache key built from the parameters changes when the file's bytes change, not only
  when its path does. Parameters that name *outputs* (``output``, ``cache`` ...) are left as paths:
  their content is what the step writes, and keying on it would make every rerun miss its cache.
  A step whose output parameter is read when it already exists (decontam's ``index_path``) lists it
  in ``reused_params``; the runner then passes a ``skip`` without it and keys the step again after
  it ran, so the path enters by content without a rerun missing its cache
  (:func:`curate.pipeline.runner.reused_params`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from curate.errors import param_error

# Parameters whose value is a path the step *writes* (or a cache it appends to), never an input.
OUTPUT_PARAMS = frozenset({"output", "path", "cache", "index_path", "save_as"})

_MAX_NAME = 255


def check_name(owner: str, param: str, value: Any, *, nested: bool = False) -> str:
    """Return ``value`` if it is a safe name to join under a folder, else raise ``ParameterError``.

    Args:
        owner: who takes the name, for the message ("FeatureStore", "step 'whiten'", "--output-name").
        param: the parameter or option holding it.
        value: the name.
        nested: allow ``/`` between parts (feature names such as ``grad/adam``, which the feature
            store flattens to one folder); each part must still be a plain name.

    Raises:
        ParameterError: ``value`` is not a string, is empty or longer than 255 characters, is
            absolute, contains ``\\`` or a control character, starts with ``.`` (the prefix of
            temporary files that runs clean up), has an empty, ``.`` or ``..`` part, or has ``/``
            when ``nested`` is False.
    """
    rule = ("a plain name (letters, digits, '_', '-', '+', '.'"
            + (", parts joined by '/'" if nested else "") + "; no '..', no leading '.' or '/', no '\\')")
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise param_error(owner, param, rule, value)
    bad = (value.startswith((".", "/", "~")) or "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value)
           or os.path.isabs(value))
    parts = value.split("/")
    if not nested and len(parts) > 1:
        bad = True
    if any(p in ("", ".", "..") for p in parts):
        bad = True
    if bad:
        raise param_error(owner, param, rule, value)
    return value


# --------------------------------------------------------------------------- content identity
# Files up to this size are hashed whole. A larger file (a model's weights) is identified by its
# size, modification time and the SHA-256 of its first and last MiB: an edit in place changes the
# modification time, and hashing gigabytes on every run would cost more than the steps it guards.
_FULL_HASH_BYTES = 256 << 20
_EDGE_BYTES = 1 << 20
# A folder is walked for at most this many files (a parameter of "/" or "~" must not hang a run).
_MAX_FILES = 20_000

# (device, inode, size, mtime_ns, ctime_ns) -> digest: a file is hashed once per process unless it
# changes; ctime cannot be set back by a user, so an edit in place is always seen.
_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}


def _digest(path: Path, st: os.stat_result) -> str:
    memo = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    found = _DIGESTS.get(memo)
    if found is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if st.st_size <= _FULL_HASH_BYTES:
                while block := f.read(1 << 20):
                    h.update(block)
            else:
                h.update(f"edges:{st.st_size}:{st.st_mtime_ns}\0".encode())
                h.update(f.read(_EDGE_BYTES))
                f.seek(st.st_size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
        found = _DIGESTS[memo] = h.hexdigest()
    return found


def path_identity(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The content identity of a file or folder, or None if ``path`` names neither.

    A file: ``{"size", "sha256"}``. A folder: ``{"files", "size", "sha256"}`` where ``sha256`` hashes
    the sorted (relative path, size, file digest) of every regular file below it; each real folder
    is walked once, so a symlink loop ends.
    """
    p = Path(path)
    try:
        st = p.stat()
        if p.is_file():
            return {"size": st.st_size, "sha256": _digest(p, st)}
        if not p.is_dir():
            return None
    except (OSError, ValueError):
        return None
    h = hashlib.sha256()
    n, total = 0, 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(p, followlinks=True):
        rst = os.stat(root)
        if (rst.st_dev, rst.st_ino) in seen or n >= _MAX_FILES:
            dirs[:] = []
            continue
        seen.add((rst.st_dev, rst.st_ino))
        dirs.sort()
        for name in sorted(files)[: _MAX_FILES - n]:
            f = Path(root) / name
            rel = f.relative_to(p).as_posix()
            try:
                fst = f.stat()
                if not f.is_file():
                    continue
                digest = _digest(f, fst)
            except OSError:  # a dangling link or an unreadable file: part of the identity by name
                h.update(f"{rel}\0unreadable\n".encode())
                continue
            h.update(f"{rel}\0{fst.st_size}\0{digest}\n".encode())
            n, total = n + 1, total + fst.st_size
    return {"files": n, "size": total, "sha256": h.hexdigest()}


def content_params(params: Any, *, skip: frozenset[str] = OUTPUT_PARAMS) -> Any:
    """``params`` with every string that names an existing file or folder replaced by
    ``{"path": s, **path_identity(s)}`` (recursively through mappings and lists).

    Mapping keys in ``skip`` keep their value as is (outputs and caches). A string that names no
    existing path (a model name, a feature name, an option) is unchanged, so keys of parameters
    without files are what they were before.
    """
    if isinstance(params, Mapping):
        return {k: v if k in skip else content_params(v, skip=skip) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return [content_params(v, skip=skip) for v in params]
    if isinstance(params, os.PathLike):
        params = os.fspath(params)
    if isinstance(params, str) and params and "\0" not in params and len(params) < 4096:
        ident = path_identity(os.path.expanduser(params))
        if ident is not None:
            return {"path": params, **ident}
    return params
