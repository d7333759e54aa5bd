"""Semantic deduplication: rows whose embeddings are within cosine ``1 - eps`` are one cluster.

Method: SemDeDup (Abbas et al., 2023, "SemDeDup: Data-efficient learning at web-scale through
semantic deduplication"): embed, then treat pairs with cosine similarity above ``1 - eps`` as
duplicates and keep one per group. We deviate in two ways: (1) instead of k-means buckets and a
per-cluster pairwise matrix we use an exact faiss radius search (``IndexFlatIP.range_search``)
over the whole table, which is exact and fast enough for instruction-sized pools; (2) the groups
are the *connected components* of the duplicate graph and the kept row follows the project's
deterministic rule (earliest source position, then smallest uid) instead of "farthest from the
centroid", so results do not depend on clustering seeds or row order.

Turn-aware: ``field="prompt"`` compares prompts only (same question, different answers),
``"prompt+response"`` compares whole rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import polars as pl

from curate._lazy import require
from curate.curation._common import (
    cluster_frame,
    components,
    keep_order,
    representatives,
    stable_hash64,
    word_tokens,
    write_artifact,
)
from curate.errors import MissingDependencyError, param_error
from curate.features.embedders import normalise_rows
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import TEXT_FIELDS, texts


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns texts into an (n, d) array (sentence-transformers models qualify)."""

    def encode(self, sentences: list[str]) -> np.ndarray: ...


class HashingEncoder:
    """A deterministic bag-of-words hashing embedder (signed feature hashing, L2-normalised).

    Used for tests and as the ``model="hashing"`` fallback while ``curate.features.embed`` is
    not installed. Texts with the same multiset of words get the same vector.
    """

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def encode(self, sentences: list[str], **_: Any) -> np.ndarray:
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, s in enumerate(sentences):
            for tok in word_tokens(s):
                h = stable_hash64(tok)
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out


def embed(
    docs: Sequence[str], *, model: str | Encoder = "default", batch_size: int = 64, device: str = "auto"
) -> np.ndarray:
    """L2-normalised float32 embeddings of ``docs``.

    ``model`` is an :class:`Encoder` object, or a name passed to
    ``curate.features.embed.embed_texts`` (``"default"`` = packaged all-MiniLM-L6-v2,
    ``"hashing"`` = deterministic test embedder).
    """
    docs = list(docs)
    if not isinstance(model, str):
        return normalise_rows(model.encode(docs))
    try:
        from curate.features.embed import embed_texts  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if model == "hashing":
            return normalise_rows(HashingEncoder().encode(docs))
        raise MissingDependencyError(
            f"embedding model '{model}' needs curate.features.embed, which is not available ({exc})."
        ) from exc
    return normalise_rows(embed_texts(docs, model=model, batch_size=batch_size, device=device, progress=False))


def radius_pairs(x: np.ndarray, min_cosine: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of unit rows with ``x_i . x_j >= min_cosine`` (exact faiss range search)."""
    faiss = require("faiss", "semantic dedup neighbour search")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    # faiss keeps results with similarity > radius; step just below to include equality.
    lims, dist, ids = index.range_search(x, float(np.nextafter(np.float32(min_cosine), np.float32(-1))))
    rows = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
    mask = ids > rows
    return rows[mask], ids[mask].astype(np.int64), dist[mask]


def semantic_duplicates(
    table: pl.DataFrame,
    *,
    embeddings: np.ndarray | None = None,
    model: str | Encoder = "default",
    field: str = "prompt+response",
    eps: float = 0.05,
    batch_size: int = 64,
    device: str = "auto",
) -> pl.DataFrame:
    """Clusters of rows with cosine >= ``1 - eps`` on ``field`` embeddings.

    Args:
        table: canonical table.
        embeddings: precomputed (n, d) embeddings aligned with ``table`` rows (else computed).
        model: encoder object or embedder name (see :func:`embed`).
        field: ``prompt`` (turn-aware: same request) or ``prompt+response`` (same row), or any text field.
        eps: cosine distance below which rows are duplicates, in (0, 1].

    Returns:
        ``uid, keep, reason, score, cluster_id, dup_of, cluster_size``; ``score`` is the cosine
        to the kept representative.
    """
    _check(field, eps, "semantic_duplicates")
    x = embed(texts(table, field), model=model, batch_size=batch_size, device=device) if embeddings is None \
        else normalise_rows(embeddings)
    if x.shape[0] != table.height:
        raise param_error("semantic_duplicates", "embeddings", f"an array with {table.height} rows", x.shape)
    src, dst, _ = radius_pairs(x, 1.0 - eps)
    rep = representatives(components(table.height, src, dst), keep_order(table))
    sim = np.einsum("ij,ij->i", x, x[rep]) if table.height else np.empty(0)
    return cluster_frame(table, rep, np.clip(sim, -1.0, 1.0), "semantic_dedup", f"semantic duplicate ({field})")


def _check(field: str, eps: float, owner: str) -> None:
    if field not in TEXT_FIELDS:
        raise param_error(owner, "field", f"one of {TEXT_FIELDS}", field)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 1.0:
        raise param_error(owner, "eps", "in (0, 1]", eps)


@register_step("semantic_dedup")
@dataclass(frozen=True, kw_only=True)
class SemanticDedup:
    """Drop semantic near-duplicates (cosine >= 1 - eps) found by an exact faiss radius search.

    Parameters:
        field: ``prompt+response`` (default) or ``prompt`` (turn-aware) or another text field.
        eps: cosine distance threshold in (0, 1] (default 0.05, i.e. cosine >= 0.95).
        model: embedder name for ``curate.features.embed`` (default ``default``; ``hashing`` for tests).
        feature: name of a precomputed feature set in the run's store to use instead (optional).
        batch_size: embedding batch size.
    """

    field: str = "prompt+response"
    eps: float = 0.05
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    feature: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check(self.field, self.eps, "SemanticDedup")
        if not isinstance(self.model, str) or not self.model:
            raise param_error("SemanticDedup", "model", "a non-empty model name", self.model)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("SemanticDedup", "batch_size", "an integer >= 1", self.batch_size)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        emb = ctx.features[self.feature].align(table["uid"]) if self.feature else None
        out = semantic_duplicates(table, embeddings=emb, model=self.model, field=self.field, eps=self.eps,
                                  batch_size=self.batch_size, device=ctx.device)
        clusters = out.filter(pl.col("cluster_size") > 1).select(
            "uid", "cluster_id", pl.col("keep").alias("kept"), pl.col("score").alias("similarity"), "cluster_size")
        write_artifact(clusters, ctx.step_dir, "clusters.parquet")
        ctx.stats["semantic_dedup"] = {"n_duplicates": int((~out["keep"]).sum()),
                                       "n_clusters": int(clusters["cluster_id"].n_unique()) if clusters.height else 0}
        return out
