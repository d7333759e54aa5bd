"""Bad input: each case raises SchemaError naming file:line, field, expected and found; on_error="skip"
reports the bad record in `rejects` and keeps the good ones."""

from __future__ import annotations

import gzip
import json

import pytest

from curate.errors import ParameterError, SchemaError
from curate.io import detect_format, expand_inputs, read_sources

GOOD = '{"instruction": "a", "input": "", "output": "b"}'
GOOD2 = '{"instruction": "c", "input": "", "output": "d"}'


def _write(tmp_path, name, content):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


# (file name, content, line in message, field in message, words that must appear)
BAD = [
    ("trunc.jsonl", f'{GOOD}\n{{"instruction": "c", "inp\n{GOOD2}\n', 2, None, ["malformed JSON", "one complete JSON value"]),
    ("type.jsonl", f'{GOOD}\n{{"instruction": 5, "input": "", "output": "b"}}\n', 2, "instruction", ["a string", "int 5"]),
    ("missing.jsonl", f'{GOOD}\n{GOOD2}\n{{"instruction": "x", "input": ""}}\n', 3, "output", ["missing", "nothing"]),
    ("utf8.jsonl", (GOOD + "\n" + GOOD2 + "\n").encode() + b'{"instruction": "\xff\xfe", "input": "", "output": "b"}\n', 3,
     None, ["UTF-8", "xff"]),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}\n', 1,
     "messages[1].role", ["role", "wizard"]),
    ("shape.jsonl", '{"foo": 1, "bar": 2}\n', 1, None, ["unknown record shape", "bar, foo"]),
    ("noarray.json", '[{"instruction": "a", "output": "b"}, 7]', 2, None, ["not an object", "int 7"]),
    ("pair.jsonl", '{"prompt": "p", "chosen": "c", "rejected": ["x"]}\n', 1, "rejected[0]", ["not an object", "{role, content}"]),
    ("mmlu_bad.csv", "q,a,b,c,d,A\nq2,a,b,c,d,E\n", 2, "answer (column 6)", ["A, B, C or D", "'E'"]),
    ("vote.json", json.dumps([{"instruction": "i", "input": "", "response1": "a", "response2": "b", "annotator1": 1,
                               "annotator2": 7, "annotator3": 1}]), 1, "annotator2", ["0 (tie), 1 or 2", "7"]),
]


@pytest.mark.parametrize(("name", "content", "line", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_io_bad_input_names_place_and_field(tmp_path, name, content, line, field, words):
    p = _write(tmp_path, name, content)
    with pytest.raises(SchemaError) as info:
        read_sources([p])
    err = info.value
    msg = str(err)
    assert err.file == str(p) and err.line == line and f"{p}:{line}" in msg
    assert err.field == field
    if field:
        assert f"field '{field}'" in msg
    assert "Expected" in msg
    for w in words:
        assert w in msg, msg
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("content", ["", "   \n\n", "[]"])
def test_io_empty_file(tmp_path, content):
    p = _write(tmp_path, "empty.jsonl" if content != "[]" else "empty.json", content)
    with pytest.raises(SchemaError, match="empty") as info:
        read_sources([p])
    assert info.value.file == str(p)
    res = read_sources([p], on_error="skip")
    assert res.table.height == 0 and res.rejects.height == 1 and "empty" in res.rejects["reason"][0]


def test_io_skip_keeps_good_lines_and_reports_bad(tmp_path):
    lines = [GOOD, '{"instruction": "c", "inp', '{"instruction": 5, "input": "", "output": "b"}', GOOD2]
    p = _write(tmp_path, "mixed.jsonl", "\n".join(lines) + "\n")
    q = _write(tmp_path, "bytes.jsonl", b"\xff\n" + GOOD.encode() + b"\n")
    res = read_sources([p, q], on_error="skip")
    assert res.table.height == 3
    assert res.table["source_line"].to_list() == [1, 4, 2]
    rej = res.rejects
    assert rej["source"].to_list() == [str(p), str(p), str(q)]
    assert rej["source_line"].to_list() == [2, 3, 1]
    assert rej["field"].to_list() == [None, "instruction", None]
    assert rej["raw"].to_list()[:2] == lines[1:3]
    assert "malformed JSON" in rej["reason"][0] and "UTF-8" in rej["reason"][2]


def test_io_fail_stops_at_first_bad_line_in_file_order(tmp_path):
    # a type error on line 2 comes before a parse error on line 3
    p = _write(tmp_path, "order.jsonl", f'{GOOD}\n{{"instruction": 5, "output": "b"}}\n{{broken\n')
    with pytest.raises(SchemaError) as info:
        read_sources([p])
    assert info.value.line == 2 and info.value.field == "instruction"


def test_io_unknown_shape_skip_goes_to_rejects(tmp_path):
    bad = _write(tmp_path, "a.jsonl", '{"foo": 1}\n')
    good = _write(tmp_path, "b.jsonl", GOOD + "\n")
    res = read_sources([bad, good], on_error="skip")
    assert res.table.height == 1 and res.rejects.height == 1
    assert res.formats == {str(good): "alpaca"}
    assert "unknown record shape" in res.rejects["reason"][0]


def test_io_wrong_kind_for_format(tmp_path):
    p = _write(tmp_path, "a.jsonl", GOOD + "\n")
    with pytest.raises(SchemaError, match="cannot give rows of this kind") as info:
        read_sources([p], kind="preference")
    assert info.value.field == "kind"


def test_io_sft_without_response(tmp_path):
    p = _write(tmp_path, "prompts.jsonl", '"just a prompt"\n')
    with pytest.raises(SchemaError, match="cannot give rows"):
        read_sources([p], kind="sft")
    q = _write(tmp_path, "alp.jsonl", '{"instruction": "only", "input": ""}\n')
    with pytest.raises(SchemaError) as info:
        read_sources([q], format="alpaca")
    assert info.value.field == "output" and info.value.line == 1


def test_io_bad_gzip_and_bad_parquet(tmp_path):
    p = _write(tmp_path, "x.jsonl.gz", b"not gzip at all")
    with pytest.raises(SchemaError, match="cannot read"):
        read_sources([p])
    q = _write(tmp_path, "x.parquet", b"PAR1garbage")
    with pytest.raises(SchemaError, match="cannot read parquet"):
        read_sources([q])


def test_io_bad_arguments(tmp_path):
    p = _write(tmp_path, "a.jsonl", GOOD + "\n")
    with pytest.raises(ParameterError, match="'format' parameter"):
        read_sources([p], format="nope")
    with pytest.raises(ParameterError, match="'on_error' parameter"):
        read_sources([p], on_error="ignore")
    with pytest.raises(ParameterError, match="'kind' parameter"):
        read_sources([p], kind="pairs")


def test_io_missing_inputs(tmp_path):
    with pytest.raises(SchemaError, match="input not found"):
        expand_inputs([tmp_path / "nope.jsonl"])
    with pytest.raises(SchemaError, match="no data files"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README.md").write_text("x")
    with pytest.raises(SchemaError, match="no data files"):
        expand_inputs([tmp_path / "sub"])


def test_io_detect_format_errors(tmp_path):
    p = _write(tmp_path, "e.json", "")
    with pytest.raises(SchemaError, match="empty"):
        detect_format(p)
    g = tmp_path / "x.json.gz"
    g.write_bytes(gzip.compress(b'{"weird": true}'))
    with pytest.raises(SchemaError, match="unknown record shape"):
        detect_format(g)


def test_io_non_utf8_json_document(tmp_path):
    p = _write(tmp_path, "doc.json", b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xe9t\xe9", "output": "b"}\n]')
    with pytest.raises(SchemaError, match="not valid UTF-8") as info:
        read_sources([p])
    assert info.value.line == 3
    res = read_sources([p], on_error="skip")  # a whole JSON document cannot be read around bad bytes
    assert res.table.height == 0 and res.rejects["source_line"].to_list() == [3]


def test_io_progress_bar_does_not_change_result(tmp_path):
    p = _write(tmp_path, "a.jsonl", f"{GOOD}\n{{bad\n{GOOD2}\n")
    quiet = read_sources([p], on_error="skip")
    loud = read_sources([p], on_error="skip", progress=True)
    assert loud.table.equals(quiet.table) and loud.rejects.equals(quiet.rejects)
