"""Curry-DPO curricula (spec §3), trainer exports and the preference steps / CLI on tiny models."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from curate.preference.curriculum import RatedPrompt, curry_pairs, oasst_groups, order_curriculum
from curate.preference.export import export_records, write_export
from curate.schema import make_record, to_frame

U = [{"role": "user", "content": "q"}]


def test_four_rated_responses_give_three_stages_with_non_increasing_gaps():
    t = curry_pairs([RatedPrompt(U, ["a", "b", "c", "d"], [4.0, 1.0, 3.0, 2.0])])
    assert t.height == 3
    assert t["curry__stage"].to_list() == [1, 2, 3]
    assert t["curry__gap"].to_list() == [3.0, 2.0, 1.0]
    assert [c[0]["content"] for c in t["chosen"].to_list()] == ["a"] * 3
    assert [r[0]["content"] for r in t["rejected"].to_list()] == ["b", "d", "c"]


def test_all_pairing_skips_ties_and_global_order_is_stage_gap_prompt():
    g1 = RatedPrompt(U, ["a", "b", "c"], [2.0, 2.0, 1.0], prompt_id="p1")
    g2 = RatedPrompt([{"role": "user", "content": "r"}], ["x", "y"], [5.0, 0.0], prompt_id="p2")
    t = curry_pairs([g1, g2], pairing="all")
    pairs = {(c[0]["content"], r[0]["content"]) for c, r in zip(t["chosen"], t["rejected"], strict=True)}
    assert pairs == {("a", "c"), ("b", "c"), ("x", "y")}
    # order: stage 1 of both prompts (gap 5 before gap 1), then stage 2
    assert t["curry__gap"].to_list() == [5.0, 1.0, 1.0]
    assert t["curry__stage"].to_list() == [1, 1, 2]
    assert t["curry__order"].to_list() == [1, 2, 3]


def test_oasst_trees_chosen_ranks_above_rejected(data_dir):
    groups = oasst_groups(data_dir / "oasst1_openassistant" / "en_100_tree.jsonl")
    t = curry_pairs(groups)
    assert t.height > 200
    metas = [json.loads(m) for m in t["meta"]]
    assert all(m["chosen_rating"] > m["rejected_rating"] for m in metas)  # rating = -rank
    assert (t["curry__gap"] > 0).all()
    stages = t["curry__stage"].to_numpy()
    assert (np.diff(stages) >= 0).all()  # stage-major order


def test_order_by_margin_and_buckets():
    recs = [make_record("preference", prompt=[{"role": "user", "content": f"q{i}"}],
                        chosen=[{"role": "assistant", "content": "a"}], rejected=[{"role": "assistant", "content": "b"}])
            for i in range(6)]
    t = to_frame(recs).with_columns(pl.Series("diagnose__margin", [0.5, 3.0, -1.0, 3.0, 2.0, -4.0]))
    o = order_curriculum(t, by="margin")
    assert o["curry__key"].to_list() == [3.0, 3.0, 2.0, 0.5, -1.0, -4.0]
    tied = o["uid"].to_list()[:2]
    assert tied == sorted(tied)  # ties by uid
    b = order_curriculum(t, by="margin", buckets=3)
    assert b["curry__stage"].to_list() == [1, 1, 2, 2, 3, 3]
    from curate.errors import SchemaError

    with pytest.raises(SchemaError, match="no column to order by gap"):
        order_curriculum(t.drop("diagnose__margin"), by="gap")


# ------------------------------------------------------------------ exports
def _mixed():
    pair = make_record("preference", prompt=[{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                                             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
                       chosen=[{"role": "assistant", "content": "good"}],
                       rejected=[{"role": "assistant", "content": "bad"}])
    sft = make_record("sft", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    return to_frame([pair, sft])


def test_export_formats_exact():
    t = _mixed()
    trl = export_records(t, "trl")
    assert trl[0] == {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                                 {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
                      "chosen": [{"role": "assistant", "content": "good"}],
                      "rejected": [{"role": "assistant", "content": "bad"}]}
    assert trl[1] == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    s = export_records(t.head(1), "trl", as_strings=True)[0]
    assert s["chosen"] == "good" and s["prompt"].startswith("system: S")
    sg = export_records(t, "sharegpt")
    assert sg[0] == {"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                                       {"from": "human", "value": "u2"}],
                     "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"},
                     "system": "S"}
    al = export_records(t, "alpaca")
    assert al[0] == {"instruction": "u2", "input": "", "chosen": "good", "rejected": "bad",
                     "history": [["u1", "a1"]], "system": "S"}
    assert al[1] == {"instruction": "hi", "input": "", "output": "hello"}
    assert export_records(t, "messages")[0]["messages"][-1] == {"role": "assistant", "content": "good"}


def test_sharegpt_export_reads_back_as_the_same_pairs(tmp_path):
    """Round trip through curate's own LLaMA-Factory reader: same prompt/chosen/rejected."""
    from curate.io import read_sources

    t = _mixed().head(1)
    path = write_export(t, tmp_path / "dpo.json", "sharegpt")
    back = read_sources([path]).table
    assert back["chosen"].to_list() == t["chosen"].to_list()
    assert back["rejected"].to_list() == t["rejected"].to_list()


# ------------------------------------------------------------------ steps and CLI on a tiny model
@pytest.fixture
def tiny_model_dir(tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from curate.features.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama(dtype="float32", seed=4)
    tok = tiny_tokenizer()
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _hh_like(n=12):
    rng = np.random.default_rng(1)
    words = ["no", "yes", "sure", "sorry", "i", "cannot", "help", "here", "is", "how"]
    recs = []
    for i in range(n):
        c = " ".join(rng.choice(words, 5))
        r = c if i == 0 else " ".join(rng.choice(words, int(rng.integers(2, 8))))
        recs.append(make_record("preference", prompt=[{"role": "user", "content": f"question {i}"}],
                                chosen=[{"role": "assistant", "content": c}],
                                rejected=[{"role": "assistant", "content": r}]))
    recs.append(make_record("preference", prompt=[{"role": "user", "content": "empty"}],
                            chosen=[{"role": "assistant", "content": "fine"}],
                            rejected=[{"role": "assistant", "content": "  "}]))
    return to_frame(recs)


def test_cli_ches_diagnose_and_bad_input(tmp_path, tiny_model_dir):
    from curate.cli import main

    t = _hh_like()
    src = tmp_path / "pairs.parquet"
    t.write_parquet(src)
    out = tmp_path / "ches"
    assert main(["ches", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--drop-top", "0.25",
                 "--json"]) == 0
    sel = pl.read_parquet(out / "selection.parquet")
    # the pair with an empty response never reaches the selector: ches_states drops it
    assert sel.height == t.height - 1 and set(sel.columns) >= {"uid", "score", "ches__ches", "ches__ln_ches", "keep",
                                                           "rank", "reason"}
    rej = pl.read_parquet(out / "rejected.parquet")
    assert rej.filter(pl.col("reason") == "no_response_tokens")["step"].to_list() == ["ches_states"]
    cur = pl.read_parquet(out / "curated.parquet")
    assert cur.height == 12 - 3  # ceil(0.25 * 12) of the 12 scorable pairs dropped
    ident = sel.filter(pl.col("uid") == t["uid"][0])
    assert ident["ches__ln_ches"][0] == 0.0 and "identical_responses" in ident["reason"][0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == {"input": 13, "curated": 9, "rejected": 4}
    # SFT rows exit 2 with a message naming the row
    sft = to_frame([make_record("sft", messages=[{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"}])])
    bad = tmp_path / "sft.parquet"
    pl.concat([t, sft]).write_parquet(bad)
    assert main(["ches", str(bad), "-o", str(tmp_path / "x"), "--model", str(tiny_model_dir)]) == 2
    # diagnose
    dout = tmp_path / "diag"
    assert main(["diagnose", str(src), "-o", str(dout), "--model", str(tiny_model_dir), "--json"]) == 0
    d = pl.read_parquet(dout / "diagnostics.parquet")
    summary = json.loads((dout / "summary.json").read_text())
    assert 0 <= summary["ranking_accuracy"]["sum"] <= 1
    # the margin equals the log-probs stored by the CHES pass (one forward pass serves both)
    np.testing.assert_allclose(d.filter(pl.col("diagnose__keep"))["diagnose__score"].to_numpy(),
                               d.filter(pl.col("diagnose__keep"))["diagnose__margin"].to_numpy())
    assert d.filter(~pl.col("diagnose__keep"))["diagnose__reason"].to_list() == ["no_response_tokens"]
    # curriculum by margin, then export in TRL shape keeps the order
    cpath = tmp_path / "curr.parquet"
    kept = tmp_path / "kept.parquet"
    d.filter(pl.col("diagnose__keep")).write_parquet(kept)
    assert main(["curriculum", str(dout / "diagnostics.parquet"), "-o", str(cpath), "--by", "margin"]) == 2  # nulls
    assert main(["curriculum", str(kept), "-o", str(cpath), "--by", "margin"]) == 0
    c = pl.read_parquet(cpath)
    assert (np.diff(c["curry__key"].to_numpy()) <= 0).all()
    epath = tmp_path / "train.jsonl"
    assert main(["export", str(cpath), "-o", str(epath), "--format", "trl"]) == 0
    lines = [json.loads(x) for x in epath.read_text().splitlines()]
    assert len(lines) == c.height and [x["curry_order"] for x in lines] == sorted(x["curry_order"] for x in lines)


def test_recipe_steps_ches_states_ches_export(tmp_path, tiny_model_dir):
    from curate.pipeline.verbs import run_verb

    t = _hh_like()
    sft = to_frame([make_record("sft", messages=[{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"}])])
    table = pl.concat([t, sft])
    steps = [{"use": "ches_states", "model": str(tiny_model_dir)},
             {"use": "ches", "keep_bottom_fraction": 0.5},
             {"use": "export", "format": "sharegpt", "path": str(tmp_path / "o.jsonl")}]
    m = run_verb("ches", table, steps, tmp_path / "run").manifest
    rej = pl.read_parquet(tmp_path / "run" / "rejected.parquet")
    reasons = dict(zip(rej["uid"], rej["reason"], strict=True))
    assert reasons[sft["uid"][0]] == "not_a_pair"
    assert "no_response_tokens" in reasons.values()
    assert m["rows"]["curated"] == 6  # ceil(0.5 * 12)
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 6
