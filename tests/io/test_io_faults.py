"""Hostile inputs and machine faults at the edges of curate: each is a clear exit-2 error naming
the place (file:line, field, path), never "internal error"; nothing is left half-written; outputs
get the umask's permissions; globs and folders read each real file once."""

from __future__ import annotations

import errno
import json
import os
import stat

import polars as pl
import pytest

from curate.cli import main
from curate.errors import SchemaError
from curate.io import expand_inputs, read_sources
from curate.schema import MAX_JSON_DEPTH, canonical_json, make_record

GOOD = {"instruction": "add 2 and 2", "input": "", "output": "4"}
GOOD2 = {"instruction": "add 3 and 3", "input": "", "output": "6"}


def _deep_text(levels: int) -> str:
    return "[" * levels + "]" * levels


def _with_extra(raw_value: str) -> str:
    return json.dumps({**GOOD, "instruction": "other"})[:-1] + f', "extra": {raw_value}}}'


# (case, JSON text of the bad record, field named)
HOSTILE = [
    ("surrogate", '{"instruction": "a\\ud800b", "input": "", "output": "4"}', "instruction"),
    ("surrogate_low", '{"instruction": "q", "input": "", "output": "\\udfff"}', "output"),
    ("surrogate_key", '{"instruction": "q", "input": "", "output": "4", "meta": {"k\\udc00": 1}}', "meta"),
    ("deep_300", _with_extra(_deep_text(300)), "extra"),
    ("deep_100000", _with_extra(_deep_text(100_000)), "extra"),
    ("huge_int", _with_extra("9" * 4301), "extra"),
    ("huge_negative_int", _with_extra("-" + "1" * 9000), "extra"),
]


@pytest.mark.parametrize(("case", "bad", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("container", ["jsonl", "json"])
def test_io_hostile_record_is_a_row_error(tmp_path, capsys, case, bad, field, container):
    src = tmp_path / f"in.{container}"
    records = [json.dumps(GOOD), bad, json.dumps(GOOD2)]
    src.write_text("\n".join(records) + "\n" if container == "jsonl" else "[" + ",\n".join(records) + "]")
    with pytest.raises(SchemaError) as info:
        read_sources([src])
    assert (info.value.file, info.value.line, info.value.field) == (str(src), 2, field)
    res = read_sources([src], on_error="skip")  # one bad record never aborts the read
    assert res.table["source_line"].to_list() == [1, 3]
    assert res.rejects["source_line"].to_list() == [2] and res.rejects["field"].to_list() == [field]
    out = tmp_path / "out.parquet"
    assert main(["ingest", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2, field '{field}'" in err and "internal error" not in err and not out.exists()
    assert main(["ingest", str(src), "-o", str(out), "--on-error", "skip"]) == 0
    assert pl.read_parquet(tmp_path / "out.rejected.parquet")["source_line"].to_list() == [2]


def test_io_nesting_below_the_limit_is_kept(tmp_path):
    src = tmp_path / "ok.jsonl"
    src.write_text(_with_extra(_deep_text(MAX_JSON_DEPTH - 1)) + "\n" + _with_extra("9" * 4300) + "\n")
    res = read_sources([src])
    assert res.table.height == 2 and res.rejects.height == 0


def test_schema_canonical_json_refuses_what_it_cannot_hash():
    deep: object = "x"
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = [deep]
    with pytest.raises(SchemaError, match="nested too deeply"):
        canonical_json({"a": deep})
    with pytest.raises(SchemaError, match="lone surrogate") as info:
        make_record("sft", messages=[{"role": "user", "content": "q\ud800"}, {"role": "assistant", "content": "a"}],
                    source="f.jsonl", source_line=4)
    assert info.value.file == "f.jsonl" and info.value.line == 4
    assert canonical_json({"b": 1, "a": ["é"]}) == '{"a":["é"],"b":1}'


def test_io_trl_rejected_without_chosen_is_an_error(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p", "rejected": "bad answer"}) + "\n")
    with pytest.raises(SchemaError) as info:
        read_sources([src])
    assert (info.value.line, info.value.field) == (1, "chosen")
    later = tmp_path / "later.jsonl"  # a file read as prompts whose later row is half a pair
    later.write_text(json.dumps({"prompt": "p"}) + "\n" + json.dumps({"prompt": "q", "chosen": "c"}) + "\n")
    with pytest.raises(SchemaError) as info:
        read_sources([later])
    assert (info.value.line, info.value.field) == (2, "rejected")
    assert main(["ingest", str(src), "-o", str(tmp_path / "o.parquet")]) == 2


def test_io_stale_rejected_file_is_removed_by_a_clean_ingest(tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{broken\n")
    out = tmp_path / "out.parquet"
    rejected = tmp_path / "out.rejected.parquet"
    assert main(["ingest", str(bad), "-o", str(out), "--on-error", "skip"]) == 0 and rejected.exists()
    bad.write_text(json.dumps(GOOD) + "\n")
    assert main(["ingest", str(bad), "-o", str(out), "--on-error", "skip"]) == 0
    assert not rejected.exists()


def test_io_csv_field_over_128_kib(tmp_path):
    import csv

    text = "long answer " * 20_000  # 240 kB, over the csv module's 128 KiB default
    src = tmp_path / "big.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["q", "", text])
    res = read_sources([src])
    assert res.table["messages"][0][1]["content"] == text


def test_io_glob_follows_each_real_path_once(tmp_path):
    root = tmp_path / "data"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.jsonl").write_text(json.dumps(GOOD) + "\n")
    (root / "a" / "y.jsonl").write_text(json.dumps(GOOD2) + "\n")
    (root / "a" / "b" / "up").symlink_to("../..")  # a loop: glob's ** recurses through it until ELOOP
    (root / "a" / "b" / "again").symlink_to("../b")
    (root / "alias").symlink_to("a")  # the same real folder under two names
    (root / "x_link.jsonl").symlink_to("a/b/x.jsonl")
    expected = {os.path.realpath(root / "a" / "b" / "x.jsonl"), os.path.realpath(root / "a" / "y.jsonl")}
    for pattern in (f"{root}/**/*.jsonl", f"{root}/**", str(root)):
        files = expand_inputs([pattern])
        assert len(files) == 2 and {os.path.realpath(f) for f in files} == expected, (pattern, files)
    files = expand_inputs([f"{root}/**/b/*.jsonl"])
    assert [f.name for f in files] == ["x.jsonl"]
    assert read_sources([f"{root}/**/*.jsonl"]).table.height == 2


def test_io_outputs_follow_the_umask(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(GOOD) + "\n")
    old = os.umask(0o002)
    try:
        assert main(["ingest", str(src), "-o", str(tmp_path / "shared.parquet")]) == 0
        os.umask(0o077)
        assert main(["ingest", str(src), "-o", str(tmp_path / "private.parquet")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "shared.parquet").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(tmp_path / "private.parquet").st_mode) == 0o600


def test_io_atomic_dir_follows_the_umask(tmp_path):
    from curate.io.writers import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "feat") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "feat").st_mode) == 0o755


# ----------------------------------------------------------------------------- machine faults
@pytest.fixture()
def pool(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({**GOOD, "instruction": f"q{i}"}) + "\n" for i in range(10)))
    out = tmp_path / "pool.parquet"
    assert main(["ingest", str(src), "-o", str(out)]) == 0
    return src, out


def _fail_writes(monkeypatch, exc):
    import polars

    def boom(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(polars.DataFrame, "write_parquet", boom)


@pytest.mark.parametrize(("exc", "words"), [
    (PermissionError(errno.EACCES, "Permission denied", "/x/out.parquet"), ["Permission denied", "/x/out.parquet"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["No space left", "free space"]),
    (OSError(errno.EROFS, "Read-only file system"), ["Read-only"]),
    # what polars raises when the disk fills under it
    (pl.exceptions.ComputeError("parquet: File out of specification: underlying IO error: No space left on device "
                                "(os error 28)"), ["No space left", "free space"]),
], ids=["eacces", "enospc", "erofs", "polars-enospc"])
def test_io_write_failures_are_exit_2_and_leave_nothing(tmp_path, capsys, monkeypatch, pool, exc, words):
    src, _ = pool
    _fail_writes(monkeypatch, exc)
    out = tmp_path / "o" / "out.parquet"
    assert main(["ingest", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and all(w in err for w in words), err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_io_output_under_a_file(tmp_path, capsys, pool):
    src, table = pool
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["ingest", str(src), "-o", str(blocker / "out.parquet")]) == 2
    assert main(["select", "random", str(table), "-o", str(blocker / "sel"), "--budget", "2"]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and str(blocker) in err and blocker.read_text() == "x"


@pytest.mark.parametrize(("budget", "words"), [
    ("inf", ["finite"]), ("nan", ["finite"]), ("-inf", ["finite"]),
    ("0.0001", ["selects 0 of the pool's 10 rows", "at least 0.1"]),
])
def test_select_bad_budget(tmp_path, capsys, pool, budget, words):
    _, table = pool
    out = tmp_path / "sel"
    assert main(["select", "random", str(table), "-o", str(out), "--budget", budget]) == 2
    err = capsys.readouterr().err
    assert "internal error" not in err and all(w in err for w in words), err
    assert not out.exists()


def test_select_on_a_non_parquet_file_or_an_empty_pool(tmp_path, capsys, pool):
    src, table = pool
    assert main(["select", "random", str(src), "-o", str(tmp_path / "a"), "--budget", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{src}: the pool is not a readable parquet file" in err and "internal error" not in err
    empty = tmp_path / "empty.parquet"
    pl.read_parquet(table).head(0).write_parquet(empty)
    assert main(["select", "random", str(empty), "-o", str(tmp_path / "b"), "--budget", "0.5"]) == 2
    assert f"{empty}: the pool is empty" in capsys.readouterr().err
    assert main(["select", "random", str(table), "-o", str(tmp_path / "c"), "--budget", "2",
                 "--target", str(src)]) == 2
    assert "the target table is not a readable parquet file" in capsys.readouterr().err
    assert main(["select", "random", str(table), "-o", str(tmp_path / "d"), "--budget", "0.1"]) == 0
