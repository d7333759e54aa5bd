"""Feature-folder arguments of `curate select` / `curate whiten`: a store folder or one set's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.cli import main
from curate.errors import MissingFeatureError
from curate.features.store import FeatureSet, FeatureStore
from curate.selectors.run import resolve_feature_set
from curate.testing import toy_table, toy_targets


@pytest.fixture
def embedded(tmp_path: Path) -> dict[str, Path]:
    """A 60-row pool and 9 targets embedded with the hashing embedder into stores feats/ and tfeats/."""
    pool, tgt = tmp_path / "pool.parquet", tmp_path / "target.parquet"
    toy_table(60, 0).write_parquet(pool)
    toy_targets(9, 1).write_parquet(tgt)
    for src, out in ((pool, "feats"), (tgt, "tfeats")):
        assert main(["embed", str(src), "-o", str(tmp_path / out), "--field", "prompt", "--model", "hashing:64"]) == 0
    assert sorted(p.name for p in (tmp_path / "feats").iterdir()) == ["embed__prompt"]
    return {"dir": tmp_path, "pool": pool, "target": tgt, "feats": tmp_path / "feats", "tfeats": tmp_path / "tfeats"}


def _select(name: str, d: dict[str, Path], out: str, features: Path, target_features: Path | None = None,
            *extra: str) -> pl.DataFrame:
    args = ["select", name, str(d["pool"]), "-o", str(d["dir"] / out), "--budget", "12", "--features", str(features)]
    if target_features is not None:
        args += ["--target-features", str(target_features)]
    assert main([*args, *extra]) == 0
    return pl.read_parquet(d["dir"] / out / "selection.parquet")


def test_select_store_folder_equals_set_folder(embedded, capsys) -> None:
    d = embedded
    store = _select("tarot", d, "tarot_store", d["feats"], d["tfeats"])
    inner = _select("tarot", d, "tarot_inner", d["feats"] / "embed__prompt", d["tfeats"] / "embed__prompt")
    assert store.equals(inner) and store["keep"].sum() > 0
    manifest = json.loads((d["dir"] / "tarot_store" / "manifest.json").read_text())
    assert manifest["selection"]["features"] == {"feats": "embed/prompt", "target_feats": "embed/prompt"}
    feats = manifest["recipe"]["steps"][0]["features"]  # the folders the store arguments resolved to
    assert feats == {"feats": str((d["feats"] / "embed__prompt").resolve()),
                     "target_feats": str((d["tfeats"] / "embed__prompt").resolve())}
    k_store = _select("kcenter", d, "kc_store", d["feats"])
    k_inner = _select("kcenter", d, "kc_inner", d["feats"] / "embed__prompt")
    assert k_store.equals(k_inner) and int(k_store["keep"].sum()) == 12


def test_select_recipe_store_pairs_pool_and_targets(embedded) -> None:
    """A store holding ``X`` and ``X/targets`` (what a recipe run writes) serves both roles."""
    d = embedded
    both = d["dir"] / "both"
    t = FeatureSet.load(d["tfeats"] / "embed__prompt")
    FeatureStore(both).put(FeatureSet.load(d["feats"] / "embed__prompt"))
    FeatureStore(both).put(FeatureSet("embed/prompt/targets", t.uids, np.asarray(t.values), dict(t.meta)))
    one = _select("tarot", d, "one", both, both)
    ref = _select("tarot", d, "ref", d["feats"] / "embed__prompt", d["tfeats"] / "embed__prompt")
    assert one.equals(ref)
    # the same store through `curate whiten` (pool X, target X/targets)
    assert main(["whiten", str(both), "--target", str(both), "-o", str(d["dir"] / "w"), "--json"]) == 0
    assert FeatureStore(d["dir"] / "w").names() == ["embed/prompt/whitened", "embed/prompt/whitened/targets"]


def test_select_store_with_two_sets_exits_2_and_lists_them(embedded, capsys) -> None:
    d = embedded
    assert main(["embed", str(d["pool"]), "-o", str(d["feats"]), "--field", "response", "--model", "hashing:64"]) == 0
    capsys.readouterr()
    args = ["select", "kcenter", str(d["pool"]), "-o", str(d["dir"] / "x"), "--budget", "12", "--features",
            str(d["feats"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "embed/prompt" in err and "embed/response" in err
    assert str(d["feats"] / "embed__prompt") in err  # how to pick: point at one set's folder
    assert not (d["dir"] / "x").exists()
    # pointing at one set's folder works
    assert main([*args[:-1], str(d["feats"] / "embed__response")]) == 0
    # tarot with both stores ambiguous on the pool side
    assert main(["select", "tarot", str(d["pool"]), "-o", str(d["dir"] / "y"), "--budget", "12", "--features",
                 str(d["feats"]), "--target-features", str(d["tfeats"])]) == 2
    assert "--features" in capsys.readouterr().err


def test_resolve_feature_set_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFeatureError, match="does not exist"):
        resolve_feature_set(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFeatureError, match="holds no feature set"):
        resolve_feature_set(tmp_path / "empty", label="--target-features")
    store = FeatureStore(tmp_path / "s")
    uids = np.asarray(["a", "b"], dtype=object)
    store.put(FeatureSet("grad/sgd/targets", uids, np.zeros((2, 3), np.float32)))
    # a store with only a target set: fine for the target side, not for the pool side
    assert resolve_feature_set(store.root, target=True).name == "grad/sgd/targets"
    with pytest.raises(MissingFeatureError, match="which pool set"):
        resolve_feature_set(store.root)
    store.put(FeatureSet("grad/sgd", uids, np.ones((2, 3), np.float32)))
    store.put(FeatureSet("grad/adam", uids, np.ones((2, 3), np.float32)))
    assert resolve_feature_set(store.root, names=["grad/adam"]).name == "grad/adam"
    assert resolve_feature_set(store.root, target=True, pool_name="grad/sgd").name == "grad/sgd/targets"
    with pytest.raises(MissingFeatureError, match=r"none of them 'embed/x'.*choose one with --name"):
        resolve_feature_set(store.root, names=["embed/x"], choose="--name")
