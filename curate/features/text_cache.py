"""A content-addressed cache of sentence embeddings, shared by steps, runs and processes.

Recipes embed the same text more than once: a prompt by the ``embed`` step and again by a step
that embeds on its own (semantic dedup or decontamination without a stored feature), the recipe's
targets in every new run folder (a ``--set`` override makes a new folder), the same target file
through ``curate embed`` for several pools. The per-uid feature store of a run folder cannot serve
these; this cache keys each vector by the text itself.

Layout: ``<curate cache>/text_embeddings/<key>/shard-*.npz``, one folder per (model identity,
compute dtype, embedder parameters); each shard holds ``keys`` (n × 16 bytes, blake2b-128 of the
UTF-8 text) and ``values`` (n × d float32, the unit-norm vectors :meth:`Embedder.encode` returned).
Shards are written whole under a temporary name and renamed, so concurrent writers never corrupt
each other; many small shards are merged into one now and then. A hit returns the vector computed
when the text was first embedded: identical to a fresh one up to the float round-off that batch
composition causes (~1e-7), the same guarantee as the per-uid store. ``CURATE_EMBED_CACHE=0``
turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_SHARDS = 32  # more shards than this are merged into one on the next write
_OPEN: dict[str, TextVectorCache] = {}  # folder -> cache, shared by the steps of one process


def enabled() -> bool:
    """False when ``CURATE_EMBED_CACHE`` is ``0`` / ``false`` / ``no``."""
    return os.environ.get("CURATE_EMBED_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """(n, 16) uint8 blake2b-128 digests of the UTF-8 texts."""
    out = np.empty((len(texts), 16), dtype=np.uint8)
    for i, t in enumerate(texts):
        out[i] = np.frombuffer(hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest(), dtype=np.uint8)
    return out


class TextVectorCache:
    """The vectors of one embedder configuration, by text content (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], dim: int) -> None:
        self.folder, self.dim = Path(folder), int(dim)
        self._index: dict[bytes, int] = {}
        self._values = np.zeros((0, self.dim), dtype=np.float32)
        self._seen: set[str] = set()

    @classmethod
    def for_embedder(cls, emb: Any, root: str | os.PathLike[str] | None = None) -> TextVectorCache:
        """The (process-wide) cache of ``emb``: keyed by its model id, dtype, dim and cache params."""
        if root is None:
            from curate.features.lm import cache_root

            root = cache_root() / "text_embeddings"
        ident = {"model": emb.model_id, "dtype": emb.dtype, "dim": emb.dim, "params": emb.cache_params(), "v": 1}
        key = hashlib.blake2b(json.dumps(ident, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
        folder = str(Path(root) / key)
        if folder not in _OPEN:
            _OPEN[folder] = cls(folder, emb.dim)
        return _OPEN[folder]

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz")) if self.folder.is_dir() else []

    def _refresh(self) -> None:
        """Read shards written since the last look (by this or another process)."""
        new_keys, new_vals = [], []
        for path in self._shards():
            if path.name in self._seen:
                continue
            try:
                with np.load(path) as z:
                    keys, vals = z["keys"], z["values"]
            except (OSError, ValueError, KeyError):  # merged away meanwhile, or unreadable: skip it
                continue
            self._seen.add(path.name)
            if vals.ndim == 2 and vals.shape[1] == self.dim and len(keys) == len(vals):
                new_keys.append(keys)
                new_vals.append(vals.astype(np.float32, copy=False))
        if not new_vals:
            return
        base = len(self._values)
        self._values = np.concatenate([self._values, *new_vals])
        for off, k in enumerate(np.concatenate(new_keys)):
            self._index.setdefault(k.tobytes(), base + off)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask (n,), vectors (n, d) with zeros where missed) for digests from :func:`text_keys`."""
        self._refresh()
        rows = np.array([self._index.get(k.tobytes(), -1) for k in keys], dtype=np.int64)
        hit = rows >= 0
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        out[hit] = self._values[rows[hit]]
        return hit, out

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store vectors (one new shard; merges the shards when there are many)."""
        if not len(keys):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.npz"
        self._write(self.folder / name, keys, np.asarray(values, dtype=np.float32))
        base = len(self._values)
        self._values = np.concatenate([self._values, np.asarray(values, dtype=np.float32)])
        for off, k in enumerate(keys):
            self._index.setdefault(k.tobytes(), base + off)
        self._seen.add(name)
        shards = self._shards()
        if len(shards) > MAX_SHARDS:
            self._merge(shards)

    def _merge(self, shards: list[Path]) -> None:
        self._refresh()
        keys = np.array([np.frombuffer(k, dtype=np.uint8) for k in self._index], dtype=np.uint8).reshape(-1, 16)
        vals = self._values[list(self._index.values())]
        name = f"shard-{uuid.uuid4().hex}.npz"
        self._write(self.folder / name, keys, vals)
        self._seen.add(name)
        for p in shards:
            p.unlink(missing_ok=True)

    @staticmethod
    def _write(path: Path, keys: np.ndarray, values: np.ndarray) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=keys, values=values)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def encode_cached(emb: Any, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False,
                  root: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, int]:
    """``emb.encode(texts)`` reusing cached vectors of texts seen before; ``(vectors, rows not served by the cache)``.

    Only embedders that declare ``content_cache = True`` (the packaged sentence-transformer and its
    exported back-ends) are cached, and only while :func:`enabled`; others are encoded as is.
    """
    texts = list(texts)
    if (not getattr(emb, "content_cache", False) or not enabled() or not texts
            or not all(isinstance(t, str) for t in texts)):  # encode() names a bad row
        return emb.encode(texts, batch_size=batch_size, progress=progress), len(texts)
    cache = TextVectorCache.for_embedder(emb, root)
    keys = text_keys(texts)
    hit, out = cache.lookup(keys)
    miss = np.flatnonzero(~hit)
    if len(miss):
        vecs = emb.encode([texts[i] for i in miss], batch_size=batch_size, progress=progress)
        out[miss] = vecs
        _, first = np.unique(keys[miss], axis=0, return_index=True)  # store each new text once
        cache.add(keys[miss][np.sort(first)], vecs[np.sort(first)])
    return out, int(len(miss))
