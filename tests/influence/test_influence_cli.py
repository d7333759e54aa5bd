"""`curate influence fit | score` through curate.cli.main on a tiny Llama saved to a folder."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from curate.cli import main
from curate.features.tiny import tiny_llama, tiny_tokenizer
from curate.io.writers import write_parquet
from curate.schema import make_record, to_frame

torch.set_num_threads(1)
ML = "48"

QA = [("What is 2+3?", "5"), ("Name a colour.", "Blue."), ("Capital of France?", "Paris."),
      ("Spell cat.", "c-a-t"), ("Add 1 and 1.", "2"), ("Say hi.", "hi"), ("Opposite of up?", "down"),
      ("Largest planet?", "Jupiter")]


def _sft(pairs):
    return to_frame([make_record("sft", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                     for q, a in pairs])


def _targets(pairs):
    return to_frame([make_record("target", task="t", messages=[{"role": "user", "content": q}], answer=a)
                     for q, a in pairs])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("infcli")
    tok = tiny_tokenizer()
    for name, seed, hidden in (("lm", 0, 16), ("lm_other", 1, 16), ("lm_wide", 0, 24)):
        tiny_llama(vocab_size=len(tok), dtype="float32", seed=seed, hidden=hidden).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_parquet(_sft(QA), root / "pool.parquet")
    write_parquet(_targets([("What is 4+1?", "5"), ("Capital of Italy?", "Rome.")]), root / "targets.parquet")
    write_parquet(to_frame([make_record("target", task="t", messages=[{"role": "user", "content": "Hi?"}])]),
                  root / "no_answer.parquet")
    rc = main(["influence", "fit", str(root / "pool.parquet"), "-o", str(root / "factors"), "--model", str(root / "lm"),
               "--fisher", "empirical", "--max-length", ML, "--batch-size", "3"])
    assert rc == 0
    rc = main(["influence", "score", str(root / "pool.parquet"), "--target", str(root / "targets.parquet"),
               "--factors", str(root / "factors"), "-o", str(root / "scores"), "--batch-size", "3"])
    assert rc == 0
    return root


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_influence_cli_scores_equal_library_scores(env):
    """The CLI's score folder holds exactly what the library computes in process (uids on both axes)."""
    from curate.features.lm import encode_examples, load_causal_lm
    from curate.features.store import FeatureSet
    from curate.influence import CausalLMTask, Curvature, pairwise_scores

    pool, tgt = pl.read_parquet(env / "pool.parquet"), pl.read_parquet(env / "targets.parquet")
    lm, tok = load_causal_lm(str(env / "lm"), device="cpu")
    task = CausalLMTask(tok.pad_token_id)
    train, queries = encode_examples(pool, tok, max_length=int(ML)), encode_examples(tgt, tok, max_length=int(ML))
    fit_rows = encode_examples(pool.sort("uid"), tok, max_length=int(ML))  # the CLI fits in uid order
    curv = Curvature(strategy="ekfac", fisher="empirical", batch_size=3).fit(lm, task, fit_rows)
    ref = pairwise_scores(curv, lm, task, queries, train, batch_size=3).values

    fs = FeatureSet.load(env / "scores")
    assert fs.uids.tolist() == pool["uid"].to_list()
    assert fs.meta["target_uids"] == tgt["uid"].to_list()
    assert fs.values.shape == (pool.height, tgt.height)
    np.testing.assert_allclose(fs.values.T, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    assert pl.read_parquet(env / "targets.parquet")["uid"].to_list() == pl.read_parquet(
        env / "scores" / "targets.parquet")["uid"].to_list()
    agg = pl.read_parquet(env / "scores" / "aggregates.parquet")
    assert agg["uid"].to_list() == pool["uid"].to_list()
    np.testing.assert_allclose(agg["mean"].to_numpy(), ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(agg["max"].to_numpy(), ref.max(0), rtol=1e-6)
    assert (agg["n_scored"].to_numpy() == tgt.height).all()


def test_influence_cli_tfidf_rank_and_json(env, capsys):
    """--tfidf-top only subsets (kept pairs equal the unfiltered scores, the rest NaN); full rank == --query-rank d."""
    from curate.features.store import FeatureSet

    full = FeatureSet.load(env / "scores").values
    rc = main(["influence", "score", str(env / "pool.parquet"), "--target", str(env / "targets.parquet"),
               "--factors", str(env / "factors"), "-o", str(env / "scores_tfidf"), "--tfidf-top", "3", "--json"])
    assert rc == 0
    summary = _last_json(capsys)
    assert summary["pairs_scored"] == 3 * 2 and summary["n_candidates"] == len(QA)
    got = FeatureSet.load(env / "scores_tfidf").values
    kept = np.isfinite(got)
    assert (kept.sum(0) == 3).all()
    np.testing.assert_allclose(got[kept], full[kept], rtol=1e-5)  # float32 model, other batches
    # the Capital-of-Italy target's top-3 includes the Capital-of-France candidate
    assert kept[2, 1]
    # rank = min(d_out, d_in) of every tracked module is exact (tiny Llama: 16 x 24 MLP)
    rc = main(["influence", "score", str(env / "pool.parquet"), "--target", str(env / "targets.parquet"),
               "--factors", str(env / "factors"), "-o", str(env / "scores_r"), "--query-rank", "16",
               "--query-batch-size", "1"])
    assert rc == 0
    np.testing.assert_allclose(FeatureSet.load(env / "scores_r").values, full, rtol=1e-6,
                               atol=1e-9 * np.abs(full).max())


def test_influence_cli_bad_input_exits_2(env, capsys):
    base = ["influence", "score", str(env / "pool.parquet"), "--factors", str(env / "factors")]
    cases = [
        (["influence", "fit", str(env / "pool.parquet"), "-o", str(env / "f_bad"), "--model", str(env / "lm"),
          "--modules", "model.layers.0.mlp.nope"], "model.layers.0.mlp.nope"),
        (["influence", "fit", str(env / "pool.parquet"), "-o", str(env / "f_bad"), "--model", str(env / "lm"),
          "--modules", "lm_head"], "lm_head"),
        (["influence", "fit", str(env / "missing.parquet"), "-o", str(env / "f_bad")], "not found"),
        ([*base, "--target", str(env / "no_answer.parquet"), "-o", str(env / "s_bad")], "without response tokens"),
        ([*base, "--target", str(env / "targets.parquet"), "-o", str(env / "s_bad"), "--model", str(env / "lm_other")],
         "other weights"),
        ([*base, "--target", str(env / "targets.parquet"), "-o", str(env / "s_bad"), "--model", str(env / "lm_wide")],
         "dimensions"),
        (["influence", "score", str(env / "pool.parquet"), "--target", str(env / "targets.parquet"), "--factors",
          str(env / "nothing_here"), "-o", str(env / "s_bad")], "no fitted factors"),
        ([*base, "--target", str(env / "targets.parquet"), "-o", str(env / "s_bad"), "--damping", "-1"], "damping"),
        ([*base, "--target", str(env / "targets.parquet"), "-o", str(env / "s_bad"), "--query-rank", "0"], "query_rank"),
        ([*base, "--target", str(env / "targets.parquet"), "-o", str(env / "s_bad"), "--tfidf-top", "0"], "tfidf_top"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, (argv, msg)
    assert not (env / "f_bad").exists() and not (env / "s_bad").exists()
    assert not [p for p in env.iterdir() if p.name.startswith(".")]  # no half-written temp folders left


def test_influence_cli_checkpoint_adapter_is_merged(env, tmp_path):
    """--checkpoint with a peft adapter fits the merged model: same factors as fitting that model directly."""
    peft = pytest.importorskip("peft")
    from curate.features.lm import load_causal_lm

    lm, tok = load_causal_lm(str(env / "lm"), device="cpu")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj"], lora_dropout=0.0)
    torch.manual_seed(3)
    wrapped = peft.get_peft_model(lm, cfg)
    for n, p in wrapped.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    wrapped.save_pretrained(tmp_path / "adapter")
    merged = wrapped.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    common = ["--fisher", "empirical", "--max-length", ML, "--batch-size", "4", "--strategy", "kfac"]
    assert main(["influence", "fit", str(env / "pool.parquet"), "-o", str(tmp_path / "fa"), "--model", str(env / "lm"),
                 "--checkpoint", str(tmp_path / "adapter"), *common]) == 0
    assert main(["influence", "fit", str(env / "pool.parquet"), "-o", str(tmp_path / "fm"), "--model",
                 str(tmp_path / "merged"), *common]) == 0
    a, m = torch.load(tmp_path / "fa" / "factors.pt"), torch.load(tmp_path / "fm" / "factors.pt")
    base = torch.load(env / "factors" / "factors.pt")
    key = "model.layers.0.mlp.down_proj::a_cov"
    torch.testing.assert_close(a[key], m[key], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(a[key], base[key].to(a[key].dtype), rtol=1e-3)
    # scoring picks the checkpoint up from the factors folder
    assert main(["influence", "score", str(env / "pool.parquet"), "--target", str(env / "targets.parquet"),
                 "--factors", str(tmp_path / "fa"), "-o", str(tmp_path / "sa")]) == 0
