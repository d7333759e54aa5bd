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
- **Two passes, so one-word edits of short rows are caught.** Word 5-grams at 0.8 need about 50
  words before one changed word leaves the pair above the threshold: a substitution removes up to
  5 of the row's ``L - 4`` 5-grams and adds 5, so ``J = (L - 9) / (L + 1)`` (0.52 at 20 words,
  0.09 at 10). Half of Alpaca's rows (prompt + response) have fewer than 47 words. Pass 2 therefore
  also compares rows of at most ``short_words`` (64) word tokens on word ``short_ngram``-grams (2)
  at ``short_threshold`` (0.5): a substitution changes at most 2 bigrams on each side, so
  ``J >= (L - 3) / (L + 1)`` for ``L`` distinct words (0.64 at 10 words, 0.81 at 20). Bigrams and
  not single words, because a word-shuffled row has the same bag of words (bag-of-words Jaccard
  1.0) but shares few bigrams. Long rows never enter pass 2, so their merges are exactly pass 1's:
  no false merges are added where word 5-grams already work. Both passes are verified exactly,
  and a cluster is a connected component of the union of their links.
  Measured on ``benchmarks/bench_dedup_quality.py`` (10^4 rows of real data with planted edits,
  row-level F1 against the planted copies): one pass 0.870 (recall 0.58 on short copies);
  ``short_words`` 32 / 64 / 100 at bigrams 0.5: 0.947 / 0.992 / 0.991 (100 merges 3x more
  same-prompt rows); threshold 0.4 / 0.5 / 0.6: 0.992 / 0.992 / 0.989, with 1.1% / 0.08% / 0% of
  distinct real rows merged; single words at 0.7 merge 54% of the word-shuffled rows (F1 0.921).
  At 5·10^4 rows a bigram Jaccard of 0.5 alone also merges rows that share a long prompt and
  differ in a short answer, so pass 2 also bounds the bigrams the two rows do not share,
  ``|A △ B| <= 2 * short_ngram * short_edits`` (``short_edits=2``: about two edited words): distinct
  real rows merged fell from 0.42% to 0.08%, F1 0.987 to 0.990. A threshold of 0.4 under the same
  bound gained 0.003 F1 but took 6x longer (one fewer row per LSH band: many more candidates).
- Short, templated rows (LLaMA-Factory ``identity.json``, 91 rows that differ by a few words around
  ``{{name}}``): one pass of word 5-grams catches 1 of them even at 0.7; the defaults (0.8 plus pass 2)
  merge 10.
  Fill-ins that change two or more words of a 15-word row stay below 0.5 (recall 0.44 on such
  planted fill-ins); ``field="response"`` with ``shingle="char"`` and ``ngram=5`` compares the
  answers only. A text with fewer units than ``ngram`` is one shingle of all of them. CJK text
  without spaces is one word token per run of characters, so use ``shingle="char"`` for it.
- ``score`` and the cluster table give, for every dropped row, the row it matched (its most similar
  verified link, not necessarily the kept row) and the exact Jaccard of that link, on the
  shingles of the pass that found it, so every merge can be audited.
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
    cluster_frame,
    components,
    keep_order,
    representatives,
    shingle_units,
    window_hashes,
    word_tokens,
    write_artifact,
)
from curate.curation.lsh import (  # noqa: F401 - re-exported: part of this module's public surface
    _EMPTY,
    best_links,
    candidate_probability,
    exact_jaccard_pairs,
    lsh_candidates,
    lsh_params,
    recall_bands,
    verified_links,
)
from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import TEXT_FIELDS, texts

SHINGLES = ("word", "char")


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
    return _units_shingles([shingle_units(d, shingle, hasher) for d in docs], ngram)


def _units_shingles(units: Sequence[np.ndarray], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_batch_shingles` of documents already turned into unit ids."""
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


@dataclass(frozen=True)
class SignatureConfig:
    """What a signature shard needs (plain, picklable: it travels to Ray workers)."""

    shingle: str = "word"
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    batch_size: int = 1024


Shard = tuple[np.ndarray, np.ndarray, np.ndarray]


def _signatures_of_units(units: Sequence[np.ndarray], ngram: int, cfg: SignatureConfig) -> Shard:
    """Signatures and distinct shingle hashes of documents given as unit ids (see :func:`signature_shard`)."""
    a, b = permutations(cfg.num_perm, cfg.seed)
    sigs, flats, counts = [], [], []
    for start in range(0, len(units), cfg.batch_size):
        part = units[start : start + cfg.batch_size]
        flat, cnt = _units_shingles(part, ngram)
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


def signature_shard(payload: tuple[Sequence[str], SignatureConfig]) -> Shard:
    """Signatures and distinct shingle hashes of one shard of documents (the sharded work).

    Returns ``(sig (n, num_perm) uint32, flat uint32, counts int64)`` where row ``i``'s distinct
    shingle hashes are the ``counts[i]`` values of ``flat`` after the previous rows'. Results
    depend only on each document, so any sharding gives the same rows.
    """
    docs, cfg = payload
    hasher = TokenHasher()
    return _signatures_of_units([shingle_units(d, cfg.shingle, hasher) for d in docs], cfg.ngram, cfg)


def two_pass_shard(payload: tuple[Sequence[str], SignatureConfig, int, int]) -> tuple[np.ndarray, ...]:
    """:func:`signature_shard` plus the short-row pass, as one flat tuple of arrays (so the shard
    cache can store it): ``(*main, short_rows, *short)``.

    ``payload = (docs, cfg, short_words, short_ngram)``. ``main`` is :func:`signature_shard`'s
    triple; ``short_rows`` are the shard-local indices of the documents with 1 to ``short_words``
    word tokens; ``short`` is the same triple for them on word ``short_ngram``-grams (same
    permutations). Word tokens are computed once and shared by both passes when the main shingle
    is ``word``.
    """
    docs, cfg, short_words, short_ngram = payload
    hasher = TokenHasher()
    words = [hasher(word_tokens(d)) for d in docs]
    units = words if cfg.shingle == "word" else [shingle_units(d, cfg.shingle, hasher) for d in docs]
    main = _signatures_of_units(units, cfg.ngram, cfg)
    short_rows = np.array([i for i, w in enumerate(words) if 0 < len(w) <= short_words], dtype=np.int64)
    short = _signatures_of_units([words[i] for i in short_rows], short_ngram, cfg)
    return (*main, short_rows, *short)


def _merge_shards(parts: Sequence[Shard], num_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# Defaults of the short-row pass, chosen on benchmarks/bench_dedup_quality.py (see the module docstring).
SHORT_WORDS = 64
SHORT_NGRAM = 2
SHORT_THRESHOLD = 0.5
SHORT_EDITS = 2


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
    short_words: int = SHORT_WORDS,
    short_ngram: int = SHORT_NGRAM,
    short_threshold: float = SHORT_THRESHOLD,
    short_edits: int | None = SHORT_EDITS,
    batch_size: int = 1024,
    shard_size: int = 20_000,
    ctx: StepContext | None = None,
) -> pl.DataFrame:
    """Near-duplicate clusters of ``table`` by MinHash-LSH on ``field`` shingles, in two passes.

    Pass 1 links any two rows whose ``shingle`` ``ngram``-gram sets reach Jaccard ``threshold``.
    Pass 2 links two rows of at most ``short_words`` word tokens each whose word
    ``short_ngram``-gram sets ``A``, ``B`` reach ``short_threshold`` and differ in at most
    ``2 * short_ngram * short_edits`` n-grams (``|A △ B|``: one edited word changes at most
    ``short_ngram`` n-grams on each side; ``None``: no such bound). ``short_words=0`` turns pass 2
    off. Clusters are the connected components of both passes' verified links.

    Returns one row per input row: ``uid, keep, reason, score, cluster_id, dup_of, cluster_size,
    matched, measure``. ``cluster_id`` / ``dup_of`` are the kept representative's uid; ``matched``
    is the uid of the row's most similar verified link (ties: the row kept first), ``score`` that
    link's similarity (exact Jaccard with ``verify="exact"``; 1.0 for rows without links) and
    ``measure`` the shingles it was measured on. Same inputs and seed give the same output for any
    row order, ``batch_size``, ``shard_size`` and executor. With ``ctx`` the signatures are
    computed through ``ctx.map_shards`` (local or Ray executor, per-shard resume); LSH,
    verification and the union-find run once here.
    """
    verify = _verify_mode(verify, "minhash_duplicates")
    _check(field, shingle, ngram, num_perm, threshold, "minhash_duplicates")
    _check_short(short_words, short_ngram, short_threshold, short_edits, "minhash_duplicates")
    b, r = choose_bands(threshold, num_perm, verify, bands, rows)
    _check_bands(b, r, num_perm, "minhash_duplicates")
    cfg = SignatureConfig(shingle=shingle, ngram=ngram, num_perm=num_perm, seed=seed, batch_size=batch_size)
    if ctx is not None:
        params = {"work": "minhash_signatures", "v": 3, "field": field, "shingle": shingle, "ngram": ngram,
                  "num_perm": num_perm, "seed": seed, "short_words": short_words, "short_ngram": short_ngram}
        parts = ctx.map_shards(two_pass_shard, table, params=params, shard_size=shard_size,
                               payload=functools.partial(_signature_payload, field=field, cfg=cfg,
                                                         short=(short_words, short_ngram)),
                               desc="minhash signatures")
    else:
        docs = texts(table, field)
        parts = [two_pass_shard((docs[i : i + shard_size], cfg, short_words, short_ngram))
                 for i in range(0, len(docs), shard_size)]
    n = table.height
    sig, flat, offsets = _merge_shards([p[:3] for p in parts], num_perm)
    src, dst, sim = verified_links(sig, threshold=threshold, bands=b, rows=r, verify=verify, shingles=(flat, offsets))
    tags = [np.zeros(len(src), dtype=np.int64)]
    measures = [f"{shingle} {ngram}-grams"]
    if short_words:
        shift = np.cumsum([0] + [len(p[0]) for p in parts[:-1]]).astype(np.int64)
        short_rows = np.concatenate([p[3] + s for p, s in zip(parts, shift)]) if parts else np.empty(0, np.int64)
        sig2, flat2, offsets2 = _merge_shards([p[4:] for p in parts], num_perm)
        b2, r2 = choose_bands(short_threshold, num_perm, verify)
        s2, d2, sim2 = verified_links(sig2, threshold=short_threshold, bands=b2, rows=r2, verify=verify,
                                      shingles=(flat2, offsets2))
        if short_edits is not None:
            # |A △ B| from J and the set sizes: |A ∩ B| = J (|A| + |B|) / (1 + J).
            size = np.diff(offsets2)
            tot = size[s2] + size[d2]
            diff = tot - 2.0 * sim2 * tot / (1.0 + sim2)
            ok = diff <= 2 * short_ngram * short_edits + 1e-6
            s2, d2, sim2 = s2[ok], d2[ok], sim2[ok]
        src, dst = np.concatenate([src, short_rows[s2]]), np.concatenate([dst, short_rows[d2]])
        sim = np.concatenate([sim, sim2])
        tags.append(np.ones(len(s2), dtype=np.int64))
        measures.append(f"word {short_ngram}-grams, rows of <= {short_words} words")
    rank = keep_order(table)
    rep = representatives(components(n, src, dst), rank)
    matched, best, tag = best_links(n, src, dst, sim, rank, np.concatenate(tags))
    kept = rep == np.arange(n)
    best[kept | (matched < 0)] = 1.0
    out = cluster_frame(table, rep, best, "minhash_dedup", f"near-duplicate ({shingle} {ngram}-grams of {field})")
    uids = out["uid"].to_list()
    m_uid = [None if k or m < 0 else uids[m] for k, m in zip(kept.tolist(), matched.tolist())]
    measure = [None if u is None else measures[t] for u, t in zip(m_uid, tag.tolist())]
    reasons = ["" if u is None else f"minhash_dedup: near-duplicate of {d} ({field}): matched {u}, Jaccard {s:.3f}"
               f" on {m}" for u, d, s, m in zip(m_uid, out["dup_of"].to_list(), best.tolist(), measure)]
    # A dropped row always has a link (its component has more than one row); kept rows have none shown.
    return out.with_columns(pl.Series("reason", reasons, dtype=pl.Utf8), pl.Series("matched", m_uid, dtype=pl.Utf8),
                            pl.Series("measure", measure, dtype=pl.Utf8))


def _signature_payload(shard: pl.DataFrame, *, field: str, cfg: SignatureConfig, short: tuple[int, int]
                       ) -> tuple[list[str], SignatureConfig, int, int]:
    return texts(shard, field), cfg, short[0], short[1]


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


def _is_int(v: object, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= lo


def _is_fraction(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 < v <= 1.0


def _check(field: str, shingle: str, ngram: int, num_perm: int, threshold: float, owner: str) -> None:
    if field not in TEXT_FIELDS:
        raise param_error(owner, "field", f"one of {TEXT_FIELDS}", field)
    if shingle not in SHINGLES:
        raise param_error(owner, "shingle", f"one of {SHINGLES}", shingle)
    if not _is_int(ngram, 1):
        raise param_error(owner, "ngram", "an integer >= 1", ngram)
    if not _is_int(num_perm, 2):
        raise param_error(owner, "num_perm", "an integer >= 2", num_perm)
    if not _is_fraction(threshold):
        raise param_error(owner, "threshold", "in (0, 1]", threshold)


def _check_short(short_words: int, short_ngram: int, short_threshold: float, short_edits: int | None,
                 owner: str) -> None:
    if not _is_int(short_words, 0):
        raise param_error(owner, "short_words", "an integer >= 0 (0 turns the short-row pass off)", short_words)
    if not _is_int(short_ngram, 1):
        raise param_error(owner, "short_ngram", "an integer >= 1", short_ngram)
    if not _is_fraction(short_threshold):
        raise param_error(owner, "short_threshold", "in (0, 1]", short_threshold)
    if short_edits is not None and not _is_int(short_edits, 0):
        raise param_error(owner, "short_edits", "an integer >= 0 or null", short_edits)


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
        short_words: rows of at most this many word tokens also go through the short-row pass
            (default 64; 0 turns it off).
        short_ngram: word n-gram length of the short-row pass (default 2).
        short_threshold: Jaccard threshold of the short-row pass (default 0.5).
        short_edits: the short-row pass also needs ``|A △ B| <= 2 * short_ngram * short_edits``
            (about that many edited words; default 2; null: no bound).
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
    short_words: int = SHORT_WORDS
    short_ngram: int = SHORT_NGRAM
    short_threshold: float = SHORT_THRESHOLD
    short_edits: int | None = SHORT_EDITS
    batch_size: int = 1024
    shard_size: int = 20_000

    def __post_init__(self) -> None:
        owner = "MinHashDedup"
        _check(self.field, self.shingle, self.ngram, self.num_perm, self.threshold, owner)
        object.__setattr__(self, "verify", _verify_mode(self.verify, owner))
        _check_bands(self.bands, self.rows, self.num_perm, owner)
        _check_short(self.short_words, self.short_ngram, self.short_threshold, self.short_edits, owner)
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
                                 bands=self.bands, rows=self.rows, short_words=self.short_words,
                                 short_ngram=self.short_ngram, short_threshold=self.short_threshold,
                                 short_edits=self.short_edits, batch_size=self.batch_size,
                                 shard_size=self.shard_size, ctx=ctx)
        clusters = out.filter(pl.col("cluster_size") > 1).select(
            "uid", "cluster_id", pl.col("keep").alias("kept"), "matched", pl.col("score").alias("similarity"),
            "measure", "cluster_size")
        write_artifact(clusters, ctx.step_dir, "clusters.parquet")
        ctx.stats["minhash_dedup"] = {
            "n_clusters": int(clusters["cluster_id"].n_unique()) if clusters.height else 0,
            "n_duplicates": int((~out["keep"]).sum()),
            "bands_rows": list(choose_bands(self.threshold, self.num_perm, str(self.verify), self.bands, self.rows)),
            "by_measure": {str(k): int(v) for k, v in out.filter(~pl.col("keep"))["measure"].value_counts(sort=True)
                           .sort("measure").iter_rows()},
        }
        return out
