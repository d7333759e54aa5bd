"""Influence scores: preconditioned query gradients, pairwise scores, self-influence (docs/methods/ekfac.md §8-§10).

Source: Grosse et al., "Studying Large Language Model Generalization with Influence Functions"
(arXiv 2308.03296), with kronfluence's sign convention.

**Sign.** s(q, n) = Σ_ℓ ⟨P_ℓ(V_{q,ℓ}), G_{n,ℓ}⟩. For J(θ) = Σ_n ℓ_n, up-weighting row n by δ moves
θ by −δ H⁻¹∇ℓ_n, so f(q) changes by −δ·s(q, n): **s > 0 means the training row lowers the query
loss** (helpful). Removing row n from a mean objective raises f(q) by ≈ s(q, n)/N.

Scores are computed from cached activations a and output gradients g of each training batch,
without materialising per-example gradients when per-token scores or low-rank queries are asked
for; otherwise G_n is formed per micro-batch (cheaper when T is large). The low-rank path uses
the exact SVD by default; ``svd="randomized"`` uses ``torch.svd_lowrank``.
Training-row activations and gradients are processed in float32 for float32 models (float64 for
float64 models), as kronfluence does by default; preconditioning and the accumulated per-pair
scores are float64. Queries can be preconditioned in chunks (``query_batch_size``) and, with a
rank, only their rank-r factors are kept, so many targets share one pass over the pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.influence.curvature import Curvature, per_sequence_grads, task_captures
from curate.influence.task import Task
from curate.io.store import FeatureSet

torch = require("torch", "influence functions")

NORMALIZE = ("none", "by_n_train", "cosine")


@dataclass
class ScoreMatrix:
    """Influence scores, queries (targets) × training rows (candidates).

    Attributes:
        values: (M, N) float64; NaN where a pair was not scored (TF-IDF prefilter).
        query_uids, train_uids: uids of the rows and the columns.
        per_module: module name -> (M, N) when asked for.
        per_token: (M, N, T) zero-padded per-token scores when asked for.
        reasons: (M, N) object array, ``""`` or ``"not_in_tfidf_topk"``, when a prefilter ran.
        meta: strategy, damping, normalisation, rank, ...
    """

    values: np.ndarray
    query_uids: list[str]
    train_uids: list[str]
    per_module: dict[str, np.ndarray] | None = None
    per_token: np.ndarray | None = None
    reasons: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_A(self) -> np.ndarray:  # noqa: N802 - the N×M matrix is A in docs/methods/ekfac.md
        """The (N, M) orientation selectors use (candidates × targets)."""
        return self.values.T

    def to_feature_set(self, name: str = "scores") -> FeatureSet:
        """(N, M) feature set keyed by candidate uid; meta ``target_uids`` names the columns."""
        return FeatureSet(name, np.asarray(self.train_uids, dtype=object), self.values.T.copy(),
                          {**self.meta, "target_uids": list(self.query_uids)})

    def aggregates(self) -> dict[str, np.ndarray]:
        """Per-candidate mean, max and min over targets (NaNs ignored)."""
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return {"mean": np.nanmean(self.values, 0), "max": np.nanmax(self.values, 0),
                        "min": np.nanmin(self.values, 0)}


def example_gradients(
    curv: Curvature, model: Any, task: Task, examples: Sequence[Any], *, batch_size: int = 8,
    aggregate: str | None = None,
) -> dict[str, Any]:
    """Per-example gradients of the data-label ℓ_sum for every tracked module.

    Returns:
        module name -> (Q, d_out, d_in+1) float64 (Q = 1 when ``aggregate`` is "sum" or "mean").
    """
    if aggregate not in (None, "sum", "mean"):
        raise param_error("example_gradients", "aggregate", "None, 'sum' or 'mean'", aggregate)
    curv._check_fitted()
    out: dict[str, list[Any]] = {n: [] for n in curv.names}
    for cap in task_captures(model, task, curv.names, examples, batch_size=batch_size, dtype=torch.float64):
        for n in curv.names:
            gn = per_sequence_grads(cap.calls(n))
            out[n].append(gn.sum(0, keepdim=True) if aggregate else gn)
    res = {n: torch.cat(v).sum(0, keepdim=True) if aggregate else torch.cat(v) for n, v in out.items()}
    if aggregate == "mean":
        res = {n: v / len(examples) for n, v in res.items()}
    return res


def precondition_examples(
    curv: Curvature, model: Any, task: Task, examples: Sequence[Any], *, batch_size: int = 8,
    aggregate: str | None = None, damping: float | str | None = "default",
) -> dict[str, Any]:
    """P(V_q) for query rows (or for their summed / mean gradient, e.g. Quad's ∇L(Q))."""
    return curv.precondition(example_gradients(curv, model, task, examples, batch_size=batch_size,
                                               aggregate=aggregate), damping=damping)


def low_rank(p: Any, rank: int, svd: str = "exact", seed: int = 0) -> tuple[Any, Any]:
    """Rank-r factors (U_r Σ_r (Q,o,r), W_rᵀ (Q,r,i)) of a batch of matrices (§9)."""
    if svd == "exact":
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
    if svd == "randomized":
        torch.manual_seed(seed)
        us, ws = [], []
        for m in p:
            u, s, v = torch.svd_lowrank(m, q=rank, niter=2)
            us.append(u[:, :rank] * s[None, :rank])
            ws.append(v[:, :rank].T)
        return torch.stack(us), torch.stack(ws)
    raise param_error("pairwise_scores", "svd", "'exact' or 'randomized'", svd)


def pairwise_scores(
    curv: Curvature,
    model: Any,
    task: Task,
    queries: Sequence[Any],
    train: Sequence[Any],
    *,
    query_uids: Sequence[str] | None = None,
    train_uids: Sequence[str] | None = None,
    batch_size: int = 8,
    damping: float | str | None = "default",
    query_rank: int | None = None,
    svd: str = "exact",
    per_module: bool = False,
    per_token: bool = False,
    normalize: str = "none",
    candidates: Sequence[Sequence[int]] | None = None,
    query_batch_size: int | None = None,
) -> ScoreMatrix:
    """Influence of every training row on every query, s(q, n) (§8).

    Args:
        curv: a fitted :class:`Curvature`.
        model, task: the model and its loss.
        queries, train: examples (what ``task.collate`` accepts).
        query_uids, train_uids: uids of both axes (default ``q0..``, ``t0..``).
        batch_size: micro-batch size (scores do not depend on it).
        damping: override the curvature's damping.
        query_rank: rank r of the truncated SVD of each P(V_q) (None = full rank).
        svd: ``"exact"`` or ``"randomized"`` (``torch.svd_lowrank``).
        per_module, per_token: keep the per-module / per-token decomposition.
        normalize: ``"none"``, ``"by_n_train"`` (divide by N_fit) or ``"cosine"``.
        candidates: per query, the training indices to score (e.g. from
            :func:`curate.influence.tfidf.tfidf_topk`); other pairs are NaN with reason
            ``not_in_tfidf_topk``. The union is scored once.
        query_batch_size: precondition this many queries at a time (None = all at once). With
            ``query_rank`` only the rank-r factors are kept per chunk, so memory is about
            Q·r·(d_out+d_in+1) per module instead of Q·d_out·(d_in+1); scores do not depend on it.
    """
    if normalize not in NORMALIZE:
        raise param_error("pairwise_scores", "normalize", f"one of {NORMALIZE}", normalize)
    if query_rank is not None and not (isinstance(query_rank, int) and query_rank >= 1):
        raise param_error("pairwise_scores", "query_rank", "an integer >= 1 or None", query_rank)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise param_error("pairwise_scores", "batch_size", "an integer >= 1", batch_size)
    if query_batch_size is not None and not (isinstance(query_batch_size, int) and query_batch_size >= 1):
        raise param_error("pairwise_scores", "query_batch_size", "an integer >= 1 or None", query_batch_size)
    queries, train = list(queries), list(train)
    qu = list(query_uids) if query_uids is not None else [f"q{i}" for i in range(len(queries))]
    tu = list(train_uids) if train_uids is not None else [f"t{i}" for i in range(len(train))]
    if len(qu) != len(queries) or len(tu) != len(train):
        raise SchemaError("uids do not match the examples.", field="uids",
                          expected=f"{len(queries)} query and {len(train)} train uids", found=(len(qu), len(tu)))
    m, n_all = len(queries), len(train)
    if m == 0 or n_all == 0:
        raise SchemaError("nothing to score.", field="queries" if m == 0 else "train",
                          expected="at least one query and one training row", found=(m, n_all))
    keep_cols = np.arange(n_all)
    mask_pairs = None
    if candidates is not None:
        if len(candidates) != m:
            raise SchemaError("one candidate list per query is needed.", field="candidates",
                              expected=str(m), found=len(candidates))
        mask_pairs = np.zeros((m, n_all), dtype=bool)
        for i, c in enumerate(candidates):
            mask_pairs[i, np.asarray(c, dtype=np.int64)] = True
        keep_cols = np.flatnonzero(mask_pairs.any(0))

    names = curv.names
    qbs = query_batch_size if query_batch_size is not None else max(m, 1)
    pq_parts: dict[str, list[Any]] = {nm: [] for nm in names}
    fac_parts: dict[str, list[tuple[Any, Any]]] = {nm: [] for nm in names}
    q_norm_parts: list[Any] = []
    for s0 in range(0, m, qbs):
        # precondition and compress one chunk of queries at a time (§9 query batching): with a rank
        # only the rank-r factors of every chunk are kept, then one pass over the training rows
        p = precondition_examples(curv, model, task, queries[s0 : s0 + qbs], batch_size=batch_size, damping=damping)
        if normalize == "cosine":
            q_norm_parts.append(sum((p[nm] ** 2).sum((1, 2)) for nm in names))
        for nm in names:
            o, i = p[nm].shape[1:]
            if query_rank is not None and query_rank < min(o, i):
                fac_parts[nm].append(low_rank(p[nm], query_rank, svd))
            else:
                pq_parts[nm].append(p[nm])
        del p
    pq = {nm: torch.cat(v) for nm, v in pq_parts.items() if v}
    factors = {nm: (torch.cat([u for u, _ in v]), torch.cat([w for _, w in v])) for nm, v in fac_parts.items() if v}
    q_norm2 = torch.cat(q_norm_parts) if normalize == "cosine" else None

    sub = [train[j] for j in keep_cols]
    mod_scores: dict[str, list[Any]] = {nm: [] for nm in names}
    tok_scores: list[Any] = []
    g_norm2: list[Any] = []
    for cap in task_captures(model, task, names, sub, batch_size=batch_size, dtype=_work_dtype(model)):
        tok_total = None
        norm_total = 0
        for nm in names:
            calls = cap.calls(nm)
            if per_token or nm in factors:
                s_tok = _token_scores(pq.get(nm), factors.get(nm), calls)
                mod_scores[nm].append(s_tok.sum(-1).double())
                if per_token:
                    tok_total = s_tok if tok_total is None else tok_total + s_tok
                if normalize == "cosine":
                    norm_total = norm_total + (per_sequence_grads(calls).double() ** 2).sum((1, 2))
            else:
                gn = per_sequence_grads(calls)
                mod_scores[nm].append(torch.einsum("qoi,boi->qb", pq[nm].to(gn.device, gn.dtype), gn).double())
                if normalize == "cosine":
                    norm_total = norm_total + (gn.double() ** 2).sum((1, 2))
        if per_token:
            tok_scores.append(tok_total.double())
        if normalize == "cosine":
            g_norm2.append(norm_total)

    per_mod = {nm: torch.cat(v, 1).cpu().numpy() for nm, v in mod_scores.items()}
    total = sum(per_mod.values())
    if normalize == "by_n_train":
        scale = 1.0 / max(curv.n_seq, 1)
        total = total * scale
        per_mod = {k: v * scale for k, v in per_mod.items()}
    elif normalize == "cosine":
        denom = np.sqrt(np.outer(q_norm2.cpu().numpy(), torch.cat(g_norm2).cpu().numpy()))
        denom[denom == 0] = np.inf
        total = total / denom
        per_mod = {k: v / denom for k, v in per_mod.items()}

    values = np.full((m, n_all), np.nan)
    values[:, keep_cols] = total
    tok_arr = None
    if per_token:
        t_max = max(t.shape[-1] for t in tok_scores)
        tok_arr = np.zeros((m, n_all, t_max))
        col = 0
        for t in tok_scores:
            b = t.shape[1]
            tok_arr[:, keep_cols[col : col + b], : t.shape[-1]] = t.cpu().numpy()
            col += b
    mods_full = None
    if per_module:
        mods_full = {}
        for k, v in per_mod.items():
            full = np.full((m, n_all), np.nan)
            full[:, keep_cols] = v
            mods_full[k] = full
    reasons = None
    if mask_pairs is not None:
        values[~mask_pairs] = np.nan
        reasons = np.where(mask_pairs, "", "not_in_tfidf_topk").astype(object)
        if mods_full:
            for v in mods_full.values():
                v[~mask_pairs] = np.nan
        if tok_arr is not None:
            tok_arr[~mask_pairs] = np.nan
    meta = {"strategy": curv.strategy, "damping": {nm: curv.damping_of(nm, damping) for nm in names},
            "normalize": normalize, "query_rank": query_rank, "svd": svd, "modules": names,
            "query_batch_size": query_batch_size,
            "sign": "positive = the candidate lowers the target loss"}
    return ScoreMatrix(values, qu, tu, mods_full, tok_arr, reasons, meta)


def _work_dtype(model: Any) -> Any:
    """float64 for float64 models (exactness tests), else float32 (as kronfluence's defaults):
    casting a float32 model's activations to float64 doubles the cost and adds no information.
    Preconditioning and the per-pair accumulation stay float64."""
    p = next(iter(model.parameters()), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def _token_scores(p: Any, fac: tuple[Any, Any] | None, calls: Sequence[tuple[Any, Any, Any]]) -> Any:
    """s(q, b, t) = Σ_calls m_t g_tᵀ P a_t, (Q, B, T); summed over calls of a shared module."""
    out = None
    for a, g, m in calls:
        if fac is None:
            pa = torch.einsum("qoi,bti->qbto", p.to(a.device, a.dtype), a)
            s = torch.einsum("qbto,bto->qbt", pa, g)
        else:
            us, w = fac
            gu = torch.einsum("bto,qok->qbtk", g, us.to(a.device, a.dtype))
            wa = torch.einsum("qki,bti->qbtk", w.to(a.device, a.dtype), a)
            s = (gu * wa).sum(-1)
        s = s * m[None]
        if out is None:
            out = s
        elif out.shape == s.shape:
            out = out + s
        else:  # a call over a different token axis: credit it to the sequence, not a token
            out = out.clone()
            out[..., 0] += s.sum(-1)
    return out


def self_scores(
    curv: Curvature, model: Any, task: Task, train: Sequence[Any], *, batch_size: int = 8,
    damping: float | str | None = "default",
) -> np.ndarray:
    """Self-influence s(n, n) = Σ_ℓ ⟨P_ℓ(G_n), G_n⟩ with the training loss as measurement."""
    out = []
    for cap in task_captures(model, task, curv.names, train, batch_size=batch_size, dtype=torch.float64):
        grads = {nm: per_sequence_grads(cap.calls(nm)) for nm in curv.names}
        pg = curv.precondition(grads, damping=damping)
        out.append(sum((pg[nm] * grads[nm]).sum((1, 2)) for nm in curv.names))
    return torch.cat(out).cpu().numpy()


def restrict(scores: ScoreMatrix, train_uids: Sequence[str]) -> ScoreMatrix:
    """The columns of ``scores`` for the given training uids (in that order)."""
    pos = {u: i for i, u in enumerate(scores.train_uids)}
    idx = [pos[u] for u in train_uids]
    return ScoreMatrix(scores.values[:, idx], list(scores.query_uids), list(train_uids), meta=dict(scores.meta))


def module_scores(scores: ScoreMatrix) -> Mapping[str, np.ndarray]:
    """The per-module decomposition (raises when it was not asked for)."""
    if scores.per_module is None:
        raise SchemaError("scores carry no per-module decomposition.", field="per_module",
                          expected="pairwise_scores(..., per_module=True)")
    return scores.per_module
