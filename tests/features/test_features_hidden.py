"""Causal-LM hidden-state embeddings (curate.features.hidden): RDS+ pooling, caching, step and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from curate.cli import main  # noqa: E402
from curate.errors import ParameterError  # noqa: E402
from curate.features.embed import Embed, embed_table, embed_texts, get_embedder  # noqa: E402
from curate.features.hidden import CausalLMEmbedder, pool_hidden_states  # noqa: E402
from curate.features.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from curate.io.store import FeatureStore  # noqa: E402
from curate.pipeline.step import StepContext  # noqa: E402
from curate.schema import make_record, texts, to_frame  # noqa: E402

# very different token counts (byte tokenizer: one token per byte), a duplicate and an empty text
TEXTS = [
    "hi",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "x",
    "Data selection for instruction tuning, at scale.",
    "",
    "medium sized text here",
    "hi",
]


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tiny_llama(vocab_size=len(tok), layers=2, dtype="float64", seed=3), tok


def _states(model, tok, text: str) -> np.ndarray:
    """Final-layer hidden states (T, H) of ``text`` run alone (no padding) through the full model."""
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0].numpy()


def _reference(model, tok, text: str, pooling: str, max_length: int | None = None) -> np.ndarray:
    """Hand-pooled, unit-norm vector: weights t = 1..T (weighted_mean), 1 (mean), or the last token."""
    if not text:
        return np.zeros(model.config.hidden_size)
    h = _states(model, tok, text)
    if max_length is not None:
        ids = tok(text)["input_ids"][:max_length]
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
    t = np.arange(1, len(h) + 1, dtype=np.float64)
    if pooling == "weighted_mean":
        v = (h * t[:, None]).sum(0) / t.sum()
    elif pooling == "mean":
        v = h.mean(0)
    else:
        v = h[-1]
    return v / np.linalg.norm(v)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@pytest.mark.parametrize("pooling", ["weighted_mean", "mean", "last"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pooled_vectors_match_hand_reference(lm, pooling, padding_side):
    model, _ = lm
    tok = tiny_tokenizer()
    tok.padding_side = padding_side  # the tokenizer's side must not matter
    emb = CausalLMEmbedder((model, tok), pooling=pooling)
    assert emb.dtype == "float64" and emb.dim == model.config.hidden_size
    ref = np.stack([_reference(model, tok, t, pooling) for t in TEXTS])
    raw = emb.encode_raw(TEXTS, batch_size=len(TEXTS))  # one batch: every short text is padded
    assert raw.dtype == np.float64
    np.testing.assert_allclose(_unit(raw), ref, rtol=0, atol=1e-10)
    out = emb.encode(TEXTS, batch_size=len(TEXTS))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    assert not out[TEXTS.index("")].any()  # no tokens: a zero vector


@pytest.mark.parametrize("pooling", ["weighted_mean", "mean", "last"])
def test_pooling_of_left_and_right_padded_states(lm, pooling):
    """pool_hidden_states on real per-text states placed into left- and right-padded batches, with NaN
    at the pad positions (never read), equals the hand reference."""
    model, tok = lm
    docs = [t for t in TEXTS if t]
    states = [_states(model, tok, t) for t in docs]
    width, dim = max(len(s) for s in states), states[0].shape[1]
    ref = np.stack([_reference(model, tok, t, pooling) for t in docs])
    for side in ("left", "right"):
        h = np.full((len(docs), width, dim), np.nan)
        mask = np.zeros((len(docs), width), dtype=np.int64)
        for i, s in enumerate(states):
            span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            h[i, span], mask[i, span] = s, 1
        got = pool_hidden_states(torch.from_numpy(h), torch.from_numpy(mask), pooling).numpy()
        np.testing.assert_allclose(_unit(got), ref, rtol=0, atol=1e-12)
    empty = pool_hidden_states(torch.ones(1, 3, dim, dtype=torch.float64), torch.zeros(1, 3), pooling)
    assert not empty.any()


def test_invariant_to_batch_size_and_order(lm):
    model, tok = lm
    emb = CausalLMEmbedder((model, tok))
    base = emb.encode_raw(TEXTS, batch_size=len(TEXTS))
    for bs in (1, 2, 3, 100):
        np.testing.assert_allclose(emb.encode_raw(TEXTS, batch_size=bs), base, rtol=0, atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    np.testing.assert_allclose(emb.encode_raw([TEXTS[i] for i in perm], batch_size=3), base[perm], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(base[0], base[-1])  # duplicates


def test_truncation_keeps_the_start(lm):
    model, tok = lm
    emb = CausalLMEmbedder((model, tok), max_length=7)
    got = emb.encode_raw(TEXTS, batch_size=4)
    ref = np.stack([_reference(model, tok, t, "weighted_mean", max_length=7) for t in TEXTS])
    np.testing.assert_allclose(_unit(got), ref, rtol=0, atol=1e-10)
    assert emb.model_id.endswith(";pooling=weighted_mean;max_length=7")
    assert emb.model_id != CausalLMEmbedder((model, tok), max_length=8).model_id
    assert emb.model_id != CausalLMEmbedder((model, tok), max_length=7, pooling="mean").model_id
    other = tiny_llama(vocab_size=len(tok), layers=2, dtype="float64", seed=4)
    assert emb.model_id != CausalLMEmbedder((other, tok), max_length=7).model_id  # weights are in the identity


def _table(n: int, offset: int = 0):
    return to_frame([make_record("sft", messages=[{"role": "user", "content": f"q{i}: tell me " + "more " * (i % 6)},
                                                  {"role": "assistant", "content": "fine " * (i % 4 + 1)}])
                     for i in range(offset, offset + n)])


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    tok = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tinylm_hidden")
    tiny_llama(vocab_size=len(tok), layers=2, dtype="float32", seed=5).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_embed_table_names_caches_and_recomputes_on_pooling(lm, lm_folder, tmp_path):
    store = FeatureStore(tmp_path / "features")
    t = _table(9)
    model, tok = lm
    fs = embed_table(t, "prompt+response", model=CausalLMEmbedder((model, tok)), store=store, batch_size=4)
    assert fs.name == "hidden/prompt+response" and fs.uids.tolist() == t["uid"].to_list()
    assert fs.meta["n_computed"] == 9 and fs.meta["pooling"] == "weighted_mean" and fs.meta["max_length"] == 512
    again = embed_table(t, "prompt+response", model=CausalLMEmbedder((model, tok)), store=store)
    assert again.meta["n_computed"] == 0
    np.testing.assert_array_equal(again.values, fs.values)
    mean = embed_table(t, "prompt+response", model=CausalLMEmbedder((model, tok), pooling="mean"), store=store)
    assert mean.meta["n_computed"] == 9 and mean.meta["pooling"] == "mean"
    assert not np.allclose(mean.values, fs.values)

    # through the model string: "lm:<folder>" with a pooling argument; next to a sentence embedding
    name = f"lm:{lm_folder}"
    a = embed_table(t, "prompt", model=name, store=store, device="cpu", pooling="last")
    assert a.name == "hidden/prompt" and a.dim == 16 and a.meta["pooling"] == "last" and a.meta["n_computed"] == 9
    assert embed_table(t, "prompt", model=name, store=store, device="cpu", pooling="last").meta["n_computed"] == 0
    b = embed_table(t, "prompt", model=name, store=store, device="cpu")
    assert b.meta["n_computed"] == 9 and b.meta["pooling"] == "weighted_mean"
    c = embed_table(t, "prompt", model=name, store=store, device="cpu", max_length=4)
    assert c.meta["n_computed"] == 9 and c.meta["max_length"] == 4
    h = embed_table(t, "prompt", model="hashing:8", store=store)
    assert h.name == "embed/prompt" and {"embed/prompt", "hidden/prompt"} <= set(store.names())
    assert "pooling" not in h.meta
    np.testing.assert_allclose(
        b.values, embed_texts(texts(t, "prompt"), model=name, device="cpu"), rtol=0, atol=1e-6)


def test_embed_step_with_lm_and_targets(lm_folder, tmp_path):
    t = _table(5)
    targets = to_frame([make_record("target", messages=[{"role": "user", "content": f"target {i}"}])
                        for i in range(3)])
    ctx = StepContext(features=FeatureStore(tmp_path / "f"), device="cpu", targets=targets)
    Embed(field="prompt", model=f"lm:{lm_folder}", pooling="mean", max_length=64, batch_size=2).apply(t, ctx)
    assert ctx.features["hidden/prompt"].meta["pooling"] == "mean"
    assert len(ctx.features["hidden/prompt/targets"]) == 3
    assert ctx.stats["embed"]["pooling"] == "mean" and ctx.stats["embed"]["max_length"] == 64


@pytest.mark.parametrize(
    ("params", "name"),
    [({"pooling": "mean"}, "pooling"), ({"model": "hashing", "max_length": 128}, "max_length"),
     ({"model": "lm", "pooling": "max"}, "pooling"), ({"model": "lm", "max_length": 0}, "max_length")],
)
def test_bad_lm_parameters(params, name):
    with pytest.raises(ParameterError, match=f"The '{name}' parameter of Embed must be"):
        Embed(**params)


def test_bad_embedder_parameters(lm):
    with pytest.raises(ParameterError, match="'pooling' parameter of get_embedder"):
        get_embedder("hashing", pooling="last")
    with pytest.raises(ParameterError, match="'pooling' parameter of CausalLMEmbedder"):
        CausalLMEmbedder(lm, pooling="cls")
    with pytest.raises(ParameterError, match="'max_length' parameter of CausalLMEmbedder"):
        CausalLMEmbedder(lm, max_length=True)
    with pytest.raises(ParameterError, match="'device' parameter of CausalLMEmbedder"):
        CausalLMEmbedder(lm, device="cuda")
    with pytest.raises(ParameterError, match="'pooling' parameter of embed_texts"):  # an object has its own
        embed_texts(["x"], model=CausalLMEmbedder(lm), pooling="mean")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        get_embedder("lm:/no/such/folder")


def test_cli_pooling(lm_folder, tmp_path, capsys):
    pool = tmp_path / "pool.parquet"
    _table(6).write_parquet(pool)
    feat = tmp_path / "feat"
    assert main(["embed", str(pool), "-o", str(feat), "--model", "hashing:32", "--pooling", "mean"]) == 2
    assert "'pooling' parameter of embed" in capsys.readouterr().err
    assert main(["embed", str(pool), "-o", str(feat), "--model", f"lm:{lm_folder}", "--pooling", "max"]) == 2
    assert main(["embed", str(pool), "-o", str(feat), "--model", "default", "--max-length", "64"]) == 2
    assert not feat.exists()
    capsys.readouterr()
    assert main(["embed", str(pool), "-o", str(feat), "--model", f"lm:{lm_folder}", "--pooling", "last",
                 "--max-length", "32", "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["feature"] == "hidden/prompt+response" and summary["pooling"] == "last"
    assert summary["max_length"] == 32 and summary["n_computed"] == 6 and summary["dim"] == 16


@pytest.mark.slow
def test_packaged_smollm2():
    pytest.importorskip("gguf")
    emb = get_embedder("lm", device="cpu")
    x = embed_texts(["Write a haiku about autumn.", "What is 2 + 2?", "Translate 'cat' into French."], model=emb)
    assert x.shape == (3, 576) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert emb.model_id.startswith("SmolLM2-135M-Instruct(") and emb.feature_prefix == "hidden"
