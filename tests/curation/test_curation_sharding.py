"""MinHash exact verification and sharded execution: exact Jaccard of candidate pairs equals the
set reference, clusters never merge rows the exact graph keeps apart, and the minhash_dedup and
filter steps give identical outputs for any shard size and on Ray."""

from __future__ import annotations

import itertools
import random

import numpy as np
import polars as pl
import pytest

from curate.curation import HeuristicFilter, MinHashDedup, filter_table, minhash_duplicates
from curate.curation._common import jaccard, shingle_strings
from curate.curation.minhash import (
    SignatureConfig,
    candidate_probability,
    exact_jaccard_pairs,
    recall_bands,
    signature_shard,
)
from curate.errors import ParameterError
from curate.io import read_sources
from curate.pipeline.executors import LocalExecutor
from curate.pipeline.step import StepContext
from curate.schema import make_record, message, texts, to_frame


def _pool(data_dir, n_base: int = 250, n_dups: int = 120, seed: int = 0) -> pl.DataFrame:
    """Real Alpaca rows (read_sources) plus copies with ~2% of their words replaced."""
    base = read_sources(data_dir / "alpaca" / "alpaca_5000.json").table.head(n_base)
    rng = random.Random(seed)
    rows = []
    for k in range(n_dups):
        row = base.row(rng.randrange(base.height), named=True)
        words = row["messages"][-1]["content"].split()
        for _ in range(max(1, len(words) // 50)):
            words[rng.randrange(len(words))] = f"edit{rng.randrange(10**6)}"
        rows.append(make_record("sft", messages=[*row["messages"][:-1], message("assistant", " ".join(words))],
                                source="planted", source_line=k + 1))
    return pl.concat([base, to_frame(rows).select(base.columns)], how="vertical")


def _exact_components(sets: list[set[str]], threshold: float) -> list[int]:
    parent = list(range(len(sets)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(len(sets)), 2):
        if sets[i] & sets[j] and jaccard(sets[i], sets[j]) >= threshold:
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(sets))]


def _same_partition(a: list, b: list) -> bool:
    return len(set(a)) == len(set(zip(a, b))) == len(set(b))


def test_exact_jaccard_pairs_equals_set_jaccard():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(40)]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(3, 60))) for _ in range(30)] + [""]
    sig, flat, counts = signature_shard((docs, SignatureConfig(ngram=2, num_perm=16)))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    src, dst = map(np.array, zip(*itertools.combinations(range(len(docs) - 1), 2)))
    got = exact_jaccard_pairs(flat, offsets, src, dst, chunk=97)  # tiny chunks exercise the splitting
    sets = [shingle_strings(d, ngram=2) for d in docs]
    want = [jaccard(sets[i], sets[j]) for i, j in zip(src, dst)]
    np.testing.assert_allclose(got, want)
    assert sig.shape == (len(docs), 16) and counts[-1] == 0


def test_recall_bands_reach_recall_at_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = recall_bands(t, 128)
        assert b * r <= 128 and candidate_probability(t, b, r) >= 0.99
        # one more row per band would fall below the recall target (the choice is the tightest)
        assert r == 128 or candidate_probability(t, 128 // (r + 1), r + 1) < 0.99


def test_exact_verification_matches_exact_components(data_dir):
    table = _pool(data_dir)
    sets = [shingle_strings(t, ngram=5) for t in texts(table, "response")]
    exact = _exact_components(sets, 0.8)
    assert len(exact) - len(set(exact)) > 30  # the planted copies make real clusters
    got = minhash_duplicates(table, field="response", threshold=0.8, seed=1, short_words=0)["cluster_id"].to_list()
    assert _same_partition(got, exact)
    # The signature-verified variant with balanced bands loses some of these (why exact is default).
    sig_only = minhash_duplicates(table, field="response", threshold=0.8, seed=1, verify="signature", short_words=0)
    assert sig_only["cluster_id"].n_unique() >= len(set(exact))


@pytest.mark.parametrize("shard_size", [1, 37, 100_000])
def test_minhash_step_identical_for_any_shard_size(data_dir, tmp_path, shard_size):
    table = _pool(data_dir, n_base=120, n_dups=60)
    ref = minhash_duplicates(table, field="response", threshold=0.8, seed=4)
    step = MinHashDedup(field="response", threshold=0.8, seed=4, shard_size=shard_size, batch_size=16)
    ctx = StepContext(step_dir=tmp_path, executor=LocalExecutor())
    out = step.apply(table, ctx)
    assert out.equals(ref)
    n_shards = -(-table.height // shard_size)
    assert len(list((tmp_path / "shards").glob("*-*"))) == n_shards
    again = step.apply(table, StepContext(step_dir=tmp_path))  # resumes from the cached shards
    assert again.equals(ref)


@pytest.mark.parametrize("shard_size", [1, 5, 10_000])
def test_filter_step_identical_for_any_shard_size(tmp_path, shard_size):
    rows = [("Explain photosynthesis.", "Plants turn light into sugar."), ("Hi", ""),
            ("Write code", "```python\nprint(1)"), ("Tell me", "As an AI language model, I cannot."),
            ("Repeat", "spam " * 60), ("Numbers", "1234 5678 9999 0000 1111 2222")]
    table = to_frame([make_record("sft", messages=[message("user", p), message("assistant", r or " ")])
                      for p, r in rows * 3 + [(f"q{i}", f"answer number {i}.") for i in range(7)]])
    ref = filter_table(table, HeuristicFilter())
    out = HeuristicFilter(shard_size=shard_size).apply(table, StepContext(step_dir=tmp_path))
    assert out.equals(ref)
    assert (~out["keep"]).sum() >= 4 * 3


@pytest.mark.parametrize("bad", [{"verify": "maybe"}, {"bands": 10}, {"bands": 20, "rows": 7},
                                 {"shard_size": 0}, {"rows": 0, "bands": 3}])
def test_bad_sharding_and_banding_parameters(bad):
    with pytest.raises(ParameterError, match="MinHashDedup"):
        MinHashDedup(**bad)
    with pytest.raises(ParameterError, match="HeuristicFilter"):
        HeuristicFilter(shard_size=-1)


@pytest.mark.slow
def test_ray_executor_gives_local_outputs(data_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from curate.pipeline.executors import RayExecutor

    table = _pool(data_dir, n_base=150, n_dups=50)
    step = MinHashDedup(field="response", threshold=0.8, seed=2, shard_size=50)
    filt = HeuristicFilter(shard_size=60)
    local = step.apply(table, StepContext(step_dir=tmp_path / "local"))
    local_f = filt.apply(table, StepContext(step_dir=tmp_path / "local_f"))
    try:
        ex = RayExecutor(num_cpus=2)
        remote = step.apply(table, StepContext(step_dir=tmp_path / "ray", executor=ex))
        remote_f = filt.apply(table, StepContext(step_dir=tmp_path / "ray_f", executor=ex))
    finally:
        ray.shutdown()
    assert remote.equals(local) and remote_f.equals(local_f)
    assert (~local["keep"]).sum() > 10
