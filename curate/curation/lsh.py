"""LSH primitives of MinHash dedup: banding choices, candidate pairs from band buckets, exact
Jaccard of candidate pairs, verified links and each row's best link.

Banding follows Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3 (the S-curve
``1 - (1 - J^r)^b``); the balanced choice is datasketch's. See :mod:`curate.curation.minhash`.
"""

from __future__ import annotations

import numpy as np

from curate._lazy import require
from curate.curation._common import _splitmix64

_EMPTY = np.uint32(0xFFFFFFFF)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising equal-weight false positive + negative rates (datasketch).

    This is the right choice when candidate pairs are *not* verified exactly (a false positive
    then merges clusters); with exact verification use :func:`recall_bands`.
    """
    datasketch = require("datasketch", "MinHash LSH parameters")
    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
    return int(lsh.b), int(lsh.r)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that a pair at Jaccard ``jaccard`` shares at least one band bucket: the LSH
    S-curve ``1 - (1 - J^r)^b`` (Leskovec et al., MMDS, section 3.4)."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def recall_bands(threshold: float, num_perm: int, *, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) for exact verification: the most rows per band (fewest spurious candidates)
    such that a pair *at* the threshold is a candidate with probability >= ``recall``.

    Pairs above the threshold are candidates even more often; false positives cost only the
    verification work. Falls back to one row per band when no choice reaches ``recall``.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands < 1:
            break
        if candidate_probability(threshold, bands, rows) >= recall:
            best = (bands, rows)
    return best


def lsh_candidates(sig: np.ndarray, *, bands: int, rows: int, window: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(i, j)``, ``i < j``, sharing a band bucket (each pair once).

    Inside a bucket of up to ``window + 1`` members every pair is a candidate; larger buckets
    (near-identical rows in bulk) give pairs up to ``window`` apart in row order plus a star to
    the bucket head, which keeps the edge count linear in the number of rows. Pairs are
    de-duplicated band by band so memory stays proportional to the distinct pairs.
    """
    n = sig.shape[0]
    valid = ~(sig == _EMPTY).all(axis=1)
    idx = np.nonzero(valid)[0]
    code = np.empty(0, dtype=np.int64)
    for band in range(bands):
        # A band's rows folded into one 64-bit key (sorting uint64 is far faster than void rows); a
        # key collision only adds a candidate pair, which verification then checks.
        block = sig[idx, band * rows : (band + 1) * rows].astype(np.uint64)
        keys = np.zeros(len(idx), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for c in range(rows):
                keys = _splitmix64(keys * np.uint64(0x100000001B3) + block[:, c])
        _, inv = np.unique(keys, return_inverse=True)
        inv = inv.ravel()
        order = np.argsort(inv, kind="stable")
        b_sorted, members = inv[order], idx[order]
        sizes = np.bincount(inv)[b_sorted]
        if sizes.max(initial=1) < 2:
            continue
        starts = np.searchsorted(b_sorted, b_sorted, side="left")
        parts = []
        for k in range(1, min(int(sizes.max()) - 1, window) + 1):
            same = b_sorted[k:] == b_sorted[:-k]
            parts.append(np.stack([members[:-k][same], members[k:][same]], axis=1))
        big = (sizes > window + 1) & (np.arange(len(members)) != starts)
        if big.any():
            parts.append(np.stack([members[starts[big]], members[big]], axis=1))
        pairs = np.concatenate(parts).astype(np.int64)
        pairs.sort(axis=1)
        code = np.unique(np.concatenate([code, pairs[:, 0] * n + pairs[:, 1]]))
    return code // n, code % n


def exact_jaccard_pairs(flat: np.ndarray, offsets: np.ndarray, src: np.ndarray, dst: np.ndarray,
                        *, chunk: int = 1 << 22) -> np.ndarray:
    """Exact Jaccard of the shingle-hash sets of row pairs ``(src[k], dst[k])``.

    Row ``i``'s distinct shingle hashes are ``flat[offsets[i]:offsets[i+1]]``. Vectorised: both
    rows' hashes are tagged with the pair number, sorted, and equal neighbours counted.
    """
    lens = np.diff(offsets)
    out = np.empty(len(src), dtype=np.float64)
    cost = np.cumsum(lens[src] + lens[dst])
    lo = 0
    while lo < len(src):
        done = int(cost[lo - 1]) if lo else 0
        hi = max(int(np.searchsorted(cost, done + chunk, side="right")), lo + 1)
        s, d = src[lo:hi], dst[lo:hi]
        pid = np.arange(hi - lo, dtype=np.uint64)
        tagged = []
        for rows_ in (s, d):
            ln = lens[rows_]
            pos = np.repeat(offsets[rows_] - (np.cumsum(ln) - ln), ln) + np.arange(int(ln.sum()))
            tagged.append((np.repeat(pid, ln) << np.uint64(32)) | flat[pos].astype(np.uint64))
        keys = np.sort(np.concatenate(tagged))
        eq = keys[1:] == keys[:-1]
        inter = np.bincount((keys[1:][eq] >> np.uint64(32)).astype(np.int64), minlength=hi - lo)
        union = lens[s] + lens[d] - inter
        out[lo:hi] = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        lo = hi
    return out


def verified_links(
    sig: np.ndarray, *, threshold: float, bands: int, rows: int, verify: str = "exact",
    shingles: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LSH candidate pairs that pass verification, with their similarity: ``(src, dst, similarity)``.

    ``verify="exact"`` keeps a candidate when the exact Jaccard of the two rows' distinct shingle
    hashes (``shingles = (flat, offsets)``) reaches ``threshold`` and reports that Jaccard;
    ``"signature"`` does the same with the signature estimate; ``"none"`` keeps every candidate
    (similarity: the estimate).
    """
    src, dst = lsh_candidates(sig, bands=bands, rows=rows)
    if not len(src):
        return src, dst, np.empty(0, dtype=np.float64)
    if verify == "exact":
        if shingles is None:
            raise ValueError("verify='exact' needs the rows' shingle hashes")
        sim = exact_jaccard_pairs(shingles[0], shingles[1], src, dst)
    else:
        sim = np.empty(len(src), dtype=np.float64)
        for s in range(0, len(src), 1 << 16):
            sl = slice(s, s + (1 << 16))
            sim[sl] = (sig[src[sl]] == sig[dst[sl]]).mean(axis=1)
    if verify != "none":
        ok = sim >= threshold
        src, dst, sim = src[ok], dst[ok], sim[ok]
    return src, dst, sim


def best_links(n: int, src: np.ndarray, dst: np.ndarray, sim: np.ndarray, rank: np.ndarray,
               tag: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's most similar verified neighbour: ``(matched, similarity, tag)`` per row.

    ``matched[i]`` is -1 for a row without links. Ties go to the neighbour that sorts first under
    the keep rule (lowest ``rank``), so the choice depends on content, never on row order.
    """
    matched = np.full(n, -1, dtype=np.int64)
    best = np.zeros(n, dtype=np.float64)
    best_tag = np.zeros(n, dtype=np.int64)
    if not len(src):
        return matched, best, best_tag
    a, b = np.concatenate([src, dst]), np.concatenate([dst, src])
    s = np.concatenate([sim, sim])
    t = np.zeros(len(a), dtype=np.int64) if tag is None else np.concatenate([tag, tag])
    order = np.lexsort((t, rank[b], -s, a))
    first = np.ones(len(order), dtype=bool)
    first[1:] = a[order][1:] != a[order][:-1]
    pick = order[first]
    matched[a[pick]], best[a[pick]], best_tag[a[pick]] = b[pick], s[pick], t[pick]
    return matched, best, best_tag
