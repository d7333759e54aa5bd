"""Embedding back-ends (onnx / openvino, int8) and the content-addressed text-embedding cache."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from curate.cli import main
from curate.errors import MissingDependencyError, ParameterError
from curate.features import text_cache
from curate.features.embed import Embed, HashingEmbedder, embed_table, embed_texts
from curate.features.embed_backends import require_backend, resolve_backend
from curate.features.store import FeatureStore
from curate.pipeline.step import StepContext
from curate.schema import make_record, to_frame


class CachedCounting(HashingEmbedder):
    """A hashing embedder that opts into the content cache and counts the texts it really encodes."""

    content_cache = True

    def __init__(self, dim: int = 32) -> None:
        super().__init__(dim)
        self.seen: list[str] = []

    def _prepare(self, texts):
        self.seen.extend(texts)
        return super()._prepare(texts)


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_cache, "_OPEN", {})
    return tmp_path / "cache" / "text_embeddings"


def _table(prompts: list[str]):
    return to_frame([make_record("sft", messages=[{"role": "user", "content": p},
                                                  {"role": "assistant", "content": f"answer {i}"}])
                     for i, p in enumerate(prompts)])


# ------------------------------------------------------------------ the content cache
def test_content_cache_reuses_text_across_calls_runs_and_processes(cache_root):
    texts = ["alpha beta", "gamma", "alpha beta", "delta epsilon zeta"]
    emb = CachedCounting()
    first = embed_texts(texts, model=emb)
    assert sorted(emb.seen) == sorted(set(texts))  # duplicates embedded once
    np.testing.assert_array_equal(first, HashingEmbedder(32).encode(texts))
    again = embed_texts(["gamma", "new one", "alpha beta"], model=emb)
    assert emb.seen[-1:] == ["new one"] and len(emb.seen) == 4  # only the unseen text is encoded
    np.testing.assert_array_equal(again[[0, 2]], first[[1, 0]])
    # "another process": forget the in-memory caches; the shards on disk still serve every text
    text_cache._OPEN.clear()
    other = CachedCounting()
    np.testing.assert_array_equal(embed_texts(texts, model=other), first)
    assert other.seen == []
    # a different model configuration never reads these vectors
    wider = CachedCounting(dim=64)
    embed_texts(texts, model=wider)
    assert sorted(wider.seen) == sorted(set(texts))


def test_content_cache_serves_targets_of_a_new_run(cache_root, tmp_path):
    emb = CachedCounting()
    pool, targets = _table(["p one", "p two", "shared prompt"]), _table(["shared prompt", "t only"])
    for k in range(2):  # two runs: two fresh feature stores
        ctx = StepContext(seed=0, features=FeatureStore(tmp_path / f"run{k}"), targets=targets, device="cpu")
        fs = embed_table(pool, "prompt", model=emb, store=ctx.features)
        tfs = embed_table(ctx.targets, "prompt", model=emb, store=None)
        assert fs.meta["n_computed"] == (3 if k == 0 else 0)
        assert tfs.meta["n_computed"] == (1 if k == 0 else 0)  # "shared prompt" came from the pool's embedding
    assert sorted(emb.seen) == ["p one", "p two", "shared prompt", "t only"]


def test_content_cache_off_and_shard_merge(cache_root, monkeypatch):
    monkeypatch.setenv("CURATE_EMBED_CACHE", "0")
    emb = CachedCounting()
    embed_texts(["a b", "c"], model=emb)
    embed_texts(["a b", "c"], model=emb)
    assert len(emb.seen) == 4 and not cache_root.exists()
    monkeypatch.setenv("CURATE_EMBED_CACHE", "1")
    monkeypatch.setattr(text_cache, "MAX_SHARDS", 2)
    words = [f"word{i}" for i in range(5)]
    for w in words:
        embed_texts([w], model=emb)
    shards = list(cache_root.rglob("shard-*.npz"))
    assert 1 <= len(shards) <= 2
    text_cache._OPEN.clear()
    fresh = CachedCounting()
    np.testing.assert_array_equal(embed_texts(words, model=fresh), HashingEmbedder(32).encode(words))
    assert fresh.seen == []


# ------------------------------------------------------------------ back-end options
def test_backend_options_validated():
    assert resolve_backend("x", "auto", None) == ("torch", "none")
    with pytest.raises(ParameterError, match="'backend'"):
        Embed(backend="tensorrt")
    with pytest.raises(ParameterError, match="'quantize'"):
        Embed(quantize="int4")
    with pytest.raises(ParameterError, match="'quantize'.*int8 needs backend onnx or openvino"):
        Embed(quantize="int8")
    for model in ("hashing:8", "lm"):
        with pytest.raises(ParameterError, match="'backend'"):
            Embed(model=model, backend="onnx")
    with pytest.raises(ParameterError, match="on CUDA"):
        Embed(backend="openvino", device="cuda")
    with pytest.raises(ParameterError, match="'backend'"):
        embed_texts(["a"], model=HashingEmbedder(8), backend="onnx")


def test_missing_backend_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[onnx\]'"):
        require_backend("onnx")
    import types

    for present in ("openvino", "onnx"):  # installed or not here, only onnxruntime is missing
        monkeypatch.setitem(sys.modules, present, types.ModuleType(present))
    with pytest.raises(MissingDependencyError, match=r"'onnx' extra"):
        require_backend("openvino", "int8")  # int8 models come from onnxruntime's quantiser
    with pytest.raises(MissingDependencyError, match="onnxruntime"):
        Embed(field="prompt", backend="onnx")  # a recipe fails at validation, before any step runs
    pool = tmp_path / "pool.parquet"
    _table(["x"]).write_parquet(pool)
    out = tmp_path / "feats"
    assert main(["embed", str(pool), "-o", str(out), "--backend", "onnx", "--json"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and ".[onnx]" in err
    assert not out.exists()  # checked before anything is read or written
    assert main(["embed", str(pool), "-o", str(out), "--quantize", "int8"]) == 2
    assert main(["embed", str(pool), "-o", str(out), "--model", "hashing:8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["backend"] == "torch"


# ------------------------------------------------------------------ real model, exported
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_backends_match_fp32_on_a_fixed_sample(backend, tmp_path, data_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if backend == "openvino":
        pytest.importorskip("openvino")
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from curate.features.embed import get_embedder
    from curate.features.embed_backends import ExportedEmbedder

    rows = json.loads((data_dir / "alpaca" / "alpaca_5000.json").read_text())[:48]
    docs = ["\n\n".join(p for p in (r["instruction"], r["input"], r["output"]) if p) for r in rows]
    base = get_embedder("default", device="cpu")
    ref = base.encode(docs, batch_size=16)
    fp32 = ExportedEmbedder(base, backend, "none", cache_dir=tmp_path)
    assert fp32.model_id.endswith(f"#{backend}") and fp32.path.name == "model.onnx"
    got = fp32.encode(docs, batch_size=16)
    assert np.abs(got - ref).max() < 1e-4
    int8 = ExportedEmbedder(base, backend, "int8", cache_dir=tmp_path)
    assert int8.model_id.endswith("-int8") and int8.dtype == "int8"
    q = int8.encode(docs, batch_size=16)
    cos = (q * ref).sum(axis=1)
    assert cos.min() > 0.95 and cos.mean() > 0.98 and np.abs(q - ref).max() > 1e-4  # really quantised
    # exported once: a second embedder reuses the files
    mtime = fp32.path.stat().st_mtime_ns
    ExportedEmbedder(base, backend, "none", cache_dir=tmp_path)
    assert fp32.path.stat().st_mtime_ns == mtime
