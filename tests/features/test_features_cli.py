"""The feature verbs through ``curate.cli.main``: embed, gradients, warmup, whiten."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from curate.cli import main  # noqa: E402
from curate.features.store import FeatureSet, FeatureStore  # noqa: E402
from curate.features.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from curate.features.whiten import mahalanobis_cosine  # noqa: E402
from curate.schema import make_record, to_frame  # noqa: E402


def _sft(n: int, tag: str = "q"):
    return to_frame([make_record("sft", messages=[{"role": "user", "content": f"{tag}{i}: tell me about {i}"},
                                                  {"role": "assistant", "content": "it is " + "fine " * (i % 3 + 1)}])
                     for i in range(n)])


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    tok = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tinylm_cli")
    tiny_llama(vocab_size=len(tok), layers=2, dtype="float32", seed=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def pool(tmp_path):
    path = tmp_path / "pool.parquet"
    _sft(10).write_parquet(path)
    return path


def test_embed_cached_on_rerun_and_fields(pool, tmp_path, capsys):
    feat = tmp_path / "feat"
    assert main(["embed", str(pool), "-o", str(feat), "--model", "hashing:32", "--json"]) == 0
    first = _last_json(capsys)
    assert first["feature"] == "embed/prompt+response" and first["n_computed"] == 10 and not first["cached"]
    values = np.asarray(FeatureStore(feat)["embed/prompt+response"].values).copy()
    assert main(["embed", str(pool), "-o", str(feat), "--model", "hashing:32", "--json"]) == 0
    again = _last_json(capsys)
    assert again["cached"] and again["n_computed"] == 0
    np.testing.assert_array_equal(np.asarray(FeatureStore(feat)["embed/prompt+response"].values), values)
    assert main(["embed", str(pool), "-o", str(feat), "--model", "hashing:32", "--field", "prompt", "--json"]) == 0
    assert _last_json(capsys)["feature"] == "embed/prompt"


def test_embed_bad_input_exits_2(pool, tmp_path, capsys):
    feat = tmp_path / "feat"
    assert main(["embed", str(pool), "-o", str(feat), "--model", str(tmp_path / "no_model")]) == 2
    assert "no_model" in capsys.readouterr().err
    assert main(["embed", str(pool), "-o", str(feat), "--model", "hashing", "--field", "chosen"]) == 2
    err = capsys.readouterr().err
    assert "pool.parquet:1" in err and "field 'chosen'" in err and "preference" in err
    assert main(["embed", str(tmp_path / "missing.parquet"), "-o", str(feat), "--model", "hashing"]) == 2
    assert main(["embed", str(pool), "-o", str(feat), "--field", "bogus"]) == 2
    assert not (feat / "embed__prompt_plus_response").exists()  # nothing half written


def test_gradients_identical_for_same_seed(pool, tmp_path, tiny_folder, capsys):
    args = ["gradients", str(pool), "--model", str(tiny_folder), "--params", "mlp:1", "--proj-dim", "16",
            "--max-length", "64", "--device", "cpu", "--json"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    s = _last_json(capsys)
    assert s["feature"] == "grad/sgd" and s["shape"] == [10, 16] and s["params"] == "mlp_last_blocks:1"
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    a, b = FeatureStore(tmp_path / "a")["grad/sgd"], FeatureStore(tmp_path / "b")["grad/sgd"]
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_allclose(np.linalg.norm(a.values, axis=1), 1, rtol=1e-5)
    assert main([*args, "-o", str(tmp_path / "c"), "--seed", "1"]) == 0
    assert not np.array_equal(np.asarray(FeatureStore(tmp_path / "c")["grad/sgd"].values), np.asarray(a.values))
    # bad input: missing model folder, --adam without checkpoints, bad params -> exit 2
    assert main(["gradients", str(pool), "-o", str(tmp_path / "d"), "--model", str(tmp_path / "none")]) == 2
    assert main(["gradients", str(pool), "-o", str(tmp_path / "d"), "--model", str(tiny_folder), "--adam"]) == 2
    assert main(["gradients", str(pool), "-o", str(tmp_path / "d"), "--model", str(tiny_folder), "--params", "mlp:x"]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_warmup_then_adam_gradients(tmp_path, tiny_folder, capsys):
    pool = tmp_path / "pool.parquet"
    _sft(16).write_parquet(pool)
    ck = tmp_path / "ckpt"
    args = ["warmup", str(pool), "-o", str(ck), "--model", str(tiny_folder), "--fraction", "0.5", "--min-rows", "0",
            "--epochs", "2", "--lora-r", "2", "--lora-layers", "1", "--lr", "0.01", "--batch-size", "4",
            "--max-length", "48", "--device", "cpu", "--json"]
    assert main(args) == 0
    s = _last_json(capsys)
    assert s["n_train"] == 8 and len(s["checkpoints"]) == 2 and s["n_steps"] == 4 and not s["cached"]
    assert main(args) == 0 and _last_json(capsys)["cached"]
    assert main(["gradients", str(pool), "-o", str(tmp_path / "g"), "--model", str(tiny_folder), "--checkpoint",
                 str(ck), "--adam", "--proj-dim", "8", "--max-length", "48", "--device", "cpu", "--json"]) == 0
    g = _last_json(capsys)
    assert g["feature"] == "grad/adam" and g["shape"] == [16, 2, 8] and len(g["checkpoints"]) == 2
    w = np.asarray(s["mean_lrs"]) / np.sum(s["mean_lrs"])
    np.testing.assert_allclose(g["lr_weights"], w)
    assert main(["warmup", str(pool), "-o", str(tmp_path / "w2"), "--model", str(tmp_path / "none")]) == 2
    assert main(["warmup", str(pool), "-o", str(tmp_path / "w2"), "--model", str(tiny_folder), "--fraction", "0"]) == 2


def _put(folder, name, uids, values, meta=None):
    FeatureStore(folder).put(FeatureSet(name, np.asarray(uids, dtype=object), values, meta or {}))


def test_whiten_equals_mahalanobis_and_rejects_nan(tmp_path, capsys):
    rng = np.random.default_rng(0)
    phi, psi = rng.normal(size=(40, 5)), rng.normal(size=(12, 5)) + 0.3
    _put(tmp_path / "pool", "grad/sgd", [f"p{i}" for i in range(40)], phi.astype(np.float32))
    _put(tmp_path / "tgt", "grad/sgd", [f"t{i}" for i in range(12)], psi.astype(np.float32))
    out = tmp_path / "out"
    assert main(["whiten", str(tmp_path / "pool"), "--target", str(tmp_path / "tgt"), "-o", str(out), "--json"]) == 0
    s = _last_json(capsys)
    assert s["feature"] == "grad/whitened" and s["target_feature"] == "grad/whitened/targets" and s["dim"] == 5
    store = FeatureStore(out)
    S = np.asarray(store["grad/whitened"].values, dtype=np.float64) @ np.asarray(
        store["grad/whitened/targets"].values, dtype=np.float64).T
    want = mahalanobis_cosine(phi.astype(np.float32), psi.astype(np.float32), ridge=1e-3)
    np.testing.assert_allclose(S, want, atol=1e-5)
    bad = phi.astype(np.float32)
    bad[7, 2] = np.nan
    _put(tmp_path / "nan", "grad/sgd", [f"p{i}" for i in range(40)], bad)
    assert main(["whiten", str(tmp_path / "nan"), "--target", str(tmp_path / "tgt"), "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "row 8" in err
    assert not (tmp_path / "o2").exists()
    assert main(["whiten", str(tmp_path / "pool"), "--target", str(tmp_path / "none"), "-o", str(out)]) == 2
    assert main(["whiten", str(tmp_path / "pool"), "--target", str(tmp_path / "tgt"), "-o", str(out),
                 "--ridge", "-1"]) == 2
