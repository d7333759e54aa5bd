"""Shared helpers of the curation stages: text normalisation, fast shingle hashing, the
deterministic "which row is kept" rule and connected components.

Nothing here imports a heavy dependency at module level.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import polars as pl

from curate._lazy import require

_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"\w+", re.UNICODE)
_M64 = (1 << 64) - 1

# Multiplier of the polynomial window hash (odd 64-bit constant: the golden ratio).
_POLY = np.uint64(0x9E3779B97F4A7C15)


def normalise_text(text: str, *, lowercase: bool = True, collapse_whitespace: bool = True) -> str:
    """NFC text, optionally case-folded and with whitespace runs collapsed to one space (stripped)."""
    text = unicodedata.normalize("NFC", text or "")
    if lowercase:
        text = text.casefold()
    if collapse_whitespace:
        text = _WS_RE.sub(" ", text).strip()
    return text


def word_tokens(text: str) -> list[str]:
    """Normalised word tokens: NFKC, case-folded, runs of unicode word characters (punctuation dropped)."""
    return _WORD_RE.findall(unicodedata.normalize("NFKC", text or "").casefold())


def stable_hash64(text: str) -> int:
    """A 64-bit blake2b hash of ``text`` (stable across processes, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class TokenHasher:
    """Maps word tokens to stable 64-bit ids, caching each distinct token once."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: Sequence[str]) -> np.ndarray:
        cache = self._cache
        ids = list(map(cache.get, tokens))
        if None in ids:  # hash each new distinct token once
            for i, (t, h) in enumerate(zip(tokens, ids)):
                if h is None:
                    h = cache.get(t)
                    if h is None:
                        h = cache[t] = stable_hash64(t)
                    ids[i] = h
        return np.fromiter(ids, dtype=np.uint64, count=len(ids))


def window_hashes(units: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every window of ``n`` consecutive units (uint64 ids), in order.

    A window's hash is a polynomial in the (mixed) unit ids, so equal windows give equal hashes
    wherever they occur. Fewer than ``n`` units give no window.
    """
    if len(units) < n:
        return np.empty(0, dtype=np.uint64)
    mixed = _splitmix64(units.astype(np.uint64, copy=False))
    powers = np.empty(n, dtype=np.uint64)
    p = 1
    for j in range(n):
        powers[n - 1 - j] = p
        p = (p * int(_POLY)) & _M64
    win = np.lib.stride_tricks.sliding_window_view(mixed, n)
    with np.errstate(over="ignore"):
        h = (win * powers).sum(axis=1, dtype=np.uint64)
    return _splitmix64(h)


def shingle_units(text: str, shingle: str, hasher: TokenHasher) -> np.ndarray:
    """The unit ids shingles are made of: word ids (``word``) or code points (``char``)."""
    if shingle == "word":
        return hasher(word_tokens(text))
    norm = normalise_text(text)
    return np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def shingle_hashes(text: str, *, shingle: str = "word", ngram: int = 5, hasher: TokenHasher | None = None) -> np.ndarray:
    """Distinct 32-bit hashes of the ``ngram``-shingles of ``text`` (sorted).

    Words are normalised tokens (see :func:`word_tokens`); characters are taken from the
    case-folded, whitespace-collapsed text. A text shorter than ``ngram`` units (but not empty)
    is one shingle of all its units, so short rows still get a signature.
    """
    units = shingle_units(text, shingle, hasher or TokenHasher())
    if len(units) == 0:
        return np.empty(0, dtype=np.uint32)
    h = window_hashes(units, min(ngram, len(units)))
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def shingle_strings(text: str, *, shingle: str = "word", ngram: int = 5) -> set[str]:
    """The same shingles as :func:`shingle_hashes`, as strings (the exact reference for tests)."""
    if shingle == "word":
        toks = word_tokens(text)
        n = min(ngram, len(toks))
        return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)} if toks else set()
    norm = normalise_text(text)
    n = min(ngram, len(norm))
    return {norm[i : i + n] for i in range(len(norm) - n + 1)} if norm else set()


def jaccard(a: set[str], b: set[str]) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------- which row is kept
def keep_order(table: pl.DataFrame) -> np.ndarray:
    """Rank of every row under the keep rule: earliest ``(source, source_line)``, then smallest uid.

    Rows without a source sort after rows with one. The rule depends only on row content and
    provenance, never on the row's position in ``table``, so dedup results are row-order invariant.
    Returns ``rank`` with ``rank[i]`` the position of row ``i`` in that order.
    """
    n = table.height
    src = table["source"] if "source" in table.columns else pl.Series([None] * n, dtype=pl.Utf8)
    line = table["source_line"] if "source_line" in table.columns else pl.Series([None] * n, dtype=pl.Int64)
    frame = pl.DataFrame({"i": np.arange(n), "src": src, "line": line, "uid": table["uid"]})
    order = frame.sort(["src", "line", "uid"], nulls_last=True)["i"].to_numpy()
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes given undirected edges (union-find over the
    whole table, so a cluster is global, not per batch)."""
    if len(src) == 0:
        return np.arange(n)
    sparse = require("scipy.sparse", "connected components of duplicate pairs")
    csgraph = require("scipy.sparse.csgraph", "connected components of duplicate pairs")
    g = sparse.coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = csgraph.connected_components(g, directed=False)
    return labels


def representatives(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For each row, the row index of its component's representative (lowest ``rank``)."""
    n = len(labels)
    order = np.lexsort((rank, labels))  # by label, then rank
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep_of_label = {}
    for i in order[first]:
        rep_of_label[labels[i]] = i
    return np.fromiter((rep_of_label[lab] for lab in labels), dtype=np.int64, count=n)


def cluster_frame(
    table: pl.DataFrame, rep: np.ndarray, similarity: np.ndarray, step: str, what: str
) -> pl.DataFrame:
    """Step output for a clustering dedup: uid, keep, reason, score, cluster_id, dup_of, cluster_size.

    ``cluster_id`` is the representative's uid (stable across runs and row orders).
    """
    uids = table["uid"].to_numpy().astype(object)
    idx = np.arange(table.height)
    keep = rep == idx
    sizes = np.bincount(rep, minlength=table.height)[rep]
    rep_uid = uids[rep]
    reasons = [
        "" if k else f"{step}: {what} of {r} (similarity {s:.3f})"
        for k, r, s in zip(keep.tolist(), rep_uid.tolist(), similarity.tolist())
    ]
    return pl.DataFrame(
        {
            "uid": uids.tolist(),
            "keep": keep,
            "reason": reasons,
            "score": similarity.astype(np.float64),
            "cluster_id": rep_uid.tolist(),
            "dup_of": [None if k else r for k, r in zip(keep.tolist(), rep_uid.tolist())],
            "cluster_size": sizes.astype(np.int64),
        },
        schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8, "score": pl.Float64,
                "cluster_id": pl.Utf8, "dup_of": pl.Utf8, "cluster_size": pl.Int64},
    )


def write_artifact(frame: pl.DataFrame, step_dir: object, name: str) -> None:
    """Write ``frame`` atomically as ``step_dir/name`` when a step folder is given."""
    if step_dir is None:
        return
    from pathlib import Path

    from curate.io.writers import write_parquet

    write_parquet(frame, Path(str(step_dir)) / name)
