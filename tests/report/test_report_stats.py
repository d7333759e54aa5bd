"""Numbers behind the report, against hand-worked values and exact references."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.features.store import FeatureSet
from curate.report import stats as st
from curate.schema import make_record, to_frame


def _rows(n: int = 6) -> pl.DataFrame:
    recs = [make_record("sft", messages=[{"role": "user", "content": f"question {i} " + "x" * i},
                                         {"role": "assistant", "content": "a" * (10 * i + 1)}],
                        source=f"/data/src{i % 2}.jsonl", source_line=i + 1) for i in range(n)]
    return to_frame(recs)


def test_pca_matches_svd_reference_and_planted_line() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1, 0.1])
    coords, ratio = st.pca_2d(x)
    # reference: eigen-decomposition of the covariance matrix
    xc = x - x.mean(0)
    w, v = np.linalg.eigh(xc.T @ xc)
    order = np.argsort(w)[::-1]
    ref = xc @ v[:, order[:2]]
    for k in range(2):  # equal up to the sign of each component
        assert np.allclose(np.abs(coords[:, k]), np.abs(ref[:, k]), atol=1e-9)
    assert np.allclose(ratio, w[order[:2]] / w.sum())
    # row-order invariance (coordinates follow their rows)
    perm = rng.permutation(50)
    c2, _ = st.pca_2d(x[perm])
    assert np.allclose(c2, coords[perm], atol=1e-9)
    # points on a line: one component explains everything
    t = np.linspace(-1, 1, 20)[:, None]
    _, r_line = st.pca_2d(t * np.array([[1.0, 2.0, -3.0]]) + 7.0)
    assert r_line[0] == pytest.approx(1.0) and r_line[1] == pytest.approx(0.0, abs=1e-12)
    # degenerate inputs give zeros, not errors
    assert st.pca_2d(np.ones((1, 4)))[0].shape == (1, 2)
    assert np.all(st.pca_2d(np.arange(5.0)[:, None])[0][:, 1] == 0)


def test_cluster_summary_sizes_and_examples() -> None:
    rows = _rows(6).with_columns(
        pl.Series("d__cluster_id", ["c1", "c1", "c1", "c2", "c3", None]),
        pl.Series("d__keep", [False, True, False, True, True, None]),
        pl.lit(True).alias("_kept"),
    )
    cs = st.cluster_summary(rows, "d__cluster_id", per_cluster=2)
    assert cs["step"] == "d"
    assert cs["size_counts"] == {1: 2, 3: 1}
    assert (cs["n_clusters"], cs["n_rows"], cs["n_multi"]) == (3, 5, 1)
    assert len(cs["largest"]) == 1
    big = cs["largest"][0]
    assert big["cluster_id"] == "c1" and big["size"] == 3
    uids = rows["uid"].to_list()
    # the row the step kept comes first, then by uid; at most per_cluster rows
    assert big["members"][0] == {"uid": uids[1], "kept": True, "text": st.texts(rows[1], "prompt+response")[0]}
    assert big["members"][1]["uid"] == min(uids[0], uids[2]) and not big["members"][1]["kept"]
    assert len(big["members"]) == 2


def test_composition_counts_and_shares_against_targets() -> None:
    rows = _rows(6).with_columns(pl.Series("_kept", [True, True, False, False, False, True]))
    targets = to_frame([make_record("target", messages=[{"role": "user", "content": f"t{i}"}], task=t)
                        for i, t in enumerate(["gsm8k", "gsm8k", "mmlu"])])
    comp = {c["column"]: c for c in st.composition(rows, targets)}
    assert set(comp) == {"source", "kind", "task"}
    src = {r["value"]: r for r in comp["source"]["rows"]}
    # src0: rows 0,2,4 (kept: 0) ; src1: rows 1,3,5 (kept: 1,5)
    assert src["src0.jsonl"]["input"] == 3 and src["src0.jsonl"]["curated"] == 1
    assert src["src1.jsonl"]["curated"] == 2 and src["src1.jsonl"]["curated_share"] == pytest.approx(2 / 3)
    assert src["src0.jsonl"]["input_share"] == pytest.approx(0.5)
    task = {r["value"]: r for r in comp["task"]["rows"]}
    assert comp["task"]["has_targets"]
    assert task["gsm8k"]["target"] == 2 and task["gsm8k"]["target_share"] == pytest.approx(2 / 3)
    assert task["(none)"]["input"] == 6 and task["gsm8k"]["input"] == 0
    assert not comp["source"]["has_targets"]  # target files are not pool sources
    assert comp["kind"]["rows"] == [{"value": "sft", "input": 6, "curated": 3, "input_share": 1.0,
                                     "curated_share": 1.0, "target": None, "target_share": None}]
    # no targets, no task anywhere: the task breakdown is left out
    assert {c["column"] for c in st.composition(rows, None)} == {"source", "kind"}


def test_score_split_by_the_steps_own_keep() -> None:
    rows = _rows(5).with_columns(
        pl.Series("s__score", [0.1, 0.9, None, float("nan"), 0.5]),
        pl.Series("s__keep", [False, True, None, True, True]),
        pl.lit(False).alias("_kept"),
    )
    split = st.score_split(rows, "s__score")
    assert split["kept"].tolist() == [0.9, 0.5]
    assert split["dropped"].tolist() == [0.1]
    assert st.score_columns(rows) == ["s__score"]


def test_samples_group_reason_categories_in_step_order() -> None:
    rows = _rows(6).with_columns(
        pl.Series("_kept", [False] * 5 + [True]),
        pl.Series("step", ["b", "b", "b", "a", "b", None]),
        pl.Series("reason", ["too long: 12 chars", "too long: 99 chars", "too long: 5 chars", "dup of x", "other", None]),
    )
    groups = st.samples_per_reason(rows, step_order=["a", "b"], per_reason=2)
    assert [(g["step"], g["reason"], g["count"]) for g in groups] == [
        ("a", "dup of x", 1), ("b", "too long: # chars", 3), ("b", "other", 1)]
    ex = groups[1]["examples"]
    assert len(ex) == 2
    expected = sorted(rows["uid"][:3].to_list())[:2]
    assert [e["uid"] for e in ex] == expected
    assert ex[0]["where"].startswith("src")


def test_embedding_map_aligns_by_uid_and_samples_deterministically() -> None:
    rows = _rows(6).with_columns(pl.Series("_kept", [True, False, True, False, True, False]))
    uids = rows["uid"].to_list()
    vals = np.arange(6 * 3, dtype=np.float32).reshape(6, 3) ** 1.5
    fs = FeatureSet("embed/prompt", np.asarray(uids[::-1], dtype=object), vals[::-1].copy())
    emap = st.embedding_map(rows, fs, method="pca")
    order = np.argsort(uids)
    assert emap["uids"] == sorted(uids)
    assert emap["kept"].tolist() == rows["_kept"].to_numpy()[order].tolist()
    ref, _ = st.pca_2d(vals[order])
    assert np.allclose(emap["coords"], ref, atol=1e-6)
    small = st.embedding_map(rows, fs, max_points=3, method="pca")
    assert len(small["uids"]) == 3 and small["n_total"] == 6
    assert small["uids"] == st.embedding_map(rows.reverse(), fs, max_points=3, method="pca")["uids"]
