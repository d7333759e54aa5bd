"""BIDS and LESS on hand-worked and planted influence matrices (docs/methods/less-bids.md B.10, A.3)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.features.store import FeatureSet
from curate.selectors import BidsSelector, LessSelector
from curate.selectors.bids import bids_naive, bids_pruned, bids_rowmax, column_zscore
from curate.testing import bids_blocks, uid_frame


def _select(sel, a: np.ndarray, budget: int, col_task: np.ndarray | None = None, order: np.ndarray | None = None):
    """Run a selector on a raw score matrix A (role 'scores'); returns (frame, Selection)."""
    n, m = a.shape
    table = uid_frame(n)
    tuids = [f"t{j:05d}" for j in range(m)]
    fs = FeatureSet("scores", np.asarray(table["uid"].to_list(), dtype=object), a, {"target_uids": tuids})
    targets = None
    if col_task is not None:
        targets = pl.DataFrame({"uid": tuids, "task": [f"task{t}" for t in col_task]})
    if order is not None:
        table = table[order.tolist()]
    res = sel.select(table, {"scores": fs}, budget, targets=targets)
    return res


def _picks(res) -> list[int]:
    return [int(u[1:]) for u in res.kept_uids]


def _counts(picks: list[int], row_task: np.ndarray, k: int) -> list[int]:
    return np.bincount(row_task[picks], minlength=k).tolist()


BIDS = BidsSelector(source="scores")
BIDS_NAIVE = BidsSelector(source="scores", prune=False)
LESS = LessSelector(source="scores")


def test_selectors_bids_hand_worked() -> None:
    a = np.array([[10, 0], [9, 0], [0, 8], [0, 7]], dtype=float)
    # by hand: column z-scores (ddof 1) give row 2 the larger normalised max, 4.25/sqrt(56.75/3) = 0.977
    # against 5.25/5.5 = 0.955 for row 0; then row 0 beats row 1 against r = Ã[2].
    assert _picks(_select(BIDS, a, 2)) == [2, 0]
    assert _picks(_select(BidsSelector(source="scores", normalize=False, iterative=False), a, 2)) == [0, 1]


def test_selectors_bids_first_step_is_normalised_instance_max() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(300, 12)) * rng.uniform(0.1, 10, size=12)
    first = _picks(_select(BIDS, a, 1))
    inst = _picks(_select(BidsSelector(source="scores", iterative=False), a, 1))
    assert first == inst


def test_selectors_bids_affine_invariance() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 20))
    b = a * rng.uniform(0.1, 10, size=20) + rng.normal(0, 5, size=20)
    assert _picks(_select(BIDS, a, 50)) == _picks(_select(BIDS, b, 50))


@pytest.mark.parametrize(("budget", "expected"), [(7, [2, 2, 2, 1]), (40, [10, 10, 10, 10]), (401, [100, 100, 101, 100])])
def test_selectors_bids_equal_prevalence(budget: int, expected: list[int]) -> None:
    a, row_task, col_task = bids_blocks((500,) * 4, 10, (20, 1, 3, 0.5), (5, 0, -1, 2))
    counts = _counts(_picks(_select(BIDS, a, budget, col_task)), row_task, 4)
    assert max(counts) - min(counts) <= 1
    assert counts == expected
    less = _counts(_picks(_select(LESS, a, budget, col_task)), row_task, 4)
    assert less == [budget, 0, 0, 0]


def test_selectors_bids_equal_prevalence_noise() -> None:
    a, row_task, col_task = bids_blocks((500,) * 4, 10, (20, 1, 3, 0.5), (5, 0, -1, 2), noise=1e-3, seed=1)
    counts = _counts(_picks(_select(BIDS, a, 400, col_task)), row_task, 4)
    assert max(counts) - min(counts) <= 2


def test_selectors_bids_unequal_prevalence_closed_form() -> None:
    sizes = (4000, 1000, 500, 250)
    a, row_task, col_task = bids_blocks(sizes, 25, (10, 1, 1, 1), (0.5, 0, 0, 0), noise=0.1, seed=0)
    p = np.array(sizes) / sum(sizes)
    # q_k = max(0, 1 - c sqrt(p(1-p))), sum q = 1: solve for c by bisection
    lo, hi = 0.0, 100.0
    for _ in range(200):
        c = (lo + hi) / 2
        q = np.maximum(0, 1 - c * np.sqrt(p * (1 - p)))
        lo, hi = (c, hi) if q.sum() > 1 else (lo, c)
    assert np.allclose(q, [0, 0.124, 0.348, 0.528], atol=2e-3)
    res = _select(BIDS, a, 400, col_task)
    counts = np.array(_counts(_picks(res), row_task, 4))
    assert np.all(np.abs(counts / 400 - q) <= 0.06), counts
    assert _counts(_picks(_select(LESS, a, 400, col_task)), row_task, 4) == [400, 0, 0, 0]
    inst = _select(BidsSelector(source="scores", iterative=False), a, 400, col_task)
    assert _counts(_picks(inst), row_task, 4) == [0, 0, 150, 250]
    raw = _select(BidsSelector(source="scores", iterative=False, normalize=False), a, 400, col_task)

    def spread(r) -> int:
        v = list(r.diagnostics["thi"].values())
        return max(v) - min(v)

    assert spread(raw) > spread(inst) > spread(res)


def test_selectors_bids_pruned_equals_naive() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        if trial % 2:
            a = rng.integers(-3, 4, size=(2000, 50)).astype(float)  # many exact ties
        else:
            a = rng.normal(size=(2000, 50))
        at, _ = column_zscore(a)
        p1, g1, c1, r1 = bids_naive(at, 200)
        for fast in (bids_pruned, bids_rowmax):
            p2, g2, c2, r2 = fast(at, 200)
            assert np.array_equal(p1, p2) and np.array_equal(g1, g2) and np.array_equal(c1, c2)
            assert np.array_equal(r1, r2)
    # budget = N, and a tiny matrix with all-equal entries (every pick is a tie)
    at = np.zeros((30, 4))
    assert np.array_equal(bids_naive(at, 30)[0], bids_pruned(at, 30)[0])
    assert bids_pruned(at, 30)[0].tolist() == list(range(30))


def test_selectors_bids_selector_prune_flag_identical() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 3, size=(500, 8)).astype(float)
    r1, r2 = _select(BIDS, a, 120), _select(BIDS_NAIVE, a, 120)
    assert r1.kept_uids == r2.kept_uids
    assert r1.frame.equals(r2.frame)


def test_selectors_bids_edge_cases() -> None:
    rng = np.random.default_rng(6)
    a = rng.normal(size=(50, 5))
    a[:, 2] = 3.0
    with pytest.warns(UserWarning, match="zero-variance target column"):
        res = _select(BIDS, a, 10)
    assert res.diagnostics["dropped_targets"] == ["t00002"]
    full = _select(BIDS, rng.normal(size=(30, 4)), 30)
    assert full.n_kept == 30
    b = rng.normal(size=(200, 6))
    perm = rng.permutation(200)
    assert _select(BIDS, b, 40).kept_uids == _select(BIDS, b, 40, order=perm).kept_uids


def test_selectors_less_aggregation_reference_reshape() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(size=(100, 12))
    col_task = np.repeat(np.arange(3), 4)  # contiguous equal blocks
    ref = a.reshape(100, 3, 4).mean(axis=2).max(axis=1)
    res = _select(LESS, a, 10, col_task)
    score = res.frame.sort("uid")["score"].to_numpy()
    assert np.allclose(score, ref, atol=1e-12)
    assert _picks(res) == np.lexsort((np.arange(100), -ref))[:10].tolist()
    k1 = _select(LESS, a, 10)
    assert np.allclose(k1.frame.sort("uid")["score"].to_numpy(), a.mean(axis=1))
    uneq = np.array([0] * 2 + [1] * 10)
    s = _select(LESS, a, 10, uneq).frame.sort("uid")
    expect = np.maximum(a[:, :2].mean(1), a[:, 2:].mean(1))
    assert np.allclose(s["score"].to_numpy(), expect)
    best = np.where(a[:, :2].mean(1) >= a[:, 2:].mean(1), "task0", "task1")
    assert s["best_task"].to_list() == best.tolist()


def test_selectors_less_ties_by_uid() -> None:
    a = np.ones((10, 3))
    perm = np.random.default_rng(0).permutation(10)
    assert _picks(_select(LESS, a, 4, order=perm)) == [0, 1, 2, 3]


def test_selectors_less_grads_equal_scores_path() -> None:
    """Gradient features with checkpoint weights give the same scores as A = Σ w_c Φ_c Ψ_cᵀ."""
    rng = np.random.default_rng(8)
    phi = rng.normal(size=(40, 2, 5))
    psi = rng.normal(size=(6, 2, 5))
    phi /= np.linalg.norm(phi, axis=2, keepdims=True)
    psi /= np.linalg.norm(psi, axis=2, keepdims=True)
    w = (0.7, 0.3)
    a = 0.7 * phi[:, 0] @ psi[:, 0].T + 0.3 * phi[:, 1] @ psi[:, 1].T
    table = uid_frame(40)
    tuids = [f"t{j:05d}" for j in range(6)]
    feats = {"grads": FeatureSet("g", np.asarray(table["uid"].to_list(), dtype=object), phi),
             "target_grads": FeatureSet("tg", np.asarray(tuids, dtype=object), psi)}
    targets = pl.DataFrame({"uid": tuids, "task": ["a", "a", "b", "b", "b", "c"]})
    for agg in ("task_max", "instance_max", "sum"):
        r1 = LessSelector(checkpoint_weights=w, aggregation=agg).select(table, feats, 8, targets=targets)
        r2 = _select(LessSelector(source="scores", aggregation=agg), a, 8, np.array([0, 0, 1, 1, 1, 2]))
        assert np.allclose(r1.frame["score"].to_numpy(), r2.frame["score"].to_numpy(), atol=1e-12)
        assert r1.kept_uids == r2.kept_uids
    r1 = BidsSelector(checkpoint_weights=w).select(table, feats, 8, targets=targets)
    r2 = _select(BidsSelector(source="scores"), a, 8)
    assert r1.kept_uids == r2.kept_uids
