"""Run.to_hf(), the dataset card and `curate push` against a local stand-in for the Hub API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

import curate
from curate.cli import main

datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")

ROWS = [{"instruction": f"task {i}", "input": "", "output": f"answer {i % 9}"} for i in range(40)]
ROWS += [dict(ROWS[0]), dict(ROWS[1])]  # two exact duplicates, dropped by exact_dedup


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("push")
    (tmp / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rec = curate.parse_recipe({"name": "pushme", "seed": 3, "inputs": ["pool.jsonl"], "output": str(tmp / "runs"),
                               "steps": [{"use": "exact_dedup", "level": "pair"}, {"use": "minhash_dedup"},
                                         {"use": "random", "name": "select", "budget": 10}]}, base=tmp)
    return curate.run_recipe(rec).run_dir


class StandInHub:
    """Records create_repo / upload_folder and keeps a copy of each uploaded folder (no network)."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kw):  # noqa: ANN001, ANN003
        self.calls.append(("create_repo", repo_id, repo_type, private))
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kw):  # noqa: ANN001, ANN003
        self.calls.append(("upload_folder", repo_id, repo_type, commit_message))
        dest = self.root / repo_id
        shutil.copytree(folder_path, dest, dirs_exist_ok=True)
        return f"https://huggingface.co/datasets/{repo_id}/commit/0"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInHub:
    fake = StandInHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: fake.create_repo(*a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, *a, **k: fake.upload_folder(*a, **k))
    return fake


def test_to_hf_round_trips_the_curated_and_rejected_rows(run_dir: Path) -> None:
    run = curate.load_run(run_dir)
    dd = run.to_hf()
    assert set(dd) == {"curated", "rejected"}
    back = pl.from_arrow(dd["curated"].with_format("arrow")[:])
    assert back.equals(pl.read_parquet(run_dir / "curated.parquet"))
    assert back.height == 10
    rej = pl.from_arrow(dd["rejected"].with_format("arrow")[:])
    assert rej["uid"].to_list() == run.rejected()["uid"].to_list()
    assert rej.height == len(ROWS) - 10 and set(rej["step"]) >= {"exact_dedup", "select"}


def test_push_uploads_the_files_and_a_valid_card(run_dir: Path, hub: StandInHub) -> None:
    assert main(["push", str(run_dir), "me/pushed", "--private", "--include-rejected", "--json"]) == 0
    assert hub.calls[0] == ("create_repo", "me/pushed", "dataset", True)
    assert hub.calls[1][:3] == ("upload_folder", "me/pushed", "dataset")
    repo = hub.root / "me" / "pushed"
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    assert files == ["README.md", "data/curated.parquet", "data/rejected.parquet", "manifest.json",
                     "recipe.resolved.yaml", "report.html"]
    assert pl.read_parquet(repo / "data" / "curated.parquet").equals(pl.read_parquet(run_dir / "curated.parquet"))
    card = huggingface_hub.DatasetCard.load(repo / "README.md", ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "curated", "path": "data/curated.parquet"}, {"split": "rejected", "path": "data/rejected.parquet"}]}]
    assert [s["num_examples"] for s in meta["dataset_info"]["splits"]] == [10, len(ROWS) - 10]
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other"
    # the body: the funnel with its drop reasons, the selector and budget, the seed, citations
    assert "| exact_dedup | 42 | 40 |" in card.text
    assert "`select` (random): budget `10`" in card.text and "seed 3" in card.text
    assert "Deduplicating Training Data Makes Language Models Better" in card.text  # minhash_dedup's method
    assert "pool.jsonl" in card.text
    # the same card parses back through huggingface_hub's own metadata reader
    assert huggingface_hub.metadata_load(repo / "README.md")["pretty_name"] == "pushme"


def test_push_in_a_trainer_format_and_card_locally(run_dir: Path, hub: StandInHub, tmp_path: Path) -> None:
    assert main(["push", str(run_dir), "me/trl", "--format", "trl"]) == 0
    data = pl.read_parquet(hub.root / "me" / "trl" / "data" / "curated.parquet")
    assert data.columns == ["messages", "uid"] and data.height == 10
    assert not (hub.root / "me" / "trl" / "data" / "rejected.parquet").exists()
    assert main(["card", str(run_dir), "-o", str(tmp_path / "card.md")]) == 0
    assert huggingface_hub.DatasetCard.load(tmp_path / "card.md").data.pretty_name == "pushme"
    assert main(["push", str(run_dir), "not-a-repo"]) == 2
    assert main(["push", str(tmp_path), "me/x"]) == 2  # not a run folder
