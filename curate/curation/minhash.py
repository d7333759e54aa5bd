"""MinHash-LSH near-duplicate detection with global clusters.

Method: MinHash signatures (Broder, 1997, "On the resemblance and containment of documents")
and banded LSH (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3), as used for
LLM data by Lee et al. (2022) and the datatrove / text-dedup pipelines. We use datasketch's
``affine32`` permutation scheme (its permutations, its MurmurHash3 pre-mix and its optimal
``(bands, rows)`` for the Jaccard threshold), so a signature equals
``datasketch.MinHash(num_perm, seed).update_batch`` on the same shingle hashes.

Where we deviate and why:

- Signatures are computed for many rows at once with numpy instead of one ``MinHash`` object per
  row (same numbers, much faster); shingles are hashed with a polynomial window hash over cached
  token ids instead of SHA-1 per shingle.
- Candidate pairs from every band bucket are joined into *global* connected components
  (union-find over the whole table), so a cluster never depends on batch boundaries. Within a
  bucket every pair is a candidate (pairs at most 64 apart plus a star for huge buckets, so
  edges stay linear in the number of rows).
- With ``verify="exact"`` (default) a candidate edge is kept only if the *exact* Jaccard of the
  two rows' shingle-hash sets reaches ``threshold`` (the signature estimate has a standard error of
  about ``sqrt(J(1-J)/num_perm)``, 0.035 at J=0.8 with 128 permutations, which wrongly splits or
  chains clusters near the threshold). Because false positives are then removed exactly, the
  bands/rows are chosen for recall (a pair at the threshold is a candidate with probability
  >= 0.99) rather than datasketch's balanced false-positive/false-negative optimum. This is the
  verification step of Lee et al. (2022) / text-dedup's ``--verify``; datatrove does not verify.
- Shingle hashes are 32-bit, so "exact" is exact up to hash collisions (about n^2 / 2^33 per pair
  of n-shingle rows).
- Short, templated rows (e.g. LLaMA-Factory ``identity.json``, 91 rows that differ by a few words
  around ``{{name}}``) defeat word 5-grams over whole rows: the changed words touch most 5-grams
  of a short row, so only 1 of 91 rows is caught at 0.7. For short rows use ``field="response"``
  with ``shingle="char"`` and ``ngram=5`` (catches 11 there), or smaller word n-grams. A text with
  fewer units than ``ngram`` is one shingle of all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from curate._lazy import require
from curate.curation._common import (
    TokenHasher,
    _splitmix64,
    cluster_frame,
    components,
    keep_order,
    representatives,
    shingle_units,
    window_hashes,
    write_artifact,
)
from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import TEXT_FIELDS, texts

SHINGLES = ("word", "char")
_EMPTY = np.uint32(0xFFFFFFFF)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 32-bit finaliser (the pre-mix datasketch applies in its affine32 scheme)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters ``(a, b)`` for ``num_perm`` and ``seed``."""
    datasketch = require("datasketch", "MinHash signatures")
    a, b = datasketch.MinHash(num_perm=num_perm, seed=seed).permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def signatures_from_hashes(hashes: Sequence[np.ndarray], a: np.ndarray, b: np.ndarray, *, chunk: int = 1 << 13) -> np.ndarray:
    """MinHash signatures (n, num_perm) uint32 of rows given as arrays of 32-bit shingle hashes.

    Rows without shingles get all-``0xFFFFFFFF`` signatures (datasketch's empty value).
    """
    n, p = len(hashes), len(a)
    sig = np.full((n, p), _EMPTY, dtype=np.uint32)
    i = 0
    while i < n:
        j, total = i, 0
        while j < n and (total == 0 or total + len(hashes[j]) <= chunk):
            total += len(hashes[j])
            j += 1
        lens = np.fromiter((len(h) for h in hashes[i:j]), dtype=np.int64, count=j - i)
        nz = np.nonzero(lens)[0]
        if len(nz):
            flat = np.concatenate([hashes[i + k] for k in nz]).astype(np.uint32)
            with np.errstate(over="ignore"):  # chunks of ~8k shingles keep (chunk, num_perm) in cache
                phv = _fmix32(flat)[:, None] * a[None, :]
                phv += b[None, :]
            starts = np.concatenate([[0], np.cumsum(lens[nz])[:-1]])
            sig[i + nz] = np.minimum.reduceat(phv, starts, axis=0)
        i = j
    return sig


def _batch_shingles(docs: Sequence[str], shingle: str, ngram: int, hasher: TokenHasher) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of a batch as one flat uint32 array plus per-document counts.

    Windows are hashed over the concatenation of all documents' units at once and windows that
    cross a document boundary are dropped, so the result equals :func:`shingle_hashes` per
    document (up to repeats, which do not change a minimum).
    """
    units = [shingle_units(d, shingle, hasher) for d in docs]
    lens = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
    short = np.nonzero((lens > 0) & (lens < ngram))[0]
    if len(units) == 0 or lens.sum() == 0:
        return np.empty(0, dtype=np.uint32), np.zeros(len(units), dtype=np.int64)
    flat = np.concatenate(units)
    win = window_hashes(flat, ngram) if len(flat) >= ngram else np.empty(0, dtype=np.uint64)
    ends = np.cumsum(lens)
    starts = ends - lens
    counts = np.maximum(lens - ngram + 1, 0)
    keep = np.zeros(len(win), dtype=bool)
    idx = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    keep[idx] = True
    parts = [(win[keep] >> np.uint64(32)).astype(np.uint32)]
    if len(short):  # a document shorter than ngram is one shingle of all its units
        extra = np.array([shingle_hashes_from_units(units[i]) for i in short], dtype=np.uint32)
        counts = counts.copy()
        counts[short] = 1
        # place each short document's single shingle at its position in document order
        pos = np.cumsum(counts) - counts
        out = np.empty(int(counts.sum()), dtype=np.uint32)
        mask = np.ones(len(out), dtype=bool)
        mask[pos[short]] = False
        out[mask] = parts[0]
        out[pos[short]] = extra
        return out, counts
    return parts[0], counts


def shingle_hashes_from_units(units: np.ndarray) -> int:
    """The single shingle hash of a document shorter than ``ngram`` units."""
    return int(window_hashes(units, len(units))[0] >> np.uint64(32))


def signatures_from_flat(flat: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray,
                         *, chunk: int = 1 << 13) -> np.ndarray:
    """Signatures of documents whose shingle hashes are ``flat`` split by ``counts``."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return signatures_from_hashes([flat[offsets[i] : offsets[i + 1]] for i in range(len(counts))], a, b, chunk=chunk)


def minhash_signatures(
    docs: Sequence[str], *, shingle: str = "word", ngram: int = 5, num_perm: int = 128, seed: int = 1,
    batch_size: int = 1024,
) -> np.ndarray:
    """MinHash signatures of ``docs`` (n, num_perm) uint32. Independent of ``batch_size``."""
    a, b = permutations(num_perm, seed)
    hasher = TokenHasher()
    out = []
    for start in range(0, len(docs), batch_size):
        flat, counts = _batch_shingles(docs[start : start + batch_size], shingle, ngram, hasher)
        out.append(signatures_from_flat(flat, counts, a, b))
    return np.concatenate(out) if out else np.empty((0, num_perm), dtype=np.uint32)


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


def lsh_clusters(
    sig: np.ndarray, rank: np.ndarray, *, threshold: float, bands: int, rows: int, verify: str = "exact",
    shingles: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Global clusters from LSH buckets: (representative row of each row, estimated Jaccard to it).

    Candidate links are kept when their exact Jaccard (``verify="exact"``, needs ``shingles`` =
    ``(flat, offsets)`` of distinct shingle hashes per row), their signature-estimated Jaccard
    (``"signature"``) reaches ``threshold``, or always (``"none"``). Components are built over the
    kept links, so they do not depend on ``rank``; ``rank`` only picks each component's
    representative.
    """
    n = sig.shape[0]
    src, dst = lsh_candidates(sig, bands=bands, rows=rows)
    if verify != "none" and len(src):
        if verify == "exact":
            if shingles is None:
                raise ValueError("verify='exact' needs the rows' shingle hashes")
            ok = exact_jaccard_pairs(shingles[0], shingles[1], src, dst) >= threshold
        else:
            ok = np.empty(len(src), dtype=bool)
            for s in range(0, len(src), 1 << 16):
                sl = slice(s, s + (1 << 16))
                ok[sl] = (sig[src[sl]] == sig[dst[sl]]).mean(axis=1) >= threshold
        src, dst = src[ok], dst[ok]
    labels = components(n, src, dst)
    rep = representatives(labels, rank)
    sim = (sig == sig[rep]).mean(axis=1) if n else np.empty(0)
    return rep, sim.astype(np.float64)


@dataclass(frozen=True)
class SignatureConfig:
    """What a signature shard needs (plain, picklable: it travels to Ray workers)."""

    shingle: str = "word"
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    batch_size: int = 1024


def signature_shard(payload: tuple[Sequence[str], SignatureConfig]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signatures and distinct shingle hashes of one shard of documents (the sharded work).

    Returns ``(sig (n, num_perm) uint32, flat uint32, counts int64)`` where row ``i``'s distinct
    shingle hashes are the ``counts[i]`` values of ``flat`` after the previous rows'. Results
    depend only on each document, so any sharding gives the same rows.
    """
    docs, cfg = payload
    a, b = permutations(cfg.num_perm, cfg.seed)
    hasher = TokenHasher()
    sigs, flats, counts = [], [], []
    for start in range(0, len(docs), cfg.batch_size):
        part = docs[start : start + cfg.batch_size]
        flat, cnt = _batch_shingles(part, cfg.shingle, cfg.ngram, hasher)
        row = np.repeat(np.arange(len(part), dtype=np.uint64), cnt)
        uniq = np.unique((row << np.uint64(32)) | flat.astype(np.uint64))
        cnt = np.bincount((uniq >> np.uint64(32)).astype(np.int64), minlength=len(part)).astype(np.int64)
        flat = (uniq & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        sigs.append(signatures_from_flat(flat, cnt, a, b))
        flats.append(flat)
        counts.append(cnt)
    if not sigs:
        return np.empty((0, cfg.num_perm), dtype=np.uint32), np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.int64)
    return np.concatenate(sigs), np.concatenate(flats), np.concatenate(counts)


def _merge_shards(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_perm: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        return np.empty((0, num_perm), dtype=np.uint32), np.empty(0, dtype=np.uint32), np.zeros(1, dtype=np.int64)
    sig = np.concatenate([p[0] for p in parts])
    flat = np.concatenate([p[1] for p in parts])
    counts = np.concatenate([p[2] for p in parts])
    return sig, flat, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def choose_bands(threshold: float, num_perm: int, verify: str, bands: int | None = None,
                 rows: int | None = None) -> tuple[int, int]:
    """The (bands, rows) used: given ones, else :func:`recall_bands` when verifying exactly, else
    datasketch's balanced choice (:func:`lsh_params`)."""
    if bands is not None and rows is not None:
        return bands, rows
    return recall_bands(threshold, num_perm) if verify == "exact" else lsh_params(threshold, num_perm)


def minhash_duplicates(
    table: pl.DataFrame,
    *,
    field: str = "prompt+response",
    shingle: str = "word",
    ngram: int = 5,
    num_perm: int = 128,
    threshold: float = 0.8,
    seed: int = 1,
    verify: str | bool = "exact",
    bands: int | None = None,
    rows: int | None = None,
    batch_size: int = 1024,
    shard_size: int = 20_000,
    ctx: StepContext | None = None,
) -> pl.DataFrame:
    """Near-duplicate clusters of ``table`` by MinHash-LSH on ``field`` shingles.

    Returns one row per input row: ``uid, keep, reason, score, cluster_id, dup_of, cluster_size``
    where ``score`` is the signature-estimated Jaccard to the kept representative and
    ``cluster_id`` the representative's uid. Same inputs and seed give the same output for any row
    order, ``batch_size``, ``shard_size`` and executor. With ``ctx`` the signatures are computed
    through ``ctx.map_shards`` (local or Ray executor, per-shard resume); the LSH union-find runs
    once here.
    """
    verify = _verify_mode(verify, "minhash_duplicates")
    _check(field, shingle, ngram, num_perm, threshold, "minhash_duplicates")
    b, r = choose_bands(threshold, num_perm, verify, bands, rows)
    _check_bands(b, r, num_perm, "minhash_duplicates")
    cfg = SignatureConfig(shingle=shingle, ngram=ngram, num_perm=num_perm, seed=seed, batch_size=batch_size)
    if ctx is not None:
        params = {"work": "minhash_signatures", "v": 2, "field": field, "shingle": shingle, "ngram": ngram,
                  "num_perm": num_perm, "seed": seed}
        parts = ctx.map_shards(signature_shard, table, params=params, shard_size=shard_size,
                               payload=functools.partial(_signature_payload, field=field, cfg=cfg),
                               desc="minhash signatures")
    else:
        docs = texts(table, field)
        parts = [signature_shard((docs[i : i + shard_size], cfg)) for i in range(0, len(docs), shard_size)]
    sig, flat, offsets = _merge_shards(parts, num_perm)
    rep, sim = lsh_clusters(sig, keep_order(table), threshold=threshold, bands=b, rows=r, verify=verify,
                            shingles=(flat, offsets))
    return cluster_frame(table, rep, sim, "minhash_dedup", f"near-duplicate ({shingle} {ngram}-grams of {field})")


def _signature_payload(shard: pl.DataFrame, *, field: str, cfg: SignatureConfig) -> tuple[list[str], SignatureConfig]:
    return texts(shard, field), cfg


VERIFY = ("exact", "signature", "none")


def _verify_mode(verify: str | bool, owner: str) -> str:
    if verify is True:
        return "exact"
    if verify is False:
        return "none"
    if verify not in VERIFY:
        raise param_error(owner, "verify", f"one of {VERIFY} (or true/false)", verify)
    return str(verify)


def _check_bands(bands: int | None, rows: int | None, num_perm: int, owner: str) -> None:
    for name, v in (("bands", bands), ("rows", rows)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise param_error(owner, name, "an integer >= 1 or null", v)
    if (bands is None) != (rows is None):
        raise param_error(owner, "bands", "given together with rows (or both null)", bands)
    if bands is not None and rows is not None and bands * rows > num_perm:
        raise param_error(owner, "bands", f"such that bands * rows <= num_perm ({num_perm})", bands)


def _check(field: str, shingle: str, ngram: int, num_perm: int, threshold: float, owner: str) -> None:
    if field not in TEXT_FIELDS:
        raise param_error(owner, "field", f"one of {TEXT_FIELDS}", field)
    if shingle not in SHINGLES:
        raise param_error(owner, "shingle", f"one of {SHINGLES}", shingle)
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise param_error(owner, "ngram", "an integer >= 1", ngram)
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 2:
        raise param_error(owner, "num_perm", "an integer >= 2", num_perm)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise param_error(owner, "threshold", "in (0, 1]", threshold)


@register_step("minhash_dedup")
@dataclass(frozen=True, kw_only=True)
class MinHashDedup:
    """Drop near-duplicates found by MinHash-LSH (global clusters; the earliest row of each is kept).

    Signatures are computed per shard through ``ctx.map_shards`` (local or Ray executor, resumable
    per shard); the LSH buckets, exact verification and union-find run once on the driver.

    Parameters:
        field: text compared (``prompt+response`` default; ``response`` suits short templated rows).
        shingle: ``word`` (normalised word n-grams, default) or ``char`` (character n-grams).
        ngram: shingle length (default 5).
        num_perm: signature length (default 128).
        threshold: Jaccard threshold in (0, 1] (default 0.8).
        seed: permutation seed (default: the recipe seed).
        verify: how a candidate link is checked before the union: ``exact`` (exact Jaccard of the
            two rows' shingle-hash sets, default), ``signature`` (estimated Jaccard) or ``none``.
        bands / rows: LSH banding (both or neither; default: chosen for ``threshold`` — recall 0.99
            at the threshold when ``verify="exact"``, datasketch's balanced choice otherwise).
        batch_size: rows hashed per numpy batch (does not change results).
        shard_size: rows per executor shard (does not change results).
    """

    field: str = "prompt+response"
    shingle: str = "word"
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    seed: int | None = None
    verify: str | bool = "exact"
    bands: int | None = None
    rows: int | None = None
    batch_size: int = 1024
    shard_size: int = 20_000

    def __post_init__(self) -> None:
        owner = "MinHashDedup"
        _check(self.field, self.shingle, self.ngram, self.num_perm, self.threshold, owner)
        object.__setattr__(self, "verify", _verify_mode(self.verify, owner))
        _check_bands(self.bands, self.rows, self.num_perm, owner)
        for name in ("batch_size", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise param_error(owner, name, "an integer >= 1", v)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise param_error(owner, "seed", "an integer or null", self.seed)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        seed = ctx.seed if self.seed is None else self.seed
        out = minhash_duplicates(table, field=self.field, shingle=self.shingle, ngram=self.ngram,
                                 num_perm=self.num_perm, threshold=self.threshold, seed=seed, verify=self.verify,
                                 bands=self.bands, rows=self.rows, batch_size=self.batch_size,
                                 shard_size=self.shard_size, ctx=ctx)
        clusters = out.filter(pl.col("cluster_size") > 1).select(
            "uid", "cluster_id", pl.col("keep").alias("kept"), pl.col("score").alias("similarity"), "cluster_size")
        write_artifact(clusters, ctx.step_dir, "clusters.parquet")
        ctx.stats["minhash_dedup"] = {
            "n_clusters": int(clusters["cluster_id"].n_unique()) if clusters.height else 0,
            "n_duplicates": int((~out["keep"]).sum()),
            "bands_rows": list(choose_bands(self.threshold, self.num_perm, str(self.verify), self.bands, self.rows)),
        }
        return out
