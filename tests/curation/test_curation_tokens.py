"""The count_tokens step: counts equal the tokenizer's own chat-template encoding, token budgets
spend them exactly, filters bound them, manifests name the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytest.importorskip("transformers")

from curate.cli import main  # noqa: E402
from curate.curation import HeuristicFilter, filter_table  # noqa: E402
from curate.curation.tokens import CountTokens, count_table, load_tokenizer  # noqa: E402
from curate.errors import ParameterError  # noqa: E402
from curate.pipeline.step import StepContext  # noqa: E402
from curate.schema import make_record, to_frame  # noqa: E402
from curate.selectors.baselines import TopKSelector  # noqa: E402

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca" / "alpaca_5000.json"


def _ids(enc) -> list[int]:
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


def _rows() -> pl.DataFrame:
    return to_frame([
        make_record("sft", messages=[{"role": "user", "content": "Name three primary colours."},
                                     {"role": "assistant", "content": "Red, yellow and blue."}]),
        make_record("sft", messages=[{"role": "system", "content": "Be terse."},
                                     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                     {"role": "user", "content": "And 3+3?"},
                                     {"role": "assistant", "content": "6, which is twice three."}]),
        make_record("preference", prompt=[{"role": "user", "content": "Say hi"}],
                    chosen=[{"role": "assistant", "content": "Hi there, nice to meet you!"}],
                    rejected=[{"role": "assistant", "content": "no"}]),
    ])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)[0]


def test_counts_equal_the_chat_template_encoding(tok):
    table = _rows()
    counts, info = count_table(table)
    assert info["tokenizer"] == "smollm2-135m-instruct" and info["chat_template"]
    convs = [table["messages"][0].to_list(), table["messages"][1].to_list()]
    for i, conv in enumerate(convs):
        full = len(_ids(tok.apply_chat_template(conv, tokenize=True)))
        prompt = len(_ids(tok.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True)))
        assert counts["n_tokens"][i] == full and counts["n_prompt_tokens"][i] == prompt
        assert counts["n_response_tokens"][i] == full - prompt
    pref = [{"role": "user", "content": "Say hi"}]
    chosen = pref + [{"role": "assistant", "content": "Hi there, nice to meet you!"}]
    rejected = pref + [{"role": "assistant", "content": "no"}]
    p = len(_ids(tok.apply_chat_template(pref, tokenize=True, add_generation_prompt=True)))
    assert counts["n_tokens"][2] == len(_ids(tok.apply_chat_template(chosen, tokenize=True)))
    assert counts["n_rejected_tokens"][2] == len(_ids(tok.apply_chat_template(rejected, tokenize=True))) - p
    # a response of "4" in the multi-turn row is the last assistant turn only: far fewer tokens than the row
    assert counts["n_response_tokens"][1] < counts["n_prompt_tokens"][1]


def test_plain_counts_and_a_local_folder(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "tok"))
    table = _rows()
    plain, info = count_table(table, str(tmp_path / "tok"), chat_template=False)
    assert info["tokenizer"] == str(tmp_path / "tok") and not info["chat_template"]
    assert (plain["n_tokens"] == plain["n_prompt_tokens"] + plain["n_response_tokens"]).all()
    assert plain["n_response_tokens"][0] == len(tok("Red, yellow and blue.", add_special_tokens=False)["input_ids"])
    with pytest.raises(ParameterError, match="'tokenizer' parameter of count_tokens"):
        count_table(table, str(tmp_path / "missing"))


def _alpaca_pool(n: int = 200) -> pl.DataFrame:
    rows = json.loads(ALPACA.read_text())[:n]
    recs = [make_record("sft", messages=[{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
                                         {"role": "assistant", "content": r["output"] or "-"}]) for r in rows]
    return to_frame(recs)


@pytest.mark.skipif(not ALPACA.exists(), reason="../shared/data is not there")
def test_tokens_budget_fills_within_one_row_with_real_counts():
    pool = _alpaca_pool()
    counts, _ = count_table(pool)
    pool = pool.join(counts, on="uid")
    # planted: the two longest rows rank first and second, and the second does not fit after the
    # first, so a prefix cut would stop there, a whole short row away from the target
    n_tok = pool["n_tokens"].to_numpy()
    first, second = np.argsort(-n_tok, kind="stable")[:2]
    score = np.zeros(pool.height)
    score[[first, second]] = [2.0, 1.0]
    pool = pool.with_columns(pl.Series("score", score))
    target = int(n_tok[first] + n_tok[second] - 1)
    res = TopKSelector().select(pool, {}, {"tokens": target})
    frame = res.frame.join(pool.select("uid", "n_tokens"), on="uid")
    kept = int(frame.filter(pl.col("keep"))["n_tokens"].sum())
    left = frame.filter(~pl.col("keep"))["n_tokens"]
    assert kept <= target and target - kept < int(left.min())
    assert frame.filter(pl.col("uid") == pool["uid"][int(second)])["reason"][0] == "over_token_budget"
    assert res.diagnostics["tokens"]["counted_by"] == "n_tokens" and not res.diagnostics["tokens"]["approximate"]


def test_filters_bound_counted_tokens():
    table = _rows()
    counts, _ = count_table(table)
    table = table.join(counts.rename({c: f"count_tokens__{c}" for c in counts.columns if c != "uid"}), on="uid")
    big = int(counts["n_tokens"].max())
    out = filter_table(table, HeuristicFilter(max_tokens=big - 1, identical_pair=False))
    assert out["reason"].to_list().count(f"too_many_tokens: row has {big} tokens (> {big - 1})") == 1
    one = int(counts["n_response_tokens"][1])
    out = filter_table(table, HeuristicFilter(min_response_tokens=one + 1, min_response_chars=0))
    assert out["reason"][1] == f"too_few_tokens: response has {one} tokens (< {one + 1})"
    # no counted columns: the filter counts with its tokenizer ('default' = the packaged one)
    out = filter_table(_rows(), HeuristicFilter(max_tokens=big - 1, tokenizer="default"))
    assert not out["keep"].all()


def test_step_and_select_manifest(tmp_path):
    table = _rows()
    out = CountTokens().apply(table, StepContext())
    assert out["keep"].all() and set(out.columns) >= {"uid", "n_tokens", "n_prompt_tokens", "n_response_tokens"}
    src = tmp_path / "pool.parquet"
    _alpaca_pool(60).write_parquet(src) if ALPACA.exists() else table.write_parquet(src)
    rc = main(["select", "random", str(src), "-o", str(tmp_path / "out"), "--budget", "tokens:800",
               "--tokenizer", "default"])
    assert rc == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    cur = pl.read_parquet(tmp_path / "out" / "curated.parquet")
    assert manifest["tokens"]["tokenizer"] == "smollm2-135m-instruct"
    assert manifest["tokens"]["curated"] == cur["count_tokens__n_tokens"].sum() <= 800 and not manifest["tokens"]["approximate"]
    rc = main(["select", "random", str(src), "-o", str(tmp_path / "approx"), "--budget", "tokens:800"])
    assert rc == 0 and json.loads((tmp_path / "approx" / "manifest.json").read_text())["tokens"]["approximate"]
