"""Numbers behind the HTML report, computed from a finished run folder (no plotting here).

Everything is read back from the files the runner writes (``curate.pipeline.runner``):
``manifest.json`` (the funnel), ``curated.parquet`` / ``rejected.parquet`` (every row with its step
columns), ``steps/00-ingest/targets.parquet`` (targets, when the recipe has them) and
``features/`` (the run's :class:`~curate.io.store.FeatureStore`). Each function returns plain
data (dicts, lists, numpy arrays) so it can be tested against hand-worked values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.errors import RecipeError, SchemaError
from curate.io.store import FeatureSet, FeatureStore
from curate.pipeline.outcome import reason_category
from curate.schema import texts

SUFFIX_SCORE = "__score"
SUFFIX_CLUSTER = "__cluster_id"
COMPOSITION_COLUMNS = ("source", "kind", "task")


@dataclass
class RunData:
    """A finished run folder loaded for reporting.

    Attributes:
        run_dir: the folder.
        manifest: ``manifest.json`` as a dict.
        rows: every ingested row (curated and rejected, ingest rejects excluded) with ``_kept``
            (bool: the row is in ``curated.parquet``) and, for dropped rows, ``step`` and ``reason``.
        ingest_rejects: records the readers refused (source, source_line, field, reason, raw).
        targets: the recipe's target rows, or None.
        store: the run's feature store (may be empty).
    """

    run_dir: Path
    manifest: dict[str, Any]
    rows: pl.DataFrame
    ingest_rejects: pl.DataFrame
    targets: pl.DataFrame | None
    store: FeatureStore
    step_names: list[str] = field(default_factory=list)


def _read_parquet(path: Path) -> pl.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for bad files
        raise SchemaError(f"cannot read parquet: {exc}", file=str(path)) from None


def load_run_data(run_dir: str | Path) -> RunData:
    """Load what the report needs from ``run_dir``.

    Raises:
        RecipeError: ``run_dir`` has no ``manifest.json`` (not a finished run).
        SchemaError: a parquet file or the manifest cannot be read.
    """
    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not run_dir.is_dir() or not mpath.exists():
        raise RecipeError(f"{run_dir} is not a finished run folder (no manifest.json).")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaError(f"cannot read the manifest: {exc}", file=str(mpath)) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("steps", []), list):
        raise SchemaError("the manifest is malformed.", file=str(mpath), field="steps", expected="a list of steps")
    curated = _read_parquet(run_dir / "curated.parquet")
    rejected = _read_parquet(run_dir / "rejected.parquet")
    frames = []
    if curated is not None:
        frames.append(curated.with_columns(pl.lit(True).alias("_kept")))
    ingest_rejects = pl.DataFrame()
    if rejected is not None and rejected.height:
        rej = rejected.with_columns(pl.lit(False).alias("_kept"))
        if "step" in rej.columns:
            is_ingest = pl.col("step").fill_null("") == "ingest"
            if "kind" in rej.columns:
                is_ingest = is_ingest & pl.col("kind").is_null()
            ingest_rejects = rej.filter(is_ingest).drop("_kept")
            rej = rej.filter(~is_ingest)
        if rej.height:
            frames.append(rej)
    rows = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame({"uid": [], "_kept": []},
                                                                                    schema={"uid": pl.Utf8, "_kept": pl.Boolean})
    if "kind" in rows.columns:
        rows = rows.filter(pl.col("kind").is_not_null())
    step_names = [str(s.get("step")) for s in manifest.get("steps", []) if s.get("step") != "ingest"]
    targets = _read_parquet(run_dir / "steps" / "00-ingest" / "targets.parquet")
    return RunData(run_dir, manifest, rows, ingest_rejects, targets, FeatureStore(run_dir / "features"), step_names)


# ------------------------------------------------------------------------------------- funnel
def funnel(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per step of the manifest: step, use, rows_in, rows_out, dropped (count) and
    reasons (category -> count, as the runner grouped them), seconds, cached."""
    out = []
    for s in manifest.get("steps", []):
        rows_in, rows_out = int(s.get("rows_in", 0)), int(s.get("rows_out", 0))
        reasons = {str(k): int(v) for k, v in (s.get("dropped") or {}).items()}
        out.append({
            "step": str(s.get("step", "?")), "use": str(s.get("use", s.get("step", "?"))),
            "rows_in": rows_in, "rows_out": rows_out, "dropped": rows_in - rows_out, "reasons": reasons,
            "seconds": float(s.get("seconds") or 0.0), "cached": bool(s.get("cached", False)),
            "peak_rss_mb": s.get("peak_rss_mb"),
        })
    return out


# ------------------------------------------------------------------------------------ lengths
def text_lengths(rows: pl.DataFrame, field: str) -> np.ndarray:
    """Character counts of ``field`` (``prompt``, ``response``, ...) of each row (via
    :func:`curate.schema.texts`)."""
    if rows.height == 0 or "kind" not in rows.columns:
        return np.zeros(0, dtype=np.int64)
    return np.fromiter((len(t) for t in texts(rows, field)), dtype=np.int64, count=rows.height)


def describe(values: np.ndarray) -> dict[str, float | int]:
    """count, mean, median, min, max of finite values (NaN-free; empty -> count 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max())}


def length_stats(rows: pl.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """``{"prompt": {"kept": lengths, "dropped": lengths}, "response": {...}}`` in characters."""
    if rows.height == 0 or "kind" not in rows.columns:
        return {}
    kept = rows.filter(pl.col("_kept"))
    dropped = rows.filter(~pl.col("_kept"))
    return {f: {"kept": text_lengths(kept, f), "dropped": text_lengths(dropped, f)} for f in ("prompt", "response")}


# ------------------------------------------------------------------------------------- scores
def score_columns(rows: pl.DataFrame) -> list[str]:
    """Every ``<step>__score`` column, in column order."""
    return [c for c in rows.columns if c.endswith(SUFFIX_SCORE)]


def score_split(rows: pl.DataFrame, column: str) -> dict[str, np.ndarray]:
    """Finite values of ``column`` split by the same step's ``__keep`` (kept / dropped by that
    step); rows the step never saw (null) are left out."""
    step = column[: -len(SUFFIX_SCORE)]
    keep_col = f"{step}__keep"
    sub = rows.filter(pl.col(column).is_not_null())
    vals = sub[column].cast(pl.Float64).to_numpy()
    if keep_col in sub.columns:
        keep = sub[keep_col].fill_null(True).to_numpy().astype(bool)
    else:
        keep = np.ones(sub.height, dtype=bool)
    finite = np.isfinite(vals)
    return {"kept": vals[finite & keep], "dropped": vals[finite & ~keep]}


# ----------------------------------------------------------------------------------- clusters
def cluster_columns(rows: pl.DataFrame) -> list[str]:
    """Every ``<step>__cluster_id`` column, in column order."""
    return [c for c in rows.columns if c.endswith(SUFFIX_CLUSTER)]


def cluster_summary(rows: pl.DataFrame, column: str, *, n_examples: int = 5, per_cluster: int = 3) -> dict[str, Any]:
    """Cluster sizes of one dedup step and its largest clusters with example rows.

    Returns:
        ``size_counts`` {size: number of clusters of that size}, ``n_clusters``, ``n_rows`` (rows
        with a cluster id), ``n_multi`` (clusters of size > 1), ``largest``: up to ``n_examples``
        clusters of size > 1, biggest first (ties by cluster id), each ``{cluster_id, size,
        members: [{uid, kept, text}]}`` with the step's kept row first, then by uid.
    """
    step = column[: -len(SUFFIX_CLUSTER)]
    keep_col = f"{step}__keep"
    sub = rows.filter(pl.col(column).is_not_null())
    if sub.height == 0:
        return {"step": step, "size_counts": {}, "n_clusters": 0, "n_rows": 0, "n_multi": 0, "largest": []}
    sizes = sub.group_by(column).len().rename({column: "cid", "len": "size"})
    size_counts = {int(s): int(n) for s, n in sizes.group_by("size").len().sort("size").iter_rows()}
    big = sizes.filter(pl.col("size") > 1).sort(["size", "cid"], descending=[True, False]).head(n_examples)
    largest = []
    for cid, size in big.iter_rows():
        members = sub.filter(pl.col(column) == cid)
        kept = members[keep_col].fill_null(False) if keep_col in members.columns else pl.Series([False] * members.height)
        members = members.with_columns(kept.alias("_step_kept")).sort(["_step_kept", "uid"], descending=[True, False])
        members = members.head(per_cluster)
        txt = texts(members, "prompt+response") if "kind" in members.columns else [""] * members.height
        largest.append({"cluster_id": str(cid), "size": int(size), "members": [
            {"uid": u, "kept": bool(k), "text": t}
            for u, k, t in zip(members["uid"].to_list(), members["_step_kept"].to_list(), txt, strict=True)]})
    return {"step": step, "size_counts": size_counts, "n_clusters": int(sizes.height), "n_rows": int(sub.height),
            "n_multi": int(sizes.filter(pl.col("size") > 1).height), "largest": largest}


SIMILARITY_BANDS = ((1.0, 1.0), (0.9, 1.0), (0.8, 0.9), (0.7, 0.8), (0.6, 0.7), (0.5, 0.6), (-1.0, 0.5))


def merged_pairs(rows: pl.DataFrame, step: str, *, per_band: int = 3) -> list[dict[str, Any]]:
    """A sample of the pairs one dedup step merged, per similarity band, for auditing merges.

    A pair is a row the step dropped and the row it matched (``<step>__matched``; the kept row
    ``<step>__dup_of`` for steps that do not name a match), with the step's ``<step>__score``.
    Bands are ``[1.0]``, ``[0.9, 1.0)``, ``[0.8, 0.9)`` … ``[0.5, 0.6)`` and below 0.5; each
    band gives its pair count and its first ``per_band`` pairs by uid (deterministic), each
    ``{uid, matched, similarity, text, matched_text}``. Empty bands are left out.
    """
    keep, score = f"{step}__keep", f"{step}__score"
    match = f"{step}__matched" if f"{step}__matched" in rows.columns else f"{step}__dup_of"
    if not {keep, score, match} <= set(rows.columns):
        return []
    dropped = rows.filter(pl.col(keep).is_not_null() & ~pl.col(keep) & pl.col(match).is_not_null()).sort("uid")
    if dropped.height == 0:
        return []
    sim = dropped[score].fill_null(float("nan")).to_numpy()
    by_uid = {}
    out = []
    for lo, hi in SIMILARITY_BANDS:
        m = (sim == hi) if lo == hi else (sim >= lo) & (sim < hi)
        if not m.any():
            continue
        part = dropped.filter(pl.Series(m)).head(per_band)
        wanted = [u for u in part[match].to_list() if u not in by_uid]
        if wanted:
            other = rows.filter(pl.col("uid").is_in(wanted))
            by_uid.update(zip(other["uid"].to_list(), texts(other, "prompt+response")))
        label = "1.0" if lo == hi else (f"< {hi:g}" if lo < 0 else f"[{lo:g}, {hi:g})")
        out.append({"band": label, "count": int(m.sum()), "pairs": [
            {"uid": u, "matched": v, "similarity": float(x), "text": t, "matched_text": by_uid.get(v, "")}
            for u, v, x, t in zip(part["uid"].to_list(), part[match].to_list(), part[score].to_list(),
                                  texts(part, "prompt+response"), strict=True)]})
    return out


# -------------------------------------------------------------------------------- composition
def _shares(values: Sequence[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        key = "(none)" if v is None else str(v)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _label(column: str, value: str | None) -> str | None:
    if value is None:
        return None
    return Path(value).name if column == "source" else value


def composition(rows: pl.DataFrame, targets: pl.DataFrame | None = None) -> list[dict[str, Any]]:
    """Counts by ``source`` (file name), ``kind`` and ``task`` in the input pool, the curated
    subset and (for ``task``) the targets.

    A column is reported when it has at least one non-null value in the pool or the targets.
    Each entry: ``{column, rows: [{value, input, curated, curated_share, input_share,
    target, target_share}]}`` with counts and shares in [0, 1]; rows sorted by input count
    (descending), then target count, then value.
    """
    out = []
    n_in = rows.height
    kept = rows.filter(pl.col("_kept")) if rows.height else rows
    n_kept = kept.height
    for col in COMPOSITION_COLUMNS:
        pool_vals = [_label(col, v) for v in rows[col].to_list()] if col in rows.columns else []
        has_pool = any(v is not None for v in pool_vals)
        tgt_vals: list[str | None] = []
        if targets is not None and col in targets.columns and col == "task":
            tgt_vals = [_label(col, v) for v in targets[col].to_list()]
        has_tgt = any(v is not None for v in tgt_vals)
        if not has_pool and not has_tgt:
            continue
        c_in = _shares(pool_vals) if col in rows.columns else {}
        c_kept = _shares([_label(col, v) for v in kept[col].to_list()]) if col in kept.columns else {}
        c_tgt = _shares(tgt_vals) if has_tgt else {}
        n_tgt = len(tgt_vals)
        values = sorted(set(c_in) | set(c_tgt), key=lambda v: (-c_in.get(v, 0), -c_tgt.get(v, 0), v))
        table = []
        for v in values:
            table.append({
                "value": v, "input": c_in.get(v, 0), "curated": c_kept.get(v, 0),
                "input_share": c_in.get(v, 0) / n_in if n_in else 0.0,
                "curated_share": c_kept.get(v, 0) / n_kept if n_kept else 0.0,
                "target": c_tgt.get(v, 0) if has_tgt else None,
                "target_share": (c_tgt.get(v, 0) / n_tgt if n_tgt else 0.0) if has_tgt else None,
            })
        out.append({"column": col, "rows": table, "has_targets": has_tgt})
    return out


# ----------------------------------------------------------------------------- embedding map
def embedding_features(store: FeatureStore) -> list[str]:
    """Names of the pool's embedding feature sets (``embed/...``) in ``store``; the targets' sets
    (``embed/<field>/targets``) hold no pool rows and are left out."""
    return [n for n in store.names() if n.startswith("embed") and not n.endswith("/targets")]


def pca_2d(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of ``values`` (n, d) on their first two principal components.

    Pearson (1901) / Hotelling (1933) PCA by a thin SVD of the centred float64 matrix. Signs are
    fixed (each component's largest-magnitude loading is positive) so the map is deterministic.

    Returns:
        (coords (n, 2), explained variance ratio (2,)); missing components (d < 2 or n < 2)
        are zeros.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    coords = np.zeros((n, 2))
    ratio = np.zeros(2)
    if n < 2:
        return coords, ratio
    x = x.reshape(n, -1)
    xc = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(2, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    signs[signs == 0] = 1.0
    comps = comps * signs[:, None]
    coords[:, :k] = xc @ comps.T
    total = float((s**2).sum())
    if total > 0:
        ratio[:k] = (s[:k] ** 2) / total
    return coords, ratio


def _sample_uids(uids: list[str], limit: int) -> list[str]:
    """Up to ``limit`` uids, chosen deterministically (by uid) and spread over the hash space."""
    if len(uids) <= limit:
        return uids
    return sorted(uids)[:: math.ceil(len(uids) / limit)][:limit]


def embedding_map(rows: pl.DataFrame, fs: FeatureSet, *, max_points: int = 20000, method: str = "auto") -> dict[str, Any]:
    """2-D map of the rows' embeddings with kept/dropped flags.

    ``method``: ``pca``, ``umap`` (McInnes et al. 2018; needs ``umap-learn``), or ``auto`` (UMAP
    when installed, else PCA). We deviate from plotting every row: at most ``max_points`` rows,
    picked deterministically by uid, so big pools still give a readable map and a small file.

    Returns:
        ``{name, method, coords (m, 2), kept (m,), uids, explained (PCA ratio or None), n_total}``.
    """
    have = set(fs.uids.tolist())
    uids = [u for u in rows["uid"].to_list() if u in have]
    chosen = set(_sample_uids(uids, max_points))
    sub = rows.filter(pl.col("uid").is_in(list(chosen))).sort("uid")
    vals = fs.align(sub["uid"]).reshape(sub.height, -1) if sub.height else np.zeros((0, 2))
    kept = sub["_kept"].to_numpy().astype(bool) if sub.height else np.zeros(0, dtype=bool)
    used = "pca"
    explained: np.ndarray | None = None
    if method in ("umap", "auto") and sub.height >= 10:
        try:
            import umap  # type: ignore[import-not-found]

            coords = umap.UMAP(n_components=2, random_state=0).fit_transform(vals)
            used = "umap"
        except ImportError:
            if method == "umap":
                from curate._lazy import require

                require("umap", "the UMAP embedding map of the report")
            coords = None
    else:
        coords = None
    if coords is None:
        coords, explained = pca_2d(vals)
    return {"name": fs.name, "method": used, "coords": np.asarray(coords, dtype=np.float64), "kept": kept,
            "uids": sub["uid"].to_list(), "explained": explained, "n_total": len(uids)}


# ------------------------------------------------------------------------------ sample rows
def samples_per_reason(rows: pl.DataFrame, ingest_rejects: pl.DataFrame | None = None, *, step_order: Sequence[str] = (),
                       per_reason: int = 3, max_reasons: int = 60, max_chars: int = 600) -> list[dict[str, Any]]:
    """Example dropped rows for each (step, reason category), largest groups first.

    Reasons are grouped like the funnel (``curate.pipeline.outcome.reason_category``: uids become
    ``<uid>``, numbers ``#``), ordered by ``step_order`` (the recipe's steps; ingest first), then
    by size. Examples are the first ``per_reason`` rows by uid; texts are cut at ``max_chars``
    characters (not escaped here: the HTML layer escapes).
    """
    groups: list[dict[str, Any]] = []
    dropped = rows.filter(~pl.col("_kept")) if rows.height else rows
    if dropped.height and "reason" in dropped.columns:
        steps = dropped["step"].to_list() if "step" in dropped.columns else [None] * dropped.height
        cats = [reason_category(r or "") for r in dropped["reason"].to_list()]
        dropped = dropped.with_columns(pl.Series("_step", steps, dtype=pl.Utf8), pl.Series("_cat", cats, dtype=pl.Utf8))
        order = {s: i for i, s in enumerate(step_order)}
        for (step, cat), grp in dropped.group_by(["_step", "_cat"]):
            grp = grp.sort("uid")
            ex = grp.head(per_reason)
            prompts = texts(ex, "prompt")
            responses = texts(ex, "response")
            examples = [{
                "uid": u, "reason": r, "where": _where(s, ln),
                "prompt": _cut(p, max_chars), "response": _cut(resp, max_chars),
            } for u, r, s, ln, p, resp in zip(
                ex["uid"].to_list(), ex["reason"].to_list(), _col(ex, "source"), _col(ex, "source_line"),
                prompts, responses, strict=True)]
            groups.append({"step": step or "?", "reason": cat, "count": grp.height, "examples": examples,
                           "_order": order.get(step, len(order))})
    if ingest_rejects is not None and ingest_rejects.height and "reason" in ingest_rejects.columns:
        rej = ingest_rejects.with_columns(
            pl.Series("_cat", [reason_category(r or "") for r in ingest_rejects["reason"].to_list()], dtype=pl.Utf8))
        for (cat,), grp in rej.group_by(["_cat"]):
            ex = grp.head(per_reason)
            examples = [{"uid": None, "reason": r, "where": _where(s, ln), "prompt": _cut(raw or "", max_chars),
                         "response": ""} for r, s, ln, raw in zip(
                ex["reason"].to_list(), _col(ex, "source"), _col(ex, "source_line"), _col(ex, "raw"), strict=True)]
            groups.append({"step": "ingest", "reason": cat, "count": grp.height, "examples": examples, "_order": -1})
    groups.sort(key=lambda g: (g["_order"], -g["count"], g["reason"]))
    for g in groups:
        g.pop("_order")
    return groups[:max_reasons]


def _col(df: pl.DataFrame, name: str) -> list[Any]:
    return df[name].to_list() if name in df.columns else [None] * df.height


def _where(source: str | None, line: int | None) -> str:
    if source is None:
        return ""
    return f"{Path(source).name}:{line}" if line is not None else Path(source).name


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
