"""Decontamination: planted n-gram overlaps, the two real known overlaps (exact counts), the saved
index reused for new data, embedding similarity against brute force, parameter errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.curation import Decontam, NgramIndex, embedding_contamination, ngram_contamination
from curate.curation.decontam import target_texts
from curate.curation.semantic import HashingEncoder
from curate.errors import ParameterError
from curate.io import read_sources
from curate.pipeline.step import StepContext
from curate.schema import dedupe_uids, make_record, message, to_frame


def _sft(prompt: str, response: str) -> dict:
    return make_record("sft", messages=[message("user", prompt), message("assistant", response)])


def _target(prompt: str, task: str = "t") -> dict:
    return make_record("target", messages=[message("user", prompt)], task=task)


def _frame(records: list[dict]) -> pl.DataFrame:
    dedupe_uids(records)
    return to_frame(records)


def _load_json(path: Path) -> list | dict:
    if path.suffix == ".gz":
        return json.loads(gzip.open(path).read())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


LONG = ("the quick brown fox jumps over the lazy dog while the farmer counts thirteen sheep in the "
        "green field near the old mill")


def test_planted_overlap_prompt_and_response(tmp_path):
    targets = _frame([_target(LONG), _target("What is the capital city of France today?"), _target("hi there")])
    pool = _frame([
        _sft("Please summarise: " + LONG.upper() + " thanks", "ok"),           # 13-gram in the prompt (case-folded)
        _sft("Tell me a story", "Sure. " + LONG[:120] + " ..."),                # 13-gram in the response
        _sft("what is the capital city of france today", "Paris."),            # short target, whole match
        _sft("the quick brown fox jumps over the lazy dog while", "twelve words only"),  # 10 words < 13: clean
        _sft("hi there", "hello"),                                             # target shorter than min_tokens
    ])
    index = NgramIndex.build(*target_texts(targets), ngram=13, min_tokens=5)
    assert index.n_skipped == 1
    out = ngram_contamination(pool, index)
    assert out["keep"].to_list() == [False, False, False, True, True]
    assert out["matched_field"].to_list()[:3] == ["prompt", "response", "prompt"]
    assert out["target_uid"][0] == targets["uid"][0] and out["target_uid"][2] == targets["uid"][1]
    assert out["matched_ngram"][0] == " ".join(LONG.split()[:13])
    # saved and reused: same answers from the loaded index
    index.save(tmp_path / "idx")
    again = ngram_contamination(pool, NgramIndex.load(tmp_path / "idx"))
    assert again.equals(out)


def test_step_reuses_saved_index(tmp_path):
    targets = _frame([_target(LONG)])
    pool = _frame([_sft(LONG, "x"), _sft("clean prompt", "clean answer")])
    step = Decontam(index_path=str(tmp_path / "idx"))
    out1 = step.apply(pool, StepContext(targets=targets))
    assert (tmp_path / "idx" / "index.json").exists()
    ctx = StepContext(targets=None)  # no targets now: the saved index is enough
    out2 = step.apply(pool, ctx)
    assert out1.equals(out2) and out2["keep"].to_list() == [False, True]
    assert ctx.stats["decontam"]["n_targets_hit"] == 1


def test_saved_index_is_built_again_for_other_targets(tmp_path):
    other = "a completely different benchmark question that shares no thirteen word span with the first one at all"
    pool = _frame([_sft(LONG, "x"), _sft(other, "y")])
    step = Decontam(index_path=str(tmp_path / "idx"))
    first = step.apply(pool, StepContext(targets=_frame([_target(LONG)])))
    assert first["keep"].to_list() == [False, True]
    ctx = StepContext(targets=_frame([_target(other)]))  # the same index_path, other targets
    second = step.apply(pool, ctx)
    assert second["keep"].to_list() == [True, False] and "built again" in ctx.stats["index_rebuilt"]
    reused = StepContext(targets=None)  # the index saved last holds the new targets
    assert step.apply(pool, reused)["keep"].to_list() == [True, False] and "index_rebuilt" not in reused.stats


def test_embedding_contamination_matches_brute_force():
    enc = HashingEncoder(dim=64)
    targets = _frame([_target(f"question number {i} about topic {i * 7}") for i in range(6)])
    pool = _frame([_sft(f"question number {i} about topic {i * 7}", "a") for i in range(3)]
                  + [_sft(f"unrelated words {i} zebra", "b") for i in range(3)])
    out = embedding_contamination(pool, targets, threshold=0.9, model=enc, fields=("prompt",))
    x = enc.encode([f"question number {i} about topic {i * 7}" for i in range(3)] + [f"unrelated words {i} zebra" for i in range(3)])
    y = enc.encode([f"question number {i} about topic {i * 7}" for i in range(6)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    best = (x @ y.T).max(axis=1)
    np.testing.assert_allclose(out["score"].to_numpy(), best, atol=1e-5)
    assert out["keep"].to_list() == (best < 0.9).tolist()
    assert out["keep"].to_list()[:3] == [False, False, False]


def test_vicuna_bench_inside_alpaca_eval(data_dir):
    targets = read_sources(data_dir / "fastchat_mt_bench" / "vicuna_bench_question.jsonl").table
    # The 805 AlpacaEval instructions as a pool (instruction-only reader, so annotator ties drop no row;
    # the rows are kind "target", which decontam treats like any other row).
    pool = read_sources(data_dir / "alpaca_eval" / "alpaca-7b__alpaca_eval_gpt4__annotations.json",
                        format="instructions").table
    ctx = StepContext(targets=targets)
    out = Decontam().apply(pool, ctx)
    assert targets.height == 80 and pool.height == 805
    assert ctx.stats["decontam"]["n_targets_hit"] == 80  # every Vicuna question is found
    assert (~out["keep"]).sum() == 80


def test_pandalm_inside_self_instruct_user_oriented(data_dir):
    targets = read_sources(data_dir / "self-instruct" / "user_oriented_instructions.jsonl").table
    # instruction + input of each of the 999 PandaLM test items (the pairs' prompts).
    pool = read_sources(data_dir / "pandalm" / "testset-v1.json", format="instructions").table
    out = Decontam(fields=("prompt",)).apply(pool, StepContext(targets=targets))
    assert targets.height == 252 and pool.height == 999
    assert (~out["keep"]).sum() == 998


@pytest.mark.parametrize("bad", [{"ngram": 0}, {"embedding_threshold": 1.5}, {"fields": ["nope"]},
                                 {"targets": ["/no/such/file.jsonl"]}, {"min_tokens": 0}])
def test_bad_parameters(bad):
    with pytest.raises(ParameterError, match="Decontam"):
        Decontam(**bad)


def test_no_targets_is_an_error():
    with pytest.raises(ParameterError, match="targets"):
        Decontam().apply(_frame([_sft("a b c", "d")]), StepContext(targets=None))
