"""Shapes on small hand-written files: exact conversions, containers, kinds, uids, input expansion."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from curate.io import detect_format, expand_inputs, read_source, read_sources
from curate.schema import content_of, uid

ALPACA = [
    {"instruction": "Add.", "input": "1 2", "output": "3", "id": 7, "extra": "x"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _one(tmp_path, rows, name="f.jsonl", **kw):
    return read_source(_jsonl(tmp_path / name, rows), **kw)


def test_io_alpaca_exact_record(tmp_path):
    res = _one(tmp_path, ALPACA)
    r0 = res.table.row(0, named=True)
    assert r0["messages"] == [{"role": "user", "content": "Add.\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert r0["source_id"] == "7" and json.loads(r0["meta"]) == {"extra": "x"}
    assert r0["source"] == str(tmp_path / "f.jsonl") and r0["source_line"] == 1 and r0["source_format"] == "alpaca"
    assert r0["uid"] == uid({"kind": "sft", "messages": r0["messages"]})
    assert res.table.row(1, named=True)["messages"][0]["content"] == "Say hi."


def test_io_containers_give_identical_rows(tmp_path):
    """JSON, JSONL, gzip, parquet and CSV (with header) of the same records -> the same uids and texts."""
    base = _one(tmp_path, ALPACA).table
    flat = [{k: str(v) for k, v in r.items() if k in ("instruction", "input", "output")} for r in ALPACA]
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(json.dumps(ALPACA).encode()))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ALPACA).encode()))
    pl.DataFrame(flat).write_parquet(tmp_path / "a.parquet")
    pl.DataFrame(flat).write_csv(tmp_path / "a.csv")
    for name in ("a.json", "a.json.gz", "a.jsonl.gz", "a.parquet", "a.csv"):
        t = read_source(tmp_path / name).table
        assert t["uid"].to_list() == base["uid"].to_list(), name
        assert t["messages"].to_list() == base["messages"].to_list(), name
        assert t["source_line"].to_list() == [1, 2] or name == "a.csv", name
    # CSV lines count the header: records are on physical lines 2 and 3
    assert read_source(tmp_path / "a.csv").table["source_line"].to_list() == [2, 3]


def test_io_csv_multiline_cell_line_numbers(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text('instruction,output\n"two\nlines",a\nx,y\n')
    t = read_source(p).table
    assert t["source_line"].to_list() == [2, 4]
    assert t["messages"].to_list()[0][0]["content"] == "two\nlines"


def test_io_mmlu_csv_headerless(tmp_path):
    d = tmp_path / "val"
    d.mkdir()
    (d / "anatomy_val.csv").write_text('What is 1+1?,1,2,3,"4, or more",B\n')
    (d / "astronomy_val.csv").write_text("Q?,a,b,c,d,D\n")
    res = read_sources([d])
    assert res.table["task"].to_list() == ["mmlu/anatomy", "mmlu/astronomy"]
    row = res.table.row(0, named=True)
    assert row["messages"] == [{"role": "user", "content": "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4, or more\nAnswer:"}]
    assert row["answer"] == "B" and row["kind"] == "target"
    sft = read_sources([d], kind="sft").table.row(0, named=True)
    assert sft["messages"][-1] == {"role": "assistant", "content": "B"}


def test_io_sharegpt_and_preference(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"}
    t = _one(tmp_path, [conv]).table.row(0, named=True)
    assert t["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}]
    pref = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"}}
    p = _one(tmp_path, [pref], name="p.jsonl")
    assert p.formats[str(tmp_path / "p.jsonl")] == "sharegpt_preference"
    row = p.table.row(0, named=True)
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        [{"role": "user", "content": "q"}], [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}])
    # the same pair as sft is prompt + chosen; as target, the prompt with the chosen reply as answer
    sft = _one(tmp_path, [pref], name="p.jsonl", kind="sft").table.row(0, named=True)
    assert sft["messages"] == row["prompt"] + row["chosen"]
    tgt = _one(tmp_path, [pref], name="p.jsonl", kind="target").table.row(0, named=True)
    assert tgt["messages"] == row["prompt"] and tgt["answer"] == "good"


def test_io_trl_strings_lists_and_implicit_prompt(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "r"}]},
    ]
    t = _one(tmp_path, rows).table
    assert t["uid"][0] != t["uid"][1]  # same content -> the repeat gets a distinct uid
    assert t["prompt"][0].to_list() == t["prompt"][1].to_list()
    implicit = {"chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
                "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}
    i = _one(tmp_path, [implicit], name="i.jsonl").table.row(0, named=True)
    assert i["prompt"] == [{"role": "user", "content": "p"}]
    assert i["chosen"] == [{"role": "assistant", "content": "c"}] and i["rejected"] == [{"role": "assistant", "content": "r"}]
    content = content_of(t.row(0, named=True))
    assert t["uid"][0] == uid(content)


def test_io_hh_transcript_split(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: why?\n\nAssistant: because",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: why?\n\nAssistant: no"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: different\n\nAssistant: c"},
    ]
    res = _one(tmp_path, rows)
    row = res.table.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "why?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "because"}]
    assert row["rejected"] == [{"role": "assistant", "content": "no"}]
    assert res.rejects["source_line"].to_list() == [2] and res.rejects["field"].to_list() == ["chosen"]


def _node(mid, role, text, rank=None, replies=()):
    return {"message_id": mid, "role": role, "text": text, "rank": rank, "replies": list(replies)}


def test_io_oasst_tree_hand_worked(tmp_path):
    # root prompt -> 3 ranked answers (ranks 1, 0, 2); answer a0 -> 2 ranked follow-ups; each follow-up -> 1 or 2 answers
    tree = {"message_tree_id": "t", "prompt": _node("r", "prompter", "Q", replies=[
        _node("a1", "assistant", "A1", 1),
        _node("a0", "assistant", "A0", 0, [
            _node("f0", "prompter", "F0", 0, [_node("g0", "assistant", "G0", 0), _node("g1", "assistant", "G1", 1)]),
            _node("f1", "prompter", "F1", 1),
        ]),
        _node("a2", "assistant", "A2", 2),
    ])}
    res = _one(tmp_path, [tree])
    t = res.table
    assert t.height == 3  # r (a0 vs a2), a0 (f0 vs f1), f0 (g0 vs g1)
    pairs = {r["source_id"]: r for r in t.iter_rows(named=True)}
    assert pairs["r"]["chosen"][0]["content"] == "A0" and pairs["r"]["rejected"][0]["content"] == "A2"
    assert [m["content"] for m in pairs["f0"]["prompt"]] == ["Q", "A0", "F0"]
    assert pairs["f0"]["chosen"][0]["content"] == "G0" and pairs["f0"]["rejected"][0]["content"] == "G1"
    sft = _one(tmp_path, [tree], kind="sft").table.row(0, named=True)
    assert [m["content"] for m in sft["messages"]] == ["Q", "A0", "F0", "G0"]


def test_io_pandalm_votes_hand_worked(tmp_path):
    base = {"instruction": "i", "input": "x", "response1": "one", "response2": "two"}
    rows = [dict(base, annotator1=2, annotator2=1, annotator3=2), dict(base, annotator1=0, annotator2=0, annotator3=1),
            dict(base, annotator1=1, annotator2=2, annotator3=0)]
    p = tmp_path / "pl.json"
    p.write_text(json.dumps(rows))
    res = read_source(p)
    row = res.table.row(0, named=True)
    assert row["prompt"] == [{"role": "user", "content": "i\n\nx"}]
    assert row["chosen"][0]["content"] == "two" and row["annotators"] == [1, -1, 1]
    assert res.table.height == 1 and res.rejects["source_line"].to_list() == [2, 3]


def test_io_messages_parts_and_kto(tmp_path):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "b"}]},
                          {"role": "assistant", "content": "c", "loss_weight": 1.0}], "label": False}]
    row = _one(tmp_path, rows).table.row(0, named=True)
    assert row["messages"][0]["content"] == "a\nb"
    assert json.loads(row["meta"]) == {"label": False, "loss_weights": [None, 1.0]}
    tgt = _one(tmp_path, rows, kind="target").table.row(0, named=True)
    assert tgt["messages"] == [{"role": "user", "content": "a\nb"}] and tgt["answer"] == "c"


def test_io_generic_instruction_output_as_target(tmp_path):
    res = _one(tmp_path, ALPACA, name="my_eval.jsonl", kind="target")
    row = res.table.row(0, named=True)
    assert row["kind"] == "target" and row["task"] == "my_eval"
    assert row["messages"] == [{"role": "user", "content": "Add.\n\n1 2"}] and row["answer"] == "3"


def test_io_bbh_wrapper_and_prompts(tmp_path):
    p = tmp_path / "navigate.json"
    p.write_text(json.dumps({"canary": "x", "examples": [{"input": "go?", "target": "Yes"}]}))
    row = read_source(p).table.row(0, named=True)
    assert (row["task"], row["answer"], row["messages"][0]["content"]) == ("bbh/navigate", "Yes", "go?")
    q = tmp_path / "lottery.jsonl"
    q.write_text('"first prompt"\n"second"\n')
    assert detect_format(q) == "prompts"
    assert read_source(q).table["messages"].to_list()[1] == [{"role": "user", "content": "second"}]


def test_io_uids_stable_across_sources_and_dedupe_global(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ALPACA)
    b = _jsonl(tmp_path / "b.jsonl", ALPACA[:1])
    one = read_sources([a]).table
    both = read_sources([a, b]).table
    assert both["uid"].n_unique() == 3
    assert both["uid"].to_list()[:2] == one["uid"].to_list()  # first occurrence keeps the content hash
    assert both["source"].to_list() == [str(a), str(a), str(b)]
    again = read_sources([a, b]).table
    assert again["uid"].to_list() == both["uid"].to_list()
    # row order inside a file does not change a row's uid
    rev = read_source(_jsonl(tmp_path / "r.jsonl", ALPACA[::-1])).table
    assert sorted(rev["uid"].to_list()) == sorted(one["uid"].to_list())


def test_io_expand_inputs(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.json", "sub/c.csv", "sub/e.parquet", "x.jsonl.gz", "README.md", "LICENSE", "notes.txt",
                 ".hidden.jsonl"):
        (d / name).write_text("")
    files = [p.relative_to(d).as_posix() for p in expand_inputs([d])]
    assert files == ["a.json", "b.jsonl", "sub/c.csv", "sub/e.parquet", "x.jsonl.gz"]
    globbed = [p.name for p in expand_inputs([str(d / "*.json*")])]
    assert globbed == ["a.json", "b.jsonl", "x.jsonl.gz"]
    assert expand_inputs([d / "b.jsonl", d / "a.json"]) == [d / "b.jsonl", d / "a.json"]  # order kept


def test_io_format_forced(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    assert read_source(p).table.row(0, named=True)["task"] == "q"  # no '####': a generic question/answer file
    with pytest.raises(ValueError, match="missing field"):
        read_source(p, format="alpaca")
