"""Baseline selectors: random, top-k by a score column, k-center greedy, DEITA, DSIR."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.selectors.base import (
    BaseSelector,
    Choice,
    SelectContext,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
    stable_topk,
)


def _uid_uniform(uids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per (seed, uid): independent of row order and of the pool."""
    out = np.empty(len(uids), dtype=np.float64)
    for i, u in enumerate(uids.tolist()):
        h = hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0**64
    return out


@dataclass(frozen=True, kw_only=True)
class RandomSelector(BaseSelector):
    """Seeded uniform random sample (the baseline every method must beat).

    Each row gets a key hashed from (seed, uid), so the sample is row-order invariant and a row's
    fate does not depend on which other rows are in the pool.
    """

    name: ClassVar[str] = "random"

    def _score(self, ctx: SelectContext) -> np.ndarray:
        return _uid_uniform(ctx.uids, ctx.seed)


@dataclass(frozen=True, kw_only=True)
class TopKSelector(BaseSelector):
    """Top-k by any numeric score column of the table (e.g. ``quality__score``).

    Rows with a null or NaN score are never kept (reason ``no_score``). Ties go to the smaller uid.
    """

    name: ClassVar[str] = "topk"
    column: str = "score"
    descending: bool = True
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (("column", ""),)

    def __post_init__(self) -> None:
        check_str("TopK", "column", self.column)
        check_bool("TopK", "descending", self.descending)

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        if self.column not in ctx.table.columns:
            raise SchemaError(f"topk: the table has no score column '{self.column}'.", field=self.column,
                              expected="a numeric column", found=sorted(ctx.table.columns)[:20])
        raw = ctx.table[self.column].cast(pl.Float64, strict=False).to_numpy().astype(np.float64)
        missing = ~np.isfinite(raw)
        key = raw if self.descending else -raw
        key = np.where(missing, -np.inf, key)
        order = stable_topk(key, k)
        order = order[~missing[order]]
        reasons = np.where(missing, "no_score", "").astype(object)
        score = np.where(missing, -np.inf, raw)
        return Choice(order=order, score=score, reasons=reasons)


@dataclass(frozen=True, kw_only=True)
class KCenterSelector(BaseSelector):
    """k-center greedy (farthest-first traversal) on an embedding.

    Sener & Savarese, "Active Learning for Convolutional Neural Networks: A Core-Set Approach",
    ICLR 2018, arXiv 1708.00489: repeatedly add the point farthest from the selected set, a
    2-approximation of the minimax cover. Deviation: the first centre is a seeded draw over the
    canonical (uid) order, ties in the farthest point go to the smaller uid, and distances are
    exact numpy (one N×d mat-vec per pick); a faiss index brings nothing to one query per step.

    ``score`` is the distance to the selected set when the row was picked (kept rows) or at the
    end (others; reason ``covered_by:<uid>``).
    """

    name: ClassVar[str] = "kcenter"
    requires: ClassVar[tuple[str, ...]] = ("embed",)
    default_features: ClassVar[dict[str, str]] = {"embed": "embed/prompt+response"}
    metric: str = "euclidean"
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (("metric", "manhattan"),)

    def __post_init__(self) -> None:
        check_choice("KCenter", "metric", self.metric, ("euclidean", "cosine"))

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        x = np.asarray(ctx.features["embed"], dtype=np.float64)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        n = len(x)
        sq = np.einsum("ij,ij->i", x, x)
        dist = np.full(n, np.inf)
        nearest = np.full(n, -1, dtype=np.int64)
        score = np.zeros(n)
        order: list[int] = []
        cur = int(ctx.rng.integers(n)) if n else 0
        for _ in range(k):
            order.append(cur)
            score[cur] = dist[cur] if np.isfinite(dist[cur]) else 0.0
            d = np.sqrt(np.maximum(sq + sq[cur] - 2.0 * (x @ x[cur]), 0.0))
            closer = d < dist
            dist[closer] = d[closer]
            nearest[closer] = cur
            dist[cur] = -1.0
            dist_masked = dist.copy()
            dist_masked[order] = -np.inf
            if len(order) == n:
                break
            cur = int(np.argmax(dist_masked))
        kept = np.zeros(n, dtype=bool)
        kept[order] = True
        reasons = np.array([""] * n, dtype=object)
        for i in np.flatnonzero(~kept):
            score[i] = dist[i] if np.isfinite(dist[i]) else 0.0
            if nearest[i] >= 0:
                reasons[i] = f"covered_by:{ctx.uids[nearest[i]]}"
        return Choice(order=np.asarray(order, dtype=np.int64), score=score, reasons=reasons,
                      diagnostics={"cover_radius": float(max((score[i] for i in np.flatnonzero(~kept)), default=0.0))})


@dataclass(frozen=True, kw_only=True)
class DeitaSelector(BaseSelector):
    """DEITA score-first, diversity-aware selection.

    Liu et al., "What Makes Good Data for Alignment?", ICLR 2024, arXiv 2312.15685 (code
    ``hkust-nlp/deita``); specs/preference-diagnostics.md §7. The score is the product of
    ``score_columns`` (complexity × quality). Rows are walked in (-score, uid) order; a row is
    accepted iff its max cosine to the *already selected* rows is <= ``threshold`` (strictly
    sequential, the reference semantics; DEITA's batched variant is not adopted).

    ``mode="distilabel"`` reproduces distilabel's ``DeitaFiltering``: nearest-neighbour cosine
    *distance* against all rows must be >= ``threshold`` (so both members of a duplicate pair go),
    then top-k by score.
    """

    name: ClassVar[str] = "deita"
    requires: ClassVar[tuple[str, ...]] = ("embed",)
    default_features: ClassVar[dict[str, str]] = {"embed": "embed/prompt+response"}
    score_columns: tuple[str, ...] = ("complexity", "quality")
    threshold: float = 0.9
    mode: str = "deita"
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("threshold", 1.5), ("threshold", -2.0), ("mode", "batch"), ("score_columns", ()),
    )

    def __post_init__(self) -> None:
        cols = [self.score_columns] if isinstance(self.score_columns, str) else self.score_columns
        if not isinstance(cols, (list, tuple)) or not cols or not all(isinstance(c, str) and c for c in cols):
            raise param_error("Deita", "score_columns", "a non-empty list of column names", self.score_columns)
        object.__setattr__(self, "score_columns", tuple(cols))
        check_float("Deita", "threshold", self.threshold, -1.0, 1.0)
        check_choice("Deita", "mode", self.mode, ("deita", "distilabel"))

    def fills_budget(self) -> bool:
        return False

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        faiss = require("faiss", "DEITA diversity filter")
        score = np.ones(ctx.n)
        for c in self.score_columns:
            if c not in ctx.table.columns:
                raise SchemaError(f"deita: the table has no score column '{c}'.", field=c, expected="a numeric column")
            score = score * ctx.table[c].cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy()
        score = np.where(np.isfinite(score), score, -np.inf)
        e = np.asarray(ctx.features["embed"], dtype=np.float32)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        walk = stable_topk(score, ctx.n)
        reasons = np.array([""] * ctx.n, dtype=object)
        if self.mode == "distilabel":
            index = faiss.IndexFlatIP(e.shape[1])
            index.add(e)
            sims, ids = index.search(e, min(2, ctx.n))
            nn = np.full(ctx.n, -1.0)
            for i in range(ctx.n):  # the nearest other row (faiss may return self first or second)
                others = [s for s, j in zip(sims[i], ids[i], strict=False) if j != i and j >= 0]
                nn[i] = others[0] if others else -1.0
            ok = (1.0 - nn) >= self.threshold
            reasons[~ok] = "near_duplicate"
            order = [i for i in walk if ok[i]][:k]
        else:
            index = faiss.IndexFlatIP(e.shape[1])
            order = []
            sel_pos: list[int] = []
            for i in walk:
                if len(order) >= k:
                    break
                if order:
                    sim, j = index.search(e[i : i + 1], 1)
                    if float(sim[0, 0]) > self.threshold:
                        reasons[i] = f"near_duplicate_of:{ctx.uids[sel_pos[int(j[0, 0])]]}"
                        continue
                index.add(e[i : i + 1])
                order.append(int(i))
                sel_pos.append(int(i))
        kept = np.zeros(ctx.n, dtype=bool)
        kept[order] = True
        reasons[(~kept) & (reasons == "")] = "not_reached"
        return Choice(order=np.asarray(order, dtype=np.int64), score=score, reasons=reasons)


_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")


def dsir_bucket(gram: str, n_buckets: int) -> int:
    """Bucket of one n-gram: int(sha256(utf-8)) mod n_buckets (specs/preference-diagnostics.md §8)."""
    return int(hashlib.sha256(gram.encode("utf-8")).hexdigest(), 16) % n_buckets


def dsir_counts(texts: list[str], n_buckets: int, ngrams: int) -> np.ndarray:
    """Hashed n-gram count vectors (n_texts, n_buckets): lower-case, ``\\w+|[^\\w\\s]+`` tokens,
    1..ngrams-grams joined by one space."""
    cache: dict[str, int] = {}
    out = np.zeros((len(texts), n_buckets), dtype=np.float64)
    for r, text in enumerate(texts):
        toks = _TOKEN_RE.findall(text.lower())
        grams: Counter[str] = Counter()
        for n in range(1, ngrams + 1):
            for i in range(len(toks) - n + 1):
                grams[" ".join(toks[i : i + n])] += 1
        for g, c in grams.items():
            b = cache.get(g)
            if b is None:
                b = cache[g] = dsir_bucket(g, n_buckets)
            out[r, b] += c
    return out


@dataclass(frozen=True, kw_only=True)
class DSIRSelector(BaseSelector):
    """DSIR importance resampling with hashed n-gram features.

    Xie et al., "Data Selection for Language Models via Importance Resampling", NeurIPS 2023,
    arXiv 2302.03169 (code ``p-lambda/dsir``); specs/preference-diagnostics.md §8. Bag-of-hashed-
    n-gram models of the pool and of the targets, log importance weight
    log w(x) = Σ_b c_b(x)·(log p_tgt,b − log p_raw,b), then Gumbel top-k (sampling without
    replacement ∝ w). Deviations (reference defects fixed): the weights reuse the fitted
    ``n_buckets``/``ngrams``; the Gumbel noise is seeded. The raw model is fitted on all pool rows.
    Multiple targets with quotas are not implemented (one target distribution).
    """

    name: ClassVar[str] = "dsir"
    needs_targets: ClassVar[bool] = True
    n_buckets: int = 10000
    ngrams: int = 2
    top_k: bool = False
    text_field: str = "prompt+response"
    target_field: str = "prompt+response"
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("n_buckets", 0), ("ngrams", 0), ("text_field", "body"), ("target_field", "body"),
    )

    def __post_init__(self) -> None:
        from curate.schema import TEXT_FIELDS

        check_int("DSIR", "n_buckets", self.n_buckets, 1)
        check_int("DSIR", "ngrams", self.ngrams, 1, 5)
        check_bool("DSIR", "top_k", self.top_k)
        check_choice("DSIR", "text_field", self.text_field, TEXT_FIELDS)
        check_choice("DSIR", "target_field", self.target_field, TEXT_FIELDS)

    def _score(self, ctx: SelectContext) -> tuple[np.ndarray, dict[str, Any]]:
        from curate.schema import texts

        pool = dsir_counts(texts(ctx.table, self.text_field), self.n_buckets, self.ngrams)
        tgt = dsir_counts(texts(ctx.targets, self.target_field), self.n_buckets, self.ngrams)
        p_raw = pool.sum(0) / max(pool.sum(), 1.0)
        p_tgt = tgt.sum(0) / max(tgt.sum(), 1.0)
        u = np.log(p_tgt + 1e-8) - np.log(p_raw + 1e-8)
        logw = pool @ u
        key = logw if self.top_k else logw + ctx.rng.gumbel(size=ctx.n)
        return key, {"logw": logw, "key": key}


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-10) -> float:
    """KL(p || q) of two count/probability vectors (smoothed by ``eps``)."""
    p = np.asarray(p, dtype=np.float64) + eps
    q = np.asarray(q, dtype=np.float64) + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


__all__ = [
    "DSIRSelector", "DeitaSelector", "KCenterSelector", "RandomSelector", "TopKSelector", "dsir_bucket",
    "dsir_counts", "kl_divergence",
]
