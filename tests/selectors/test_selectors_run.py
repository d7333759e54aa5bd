"""select_files (the body of `curate select`): outputs and bad input."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from curate.errors import RecipeError, SchemaError
from curate.features.store import FeatureSet, FeatureStore
from curate.selectors.run import parse_params, select_files
from curate.testing import toy_table, toy_targets


@pytest.fixture()
def files(tmp_path):
    table = toy_table(30, 0)
    targets = toy_targets(6, 1)
    table.write_parquet(tmp_path / "in.parquet")
    targets.write_parquet(tmp_path / "targets.parquet")
    rng = np.random.default_rng(0)
    FeatureStore(tmp_path / "feat").put(FeatureSet("grad/adam", np.asarray(table["uid"].to_list(), dtype=object),
                                                   rng.normal(size=(30, 4))))
    FeatureSet("t", np.asarray(targets["uid"].to_list(), dtype=object), rng.normal(size=(6, 4))).save(tmp_path / "tfeat")
    FeatureSet("t3", np.asarray(targets["uid"].to_list(), dtype=object), rng.normal(size=(6, 3))).save(tmp_path / "tfeat3")
    return tmp_path, table


def test_selectors_run_outputs(files) -> None:
    d, table = files
    manifest = select_files("bids", d / "in.parquet", d / "out", budget="0.2", features=d / "feat",
                            target_features=d / "tfeat", target=d / "targets.parquet", params={"prune": False})
    cur = pl.read_parquet(d / "out" / "curated.parquet")
    rej = pl.read_parquet(d / "out" / "rejected.parquet")
    sel = pl.read_parquet(d / "out" / "selection.parquet")
    assert cur.height == 6 and rej.height == 24 and sel.height == 30
    assert set(cur["uid"]) | set(rej["uid"]) == set(table["uid"])
    assert (rej["reason"] == "below_budget_cutoff").all() and (rej["step"] == "bids").all()
    assert cur.columns[: len(table.columns)] == table.columns  # then the step's own columns
    assert sel.columns[:3] == ["uid", "score", "keep"] and sorted(cur["bids__rank"]) == list(range(1, 7))
    m = json.loads((d / "out" / "manifest.json").read_text())
    assert m == manifest and m["command"] == "select"
    s = m["selection"]
    assert s["n_kept"] == 6 and s["params"]["prune"] is False and "thi" in s["diagnostics"]


def test_selectors_run_bad_input(files) -> None:
    d, _ = files
    with pytest.raises(RecipeError, match="unknown selector 'nope'"):
        select_files("nope", d / "in.parquet", d / "o", budget=3)
    with pytest.raises(RecipeError, match="unknown parameter"):
        select_files("random", d / "in.parquet", d / "o", budget=3, params={"alpha": 1})
    with pytest.raises(RecipeError, match="budget"):
        select_files("random", d / "in.parquet", d / "o", budget=0)
    with pytest.raises(SchemaError, match="do not match"):
        select_files("less", d / "in.parquet", d / "o", budget=3, features=d / "feat", target_features=d / "tfeat3")
    with pytest.warns(UserWarning, match="exceeds the pool"):
        m = select_files("random", d / "in.parquet", d / "o", budget=100)
    assert m["selection"]["n_kept"] == 30
    assert (d / "o" / "curated.parquet").read_bytes() != b""
    assert parse_params(["mode=otm", "k_nn=5", "w=[1, 2]"]) == {"mode": "otm", "k_nn": 5, "w": [1, 2]}
    with pytest.raises(RecipeError):
        parse_params(["novalue"])
