"""The curation CLI verbs (run through click directly; curate.cli wires them in)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from curate.cli.curation import decontam, dedup, filter_, pii
from curate.errors import ParameterError
from curate.schema import dedupe_uids, make_record, message, to_frame


def _table(tmp_path):
    rows = [make_record("sft", messages=[message("user", p), message("assistant", r)], source="x", source_line=i)
            for i, (p, r) in enumerate([("What is 2+2?", "Four, since two plus two is four."),
                                         ("What is 2+2?", "Four, since two plus two is four."),
                                         ("Email me", "Sure: a@b.co"),
                                         ("As an AI?", "As an AI language model, I cannot.")])]
    dedupe_uids(rows)
    path = tmp_path / "in.parquet"
    to_frame(rows).write_parquet(path)
    return path


def test_dedup_filter_pii(tmp_path):
    src = _table(tmp_path)
    res = CliRunner().invoke(dedup, [str(src), "-o", str(tmp_path / "d"), "--exact", "pair", "--minhash", "--json"])
    assert res.exit_code == 0, res.output
    man = json.loads(res.output)
    assert man["rows"] == {"input": 4, "curated": 3, "rejected": 1}
    rej = pl.read_parquet(tmp_path / "d" / "rejected.parquet")
    assert rej["step"].to_list() == ["exact_dedup"]
    for name in ("curated.parquet", "clusters.parquet", "manifest.json"):
        assert (tmp_path / "d" / name).exists()
    res = CliRunner().invoke(filter_, [str(src), "-o", str(tmp_path / "f"), "--rule", "max_chars=1000", "--json"])
    assert json.loads(res.output)["rows"]["rejected"] == 1
    assert pl.read_parquet(tmp_path / "f" / "rejected.parquet")["reason"][0].startswith("refusal:")
    res = CliRunner().invoke(pii, [str(src), "-o", str(tmp_path / "p"), "--redact", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["steps"][1]["pii"]["counts"]["email"] == 1
    cur = pl.read_parquet(tmp_path / "p" / "curated.parquet")
    assert "[EMAIL]" in cur["messages"][2][1]["content"]


def test_bad_parameters_raise(tmp_path):
    src = _table(tmp_path)
    res = CliRunner().invoke(dedup, [str(src), "-o", str(tmp_path / "d"), "--minhash", "--threshold", "1.5"])
    assert isinstance(res.exception, ParameterError)
    res = CliRunner().invoke(dedup, [str(src), "-o", str(tmp_path / "d"), "--minhash", "--ngram", "0"])
    assert isinstance(res.exception, ParameterError)
    res = CliRunner().invoke(decontam, [str(src), "--against", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")])
    assert isinstance(res.exception, (ParameterError, FileNotFoundError))
    res = CliRunner().invoke(filter_, [str(src), "-o", str(tmp_path / "f"), "--rule", "nope=1"])
    assert isinstance(res.exception, ParameterError)


@pytest.mark.parametrize("argv", [["dedup", "IN", "-o", "OUT", "--minhash", "--threshold", "0"]])
def test_exit_code_two_through_main(tmp_path, argv):
    from curate import cli as main_cli

    if "dedup" not in main_cli.cli.commands:
        pytest.skip("curate.cli does not attach the curation verbs yet")
    argv = [str(_table(tmp_path)) if a == "IN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main_cli.main(argv) == 2
