"""RDS+ (curate.selectors.rds): exact scores, round-robin, planted pools, parameter checks."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from curate.errors import ParameterError
from curate.features.store import FeatureSet
from curate.selectors import SELECTORS, Budget
from curate.selectors.rds import RdsSelector, round_robin, task_scores
from curate.testing import embedding_pool


def _pool(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_rds_task_scores_match_brute_force() -> None:
    x, y = _pool(40, 5, 0), _pool(7, 5, 1)
    tasks = np.array(["b", "a", "b", "c", "a", "b", "c"], dtype=object)
    for agg in ("mean", "max"):
        names, s = task_scores(x, y, tasks, agg)
        assert names == ["a", "b", "c"]
        for i in range(len(x)):
            for c, t in enumerate(names):
                cos = [x[i] @ y[j] / np.linalg.norm(x[i]) / np.linalg.norm(y[j]) for j in range(len(y)) if tasks[j] == t]
                assert s[i, c] == pytest.approx(np.mean(cos) if agg == "mean" else np.max(cos), abs=1e-12)


def test_rds_round_robin_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=(30, 3)), 1)  # rounding makes ties, which go to the smaller row
    order, by = round_robin(s, 20)
    taken: list[int] = []
    turn = 0
    while len(taken) < 20:
        c = turn % 3
        best = min((i for i in range(30) if i not in taken), key=lambda i: (-s[i, c], i))
        taken.append(best)
        turn += 1
    assert order.tolist() == taken
    assert by.tolist() == [i % 3 for i in range(20)]


def _two_tasks(seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, FeatureSet]]:
    """Task a's rows sit very close to their targets, task b's less so; 300 generic rows."""
    rng = np.random.default_rng(seed)
    d = 16
    ua, ub = np.eye(d)[0], np.eye(d)[1]
    gen = rng.normal(size=(300, d))
    gen[:, :2] = 0.0  # generic rows are orthogonal to both task directions
    a = ua * 5 + 0.2 * rng.normal(size=(20, d))
    b = ub * 5 + 1.5 * rng.normal(size=(20, d))
    pool = np.vstack([gen, a, b])
    dom = ["generic"] * 300 + ["a"] * 20 + ["b"] * 20
    ta = ua * 5 + 0.2 * rng.normal(size=(4, d))
    tb = ub * 5 + 0.2 * rng.normal(size=(4, d))
    uids = np.array([f"r{i:04d}" for i in range(len(pool))], dtype=object)
    tuids = np.array([f"t{i}" for i in range(8)], dtype=object)
    table = pl.DataFrame({"uid": uids.tolist(), "domain": dom})
    targets = pl.DataFrame({"uid": tuids.tolist(), "task": ["a/x"] * 4 + ["b/y"] * 4})
    return table, targets, {"feats": FeatureSet("f", uids, pool), "target_feats": FeatureSet("t", tuids, np.vstack([ta, tb]))}


def _domains(table: pl.DataFrame, uids: list[str]) -> list[str]:
    lut = dict(zip(table["uid"].to_list(), table["domain"].to_list(), strict=True))
    return [lut[u] for u in uids]


def test_rds_round_robin_gives_each_task_its_share() -> None:
    table, targets, feats = _two_tasks()
    res = RdsSelector().select(table, feats, Budget(n=20), targets=targets)
    picked = _domains(table, res.kept_uids)
    assert picked.count("a") == 10 and picked.count("b") == 10
    assert res.diagnostics["picks_per_task"] == {"a": 10, "b": 10}
    kept = res.frame.filter(pl.col("keep"))
    assert set(kept["task"].to_list()) == {"a", "b"}
    # without round-robin the task whose rows sit closer to their targets takes the whole budget
    flat = RdsSelector(round_robin=False).select(table, feats, Budget(n=20), targets=targets)
    assert _domains(table, flat.kept_uids).count("a") == 20
    # task_level=2 keeps the sub-task labels (two tasks here either way)
    sub = RdsSelector(task_level=2).select(table, feats, Budget(n=20), targets=targets)
    assert sub.diagnostics["tasks"] == ["a/x", "b/y"]


def test_rds_mean_ignores_a_stray_target_row_that_max_follows() -> None:
    """One target row lies in a generic cluster: max-aggregation picks that cluster, mean does not."""
    rng = np.random.default_rng(1)
    d = 12
    u, v = np.eye(d)[0], np.eye(d)[1]
    gen_far = rng.normal(size=(200, d)) * 0.3 + 4 * np.eye(d)[5]
    cluster = v * 5 + 0.1 * rng.normal(size=(30, d))  # generic rows next to the stray target
    dom_rows = u * 5 + 1.0 * rng.normal(size=(30, d))
    pool = np.vstack([gen_far, cluster, dom_rows])
    tgt = np.vstack([u * 5 + 0.5 * rng.normal(size=(9, d)), v * 5])
    uids = np.array([f"r{i:04d}" for i in range(len(pool))], dtype=object)
    table = pl.DataFrame({"uid": uids.tolist(), "domain": ["generic"] * 230 + ["task"] * 30})
    feats = {"feats": FeatureSet("f", uids, pool), "target_feats": FeatureSet("t", np.array([f"t{i}" for i in range(10)], dtype=object), tgt)}
    prec = {}
    for agg in ("mean", "max"):
        res = RdsSelector(aggregate=agg).select(table, feats, Budget(n=30))
        prec[agg] = _domains(table, res.kept_uids).count("task") / 30
    assert prec["mean"] == 1.0
    assert prec["max"] < 0.8


def test_rds_finds_in_domain_rows_of_an_embedding_shaped_pool() -> None:
    """5% budget, in-domain rows 5% of the pool (random would pick ~5% of them): RDS ≥ 0.8 precision."""
    table, targets, feats = embedding_pool()
    for agg in ("mean", "max"):
        res = RdsSelector(aggregate=agg).select(table, feats, Budget(fraction=0.05), targets=targets)
        picked = _domains(table, res.kept_uids)
        assert len(picked) == 150
        assert picked.count("task") / len(picked) >= 0.8
    rnd = SELECTORS["random"]().select(table, {}, Budget(fraction=0.05))
    assert _domains(table, rnd.kept_uids).count("task") / 150 < 0.2


def test_rds_invariant_to_target_order_and_feature_scale() -> None:
    table, targets, feats = _two_tasks(2)
    base = RdsSelector().select(table, feats, Budget(n=15), targets=targets)
    t = feats["target_feats"]
    perm = np.random.default_rng(0).permutation(len(t.uids))
    shuffled = {"feats": FeatureSet("f", feats["feats"].uids, np.asarray(feats["feats"].values) * 3.0),
                "target_feats": FeatureSet("t", t.uids[perm], np.asarray(t.values)[perm] * 0.5)}
    other = RdsSelector().select(table, shuffled, Budget(n=15), targets=targets.reverse())
    assert other.kept_uids == base.kept_uids
    assert np.allclose(other.frame["score"].to_numpy(), base.frame["score"].to_numpy())


def test_rds_without_a_target_table_is_one_task() -> None:
    table, _, feats = _two_tasks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = RdsSelector().select(table, feats, Budget(n=10))
    assert res.diagnostics["tasks"] == ["all"]


@pytest.mark.parametrize(("key", "value"), [("aggregate", "median"), ("round_robin", 1), ("task_level", 0)])
def test_rds_rejects_bad_parameters(key: str, value: object) -> None:
    with pytest.raises(ParameterError, match=f"'{key}' parameter of RDS"):
        RdsSelector(**{key: value})


def test_rds_is_registered() -> None:
    assert SELECTORS["rds"] is RdsSelector
