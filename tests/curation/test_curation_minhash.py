"""MinHash-LSH dedup: datasketch-equal signatures, planted Jaccard pairs vs exact Jaccard,
row-order / batch-size invariance, the identity.json short-row numbers, parameter errors."""

from __future__ import annotations

import itertools
import random

import numpy as np
import polars as pl
import pytest

from curate.curation import MinHashDedup, minhash_duplicates, minhash_signatures
from curate.curation._common import jaccard, shingle_hashes, shingle_strings
from curate.errors import ParameterError
from curate.io import read_sources
from curate.pipeline.step import StepContext
from curate.schema import make_record, message, texts, to_frame


def _sft(prompt: str, response: str, **kw) -> dict:
    return make_record("sft", messages=[message("user", prompt), message("assistant", response)], **kw)


def _planted(seed: int = 0) -> tuple[pl.DataFrame, list[tuple[int, int, float]]]:
    """Pairs of distinct-word documents built at exact word-1-gram Jaccard 0.9 and 0.3, plus singletons."""
    rng = random.Random(seed)
    vocab = iter(f"w{i}" for i in rng.sample(range(10**6), 30000))
    rows, pairs = [], []
    for target, (shared, own) in [(0.9, (180, 10)), (0.3, (60, 70))] * 10:
        s = [next(vocab) for _ in range(shared)]
        a = s + [next(vocab) for _ in range(own)]
        b = s + [next(vocab) for _ in range(own)]
        rng.shuffle(a)
        rng.shuffle(b)
        pairs.append((len(rows), len(rows) + 1, target))
        rows += [" ".join(a), " ".join(b)]
    for _ in range(20):
        rows.append(" ".join(next(vocab) for _ in range(150)))
    return to_frame([_sft(f"q{i}", r) for i, r in enumerate(rows)]), pairs


def test_signatures_equal_datasketch():
    datasketch = pytest.importorskip("datasketch")
    docs = ["the quick brown fox jumps over the lazy dog and again", "short", "", "one two three four five six"]
    sig = minhash_signatures(docs, num_perm=64, seed=7, batch_size=3)
    for doc, s in zip(docs, sig):
        m = datasketch.MinHash(num_perm=64, seed=7, hashfunc=lambda x: x)
        m.update_batch(shingle_hashes(doc).tolist())
        assert np.array_equal(m.hashvalues, s)


def test_shingle_hashes_match_shingle_strings():
    for text in ["A b  c d e f g h", "tiny", "Das ist ein Test, ein Test mit Wörtern und Wörtern."]:
        for shingle, n in [("word", 5), ("word", 2), ("char", 5)]:
            assert len(shingle_hashes(text, shingle=shingle, ngram=n)) == len(shingle_strings(text, shingle=shingle, ngram=n))


def test_planted_pairs_against_exact_jaccard():
    table, pairs = _planted()
    docs = texts(table, "response")
    sets = [shingle_strings(d, ngram=1) for d in docs]
    for i, j, target in pairs:  # the construction is what we claim
        assert jaccard(sets[i], sets[j]) == pytest.approx(target)
    out = minhash_duplicates(table, field="response", ngram=1, threshold=0.7, num_perm=128, seed=3)
    cid = out["cluster_id"].to_list()
    found = {(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if cid[i] == cid[j]}
    truth = {(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if jaccard(sets[i], sets[j]) >= 0.7}
    assert truth == {(i, j) for i, j, t in pairs if t == 0.9}
    assert found == truth  # F1 = 1 on this planted set
    score = out["score"].to_numpy()
    for i, j, t in pairs:
        if t == 0.9:
            dropped = j if cid[j] == out["uid"][i] else i
            assert abs(score[dropped] - 0.9) < 0.1  # estimated Jaccard to the kept representative
    assert (~out["keep"]).sum() == 10
    assert out.filter(~pl.col("keep"))["reason"].str.contains("near-duplicate").all()


def test_row_order_and_batch_size_invariance():
    table, _ = _planted(seed=1)
    ref = minhash_duplicates(table, field="response", ngram=1, threshold=0.7, seed=5, batch_size=1024).sort("uid")
    perm = table.sample(fraction=1.0, shuffle=True, seed=11)
    for t, bs in [(perm, 1), (perm, 7), (table.reverse(), 64)]:
        out = minhash_duplicates(t, field="response", ngram=1, threshold=0.7, seed=5, batch_size=bs).sort("uid")
        assert out.equals(ref)


def test_keep_rule_prefers_earliest_source_line():
    rows = [_sft("same question here", "same answer with several words in it", source="a.jsonl", source_line=k)
            for k in (3, 1, 2)]
    for k, r in enumerate(rows):  # make uids distinct but content near-identical
        r["messages"][1]["content"] += "!" * k
        r["uid"] = f"{k:032x}"
    out = minhash_duplicates(to_frame(rows), field="prompt", threshold=0.9)
    kept = out.filter(pl.col("keep"))["uid"].to_list()
    assert kept == [f"{1:032x}"]  # source_line 1
    assert set(out["dup_of"].drop_nulls()) == {f"{1:032x}"}


def _exact_components(sets: list[set[str]], threshold: float) -> list[int]:
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(sets)), 2):
        if jaccard(sets[i], sets[j]) >= threshold:
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(sets))]


def _refines(fine: list, coarse: list) -> bool:
    """Every group of ``fine`` lies inside one group of ``coarse``."""
    seen: dict = {}
    return all(seen.setdefault(f, c) == c for f, c in zip(fine, coarse))


def test_identity_short_rows(data_dir):
    table = read_sources(data_dir / "llama-factory" / "identity.json").table
    assert table.height == 91
    for field, shingle, measured in [("prompt+response", "word", 1), ("response", "char", 11)]:
        sets = [shingle_strings(t, shingle=shingle, ngram=5) for t in texts(table, field)]
        exact = _exact_components(sets, 0.7)
        assert len(exact) - len(set(exact)) == measured  # the issue's measured numbers (exact Jaccard)
        out = minhash_duplicates(table, field=field, shingle=shingle, ngram=5, threshold=0.7, num_perm=256, seed=2,
                                 short_words=0)  # the one-pass rule these numbers describe
        got = out["cluster_id"].to_list()
        # MinHash sits between exact clusters at 0.8 and at 0.6 (pairs at 0.6875 are borderline).
        assert _refines(_exact_components(sets, 0.8), got)
        assert _refines(got, _exact_components(sets, 0.6))


def test_step_writes_cluster_table(tmp_path):
    table, _ = _planted(seed=2)
    step = MinHashDedup(field="response", ngram=1, threshold=0.7)
    ctx = StepContext(seed=0, step_dir=tmp_path)
    out = step.apply(table, ctx)
    clusters = pl.read_parquet(tmp_path / "clusters.parquet")
    assert set(clusters.columns) == {"uid", "cluster_id", "kept", "matched", "similarity", "measure", "cluster_size"}
    dropped = clusters.filter(~pl.col("kept"))
    assert dropped["matched"].is_not_null().all() and (dropped["similarity"] >= 0.7).all()
    assert clusters.height == 20 and clusters["kept"].sum() == 10
    assert ctx.stats["minhash_dedup"]["n_duplicates"] == int((~out["keep"]).sum()) == 10


@pytest.mark.parametrize("bad", [{"threshold": 0.0}, {"threshold": 1.5}, {"ngram": 0}, {"shingle": "byte"},
                                 {"num_perm": 1}, {"field": "nope"}, {"short_words": -1}, {"short_ngram": 0},
                                 {"short_threshold": 0.0}, {"short_words": True}, {"short_edits": -1}])
def test_bad_parameters(bad):
    with pytest.raises(ParameterError, match="MinHashDedup"):
        MinHashDedup(**bad)


def _short_long_pool(seed: int = 0) -> tuple[pl.DataFrame, list[tuple[int, int]], list[tuple[int, int]]]:
    """Short rows (8-30 words) with one-word edited copies, their word-shuffled variants, and long
    rows (110 words) in pairs that share an 80-word passage but not their 30-word endings.

    Returns the table, the planted duplicate pairs and the planted non-duplicate pairs.
    """
    rng = random.Random(seed)
    vocab = iter(f"w{i}" for i in rng.sample(range(10**6), 20000))
    rows: list[str] = []
    dups, nondups = [], []
    for k in range(40):
        words = [next(vocab) for _ in range(8 + k % 23)]
        edit = words.copy()
        i = len(words) // 2 - rng.randrange(2)  # mid-row: an edit there touches the most 5-grams
        if k % 3 == 0:
            edit[i] = next(vocab)  # substitution
        elif k % 3 == 1:
            edit.insert(i, next(vocab))  # insertion
        else:
            del edit[i]  # deletion
        shuffled = words.copy()
        while shuffled == words:
            rng.shuffle(shuffled)
        base = len(rows)
        rows += [" ".join(words), " ".join(edit), " ".join(shuffled)]
        dups.append((base, base + 1))
        nondups += [(base, base + 2), (base + 1, base + 2)]
    for _ in range(15):
        shared = [next(vocab) for _ in range(80)]
        base = len(rows)
        rows += [" ".join(shared + [next(vocab) for _ in range(30)]) for _ in range(2)]
        nondups.append((base, base + 1))
    table = to_frame([_sft("", r, source="pool.jsonl", source_line=i) for i, r in enumerate(rows)])
    return table, dups, nondups


def test_default_catches_one_word_edits_of_short_rows_not_long_overlaps():
    table, dups, nondups = _short_long_pool()
    docs = texts(table, "response")
    for i, j in dups:  # what makes them hard for word 5-grams: exact word-5 Jaccard well below 0.8
        assert jaccard(shingle_strings(docs[i], ngram=5), shingle_strings(docs[j], ngram=5)) < 0.8
    for i, j in nondups[-15:]:  # long overlaps: word-2 Jaccard above the short pass's threshold
        assert jaccard(shingle_strings(docs[i], ngram=2), shingle_strings(docs[j], ngram=2)) > 0.5

    def found(out: pl.DataFrame, pairs: list[tuple[int, int]]) -> float:
        cid = out["cluster_id"].to_list()
        return sum(cid[i] == cid[j] for i, j in pairs) / len(pairs)

    out = minhash_duplicates(table, field="response", seed=1)
    assert found(out, dups) == 1.0  # short-row recall
    assert found(out, nondups) == 0.0  # shuffled variants and long overlapping rows stay apart
    dropped = out.filter(~pl.col("keep"))
    assert dropped.height == len(dups)
    assert dropped["measure"].str.contains("word 2-grams").all()
    assert dropped["reason"].str.contains("matched").all()
    # The one-pass word-5 rule (the earlier default) misses most of them.
    assert found(minhash_duplicates(table, field="response", seed=1, short_words=0), dups) < 0.5
    # Row order and sharding do not change the clusters.
    perm = minhash_duplicates(table.reverse(), field="response", seed=1, shard_size=7).sort("uid")
    assert perm.equals(out.sort("uid"))
