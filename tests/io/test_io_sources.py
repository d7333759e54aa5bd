"""In-memory data, fsspec URIs, save_to_disk folders, field maps and hub inputs read through the
same detectors and converters as local files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest

import curate
from curate.cli import main
from curate.errors import RecipeError, SchemaError

datasets = pytest.importorskip("datasets")
fsspec = pytest.importorskip("fsspec")

ROWS = [{"instruction": f"question {i}", "input": "" if i % 2 else "context", "output": f"answer {i}", "id": i}
        for i in range(7)]
ROWS.append(dict(ROWS[0], id=100))  # an exact repeat: gets the repeat uid in every form


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _canonical(table: pl.DataFrame) -> pl.DataFrame:
    return table.drop("source", "source_line")


def test_every_input_kind_gives_the_same_canonical_table(tmp_path: Path) -> None:
    ref = curate.read_sources([_jsonl(tmp_path / "pool.jsonl", ROWS)]).table
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    fsspec.filesystem("memory").pipe("memory://curate-test/pool.jsonl", (tmp_path / "pool.jsonl").read_bytes())
    inputs = {
        "dataset": ds,
        "dataset_dict_split": datasets.DatasetDict({"train": ds})["train"],
        "polars": pl.DataFrame(ROWS),
        "pandas": ds.to_pandas(),
        "list": ROWS,
        "save_to_disk": str(tmp_path / "saved"),
        "memory_uri": "memory://curate-test/pool.jsonl",
    }
    assert ref.height == len(ROWS) and ref["uid"].n_unique() == len(ROWS)
    for name, inp in inputs.items():
        table = curate.read_sources(inp).table
        assert table["uid"].to_list() == ref["uid"].to_list(), name
        assert _canonical(table).equals(_canonical(ref)), name
    assert curate.read_sources(pl.DataFrame(ROWS)).table["source"][0] == "<polars.DataFrame>"
    assert curate.read_sources(pl.DataFrame(ROWS)).table["source_line"].to_list() == list(range(len(ROWS)))
    assert curate.read_sources("memory://curate-test/pool.jsonl").table["source"][0] == "memory://curate-test/pool.jsonl"


def test_mixed_inputs_keep_uids_unique_without_collisions(tmp_path: Path) -> None:
    # each input holds the same row twice; a second read of the renamed repeat must not collide
    res = curate.read_sources([ROWS, pl.DataFrame(ROWS), _jsonl(tmp_path / "p.jsonl", ROWS)])
    assert res.table.height == 3 * len(ROWS)
    assert res.table["uid"].n_unique() == res.table.height


def test_in_memory_errors_name_the_row_and_field() -> None:
    bad = [ROWS[0], {"instruction": "x", "output": 5}]
    with pytest.raises(SchemaError, match=r"<list> row 1, field 'output': wrong type"):
        curate.read_sources(bad)
    with pytest.raises(SchemaError, match=r"<polars\.DataFrame> row 0, field 'output': wrong type"):
        curate.read_sources(pl.DataFrame({"instruction": ["a", "b"], "output": [1, 2]}))
    res = curate.read_sources(bad, on_error="skip")
    assert res.table.height == 1 and res.rejects["source_line"].to_list() == [1]
    with pytest.raises(SchemaError, match=r"<list> row 0: unknown record shape"):
        curate.read_sources([{"foo": 1}])


def test_map_reads_unknown_shapes_from_files_and_memory(tmp_path: Path) -> None:
    rows = [{"ask": "What is 2+2?", "reply": "4", "qid": "a"}, {"ask": "Capital of France?", "reply": "Paris"}]
    with pytest.raises(SchemaError, match="unknown record shape"):
        curate.read_sources(rows)
    expected = curate.read_sources([{"instruction": r["ask"], "output": r["reply"]} for r in rows]).table["uid"]
    for inp in (rows, _jsonl(tmp_path / "qa.jsonl", rows)):
        table = curate.read_sources(inp, map={"prompt": "ask", "response": "reply"}).table
        assert table["uid"].to_list() == expected.to_list()
    with pytest.raises(SchemaError, match=r"qa\.jsonl:2, field 'qid': mapped field missing"):
        curate.read_sources(tmp_path / "qa.jsonl", map=["prompt=ask", "response=reply", "id=qid"])
    with pytest.raises(ValueError, match="cannot map to 'bogus'"):
        curate.read_sources(rows, map=["bogus=ask"])
    out = tmp_path / "qa.parquet"
    assert main(["ingest", str(tmp_path / "qa.jsonl"), "-o", str(out), "--map", "prompt=ask",
                 "--map", "response=reply"]) == 0
    assert pl.read_parquet(out)["uid"].to_list() == expected.to_list()
    assert main(["ingest", str(tmp_path / "qa.jsonl"), "-o", str(tmp_path / "x.parquet"), "--map", "nope"]) == 2
    assert not (tmp_path / "x.parquet").exists()


def test_save_to_disk_dataset_dict_needs_a_split(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]), "test": datasets.Dataset.from_list(ROWS[3:5])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SchemaError, match="several splits"):
        curate.read_sources(str(tmp_path / "dd"))
    assert curate.read_sources(str(tmp_path / "dd"), split="test").table.height == 2
    with pytest.raises(SchemaError, match="several splits"):
        curate.read_sources(dd)


def _recipe(inputs: list, tmp_path: Path) -> Any:
    return curate.parse_recipe({"name": "mem", "inputs": inputs, "output": str(tmp_path / "runs"),
                                "steps": [{"use": "kind_filter", "kinds": ["sft"]}]}, base=tmp_path)


def test_run_recipe_takes_in_memory_data_and_keys_it_by_content(tmp_path: Path) -> None:
    file_run = curate.run_recipe(_recipe([str(_jsonl(tmp_path / "p.jsonl", ROWS))], tmp_path))
    mem = _recipe([{"data": pl.DataFrame(ROWS)}], tmp_path)
    run = curate.run_recipe(mem)
    a = pl.read_parquet(file_run.run_dir / "curated.parquet")
    b = pl.read_parquet(run.run_dir / "curated.parquet")
    assert a["uid"].to_list() == b["uid"].to_list()
    entry = run.manifest["inputs"][0]
    assert entry["path"] == "<polars.DataFrame>" and len(entry["sha256"]) == 64
    assert run.manifest["recipe"]["inputs"][0]["data_sha256"] == entry["sha256"]
    # other rows -> another recipe hash (run folder); the same rows -> the same one
    assert _recipe([{"data": ROWS[:3]}], tmp_path).hash() != mem.hash()
    assert _recipe([datasets.Dataset.from_list(ROWS)], tmp_path).hash() != mem.hash()  # label differs
    assert _recipe([{"data": pl.DataFrame(ROWS)}], tmp_path).hash() == mem.hash()


def test_plain_recipe_resolves_as_before(tmp_path: Path) -> None:
    rec = _recipe([{"path": "p.jsonl", "sample": 3}], tmp_path)
    assert rec.resolved()["inputs"] == [{"path": str(tmp_path / "p.jsonl"), "format": "auto", "kind": None, "sample": 3}]
    with pytest.raises(RecipeError, match="exactly one of 'path', 'hub', 'data'"):
        _recipe([{"path": "p.jsonl", "hub": "a/b"}], tmp_path)
    with pytest.raises(RecipeError, match="needs 'split'"):
        _recipe([{"hub": "a/b"}], tmp_path)


class _FakeHub:
    """Stands in for HfApi.dataset_info and datasets.load_dataset (no network)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows, self.calls = rows, []

    def dataset_info(self, repo_id, *, revision=None, files_metadata=False, **kw):  # noqa: ANN001, ANN003
        self.calls.append(("info", repo_id, revision))
        sib = [SimpleNamespace(rfilename="data/train-00000.parquet", size=123, blob_id="b1",
                               lfs=SimpleNamespace(sha256="f" * 64)),
               SimpleNamespace(rfilename="README.md", size=10, blob_id="b2", lfs=None)]
        return SimpleNamespace(sha="a" * 40, siblings=sib)

    def load_dataset(self, repo, config=None, *, split, revision):  # noqa: ANN001
        self.calls.append(("load", repo, config, split, revision))
        return datasets.Dataset.from_list(self.rows)


def test_hub_input_records_repo_revision_and_file_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from curate.io import hub

    fake = _FakeHub(ROWS)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: fake.dataset_info(*a, **k))
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    monkeypatch.setattr(hub, "_LOADED", {})
    rec = _recipe([{"hub": "org/pool", "split": "train", "revision": "v1", "sample": 4}], tmp_path)
    run = curate.run_recipe(rec)
    entry = run.manifest["inputs"][0]
    assert entry["hub"] == "org/pool" and entry["revision"] == "v1" and entry["resolved_revision"] == "a" * 40
    assert entry["files"] == [{"path": "data/train-00000.parquet", "size": 123, "sha256": "f" * 64}]
    assert ("load", "org/pool", None, "train", "a" * 40) in fake.calls  # loaded at the resolved sha
    assert [c[0] for c in fake.calls].count("info") == 1
    table = pl.read_parquet(run.run_dir / "steps" / "00-ingest" / "table.parquet")
    assert table.height == 4 and set(table["source"]) == {"hub:org/pool/train"}


def test_local_recipes_never_touch_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", boom)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    run = curate.run_recipe(_recipe([str(_jsonl(tmp_path / "p.jsonl", ROWS))], tmp_path))
    assert run.n_curated == len(ROWS)


def test_parquet_is_read_in_batches_with_the_file_readers_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from curate.io import readers, sources

    rows = [dict(r, extra={"k": i}) for i, r in enumerate(ROWS)]
    pl.DataFrame(rows).write_parquet(tmp_path / "a.parquet")
    _jsonl(tmp_path / "b.jsonl", ROWS)
    old = readers.read_sources([tmp_path / "a.parquet", tmp_path / "b.jsonl"])
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)  # several record batches
    new = curate.read_sources([tmp_path / "a.parquet", tmp_path / "b.jsonl"])
    assert new.table.equals(old.table)  # same rows, sources, 1-based row numbers and uids
    assert new.formats == old.formats and new.files == old.files
    pl.DataFrame(schema={"instruction": pl.Utf8, "output": pl.Utf8}).write_parquet(tmp_path / "empty.parquet")
    with pytest.raises(SchemaError, match=r"empty\.parquet: the file is empty"):
        curate.read_sources(tmp_path / "empty.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SchemaError, match=r"bad\.parquet: cannot read parquet"):
        curate.read_sources(tmp_path / "bad.parquet")
    skipped = curate.read_sources([tmp_path / "bad.parquet", tmp_path / "a.parquet"], on_error="skip")
    assert skipped.table.height == len(ROWS) and skipped.rejects["source"].to_list() == [str(tmp_path / "bad.parquet")]
    with pytest.raises(SchemaError, match=r"a\.parquet:2, field 'output': missing field"):
        pl.DataFrame([ROWS[0], dict(ROWS[1], output=None)]).write_parquet(tmp_path / "a.parquet")
        curate.read_sources(tmp_path / "a.parquet")
