"""The embedder contract shared by sentence-transformer, hashing and causal-LM embedders.

:class:`Embedder` does the work every embedder shares (dedupe identical texts, length-sorted
batches, input order restored, unit-norm rows, non-finite check); subclasses live in
:mod:`curate.features.embed` (sentence-transformers, hashing) and :mod:`curate.features.hidden`
(causal-LM hidden states). Kept apart so that both can import it without importing each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError, param_error

DEVICES = ("auto", "cpu", "cuda")


class Embedder:
    """Turns texts into L2-normalised float32 vectors, batching by length.

    Subclasses implement :meth:`_prepare` (token lengths plus whatever state the batches need) and
    :meth:`_encode_batch` (raw vectors of some rows). :meth:`encode` does the shared work: dedupe
    identical texts, sort by length (longest first, ties by position), batch, restore input order,
    normalise and check for non-finite values.

    Attributes:
        model_id: identity of the model for cache keys (name/path + content fingerprint).
        dim: output dimension.
        device: "cpu" or "cuda".
        dtype: the compute dtype ("float32", "float16", "bfloat16" or "float64"); :meth:`encode`
            always returns float32, :meth:`encode_raw` float64 for a float64 embedder.
        feature_prefix: first part of the feature-set name ``<prefix>/<field>`` (``embed`` for
            sentence embeddings, ``hidden`` for causal-LM hidden states).
    """

    model_id: str = ""
    dim: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    feature_prefix: str = "embed"

    def cache_params(self) -> dict[str, Any]:
        """Extra parameters recorded in a feature set's meta; a cached set must match them all."""
        return {}

    def _prepare(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def _encode_batch(self, state: Any, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` as float32 (n, dim), unit L2 norm (zero rows stay zero), input order."""
        items, vecs, inverse = self._run(texts, batch_size, progress)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if items:
            out[:] = normalise_rows(vecs)[inverse]
        return out

    def encode_raw(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """The un-normalised vectors (n, dim) in input order: float64 for a float64 embedder, else float32."""
        items, vecs, inverse = self._run(texts, batch_size, progress)
        return vecs[inverse] if items else vecs

    def _run(self, texts: Sequence[str], batch_size: int, progress: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(texts, vectors of the unique texts, row of each text in those vectors)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise param_error("embed_texts", "batch_size", "an integer >= 1", batch_size)
        items = [_check_text(t, i) for i, t in enumerate(texts)]
        out_dtype = np.float64 if self.dtype == "float64" else np.float32
        if not items:
            return items, np.zeros((0, self.dim), dtype=out_dtype), np.zeros(0, dtype=np.int64)
        first: dict[str, int] = {}
        inverse = np.empty(len(items), dtype=np.int64)
        unique: list[str] = []
        for i, t in enumerate(items):
            j = first.setdefault(t, len(unique))
            if j == len(unique):
                unique.append(t)
            inverse[i] = j
        lengths, state = self._prepare(unique)
        lengths = np.asarray(lengths, dtype=np.int64)
        # Longest first (memory peaks early), ties by position so the batching is deterministic.
        order = np.lexsort((np.arange(len(unique)), -lengths))
        starts = range(0, len(unique), batch_size)
        if progress:
            tqdm = require("tqdm", "progress bars").tqdm
            starts = tqdm(starts, desc="embed", unit="batch")
        vecs = np.zeros((len(unique), self.dim), dtype=out_dtype)
        for s in starts:
            rows = order[s : s + batch_size]
            vecs[rows] = np.asarray(self._encode_batch(state, rows), dtype=out_dtype)
        bad = ~np.isfinite(vecs).all(axis=1)  # before normalising, which would turn NaN rows into zeros
        if bad.any():
            where = int(np.flatnonzero(bad[inverse])[0])
            raise SchemaError(
                f"embedder {self.model_id} produced non-finite values.", line=where + 1, field="text",
                expected="finite embeddings", found=items[where][:60],
            )
        return items, vecs, inverse


def _check_text(t: Any, i: int) -> str:
    if not isinstance(t, str):
        raise SchemaError("texts to embed must be strings.", line=i + 1, field="text", expected="str",
                          found=type(t).__name__)
    return t


def _resolve_device(device: str, torch: Any = None) -> str:
    if device not in DEVICES:
        raise param_error("embed", "device", f"one of {DEVICES}", device)
    if device == "cpu":
        return "cpu"
    has_cuda = bool(torch is not None and torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise param_error("embed", "device", "'cpu' or 'auto' on a machine without CUDA", device)
    return "cuda" if has_cuda else "cpu"


def _fingerprint(path: Path) -> str:
    """Short hash of a model folder's config files and weight-file sizes (cheap, content-sensitive)."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        f = path / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(path.rglob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return h.hexdigest()


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
