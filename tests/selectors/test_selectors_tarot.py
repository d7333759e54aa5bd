"""TAROT on the planted 3-mode problem, OT numerics against POT's exact solver (docs/methods/tarot.md §10)."""

from __future__ import annotations

import numpy as np
import pytest

from curate.features.store import FeatureSet
from curate.selectors import TarotSelector
from curate.selectors.tarot import entropic_ot, euclid_cost, exact_ot, knn_table, whiten
from curate.testing import tarot_modes, uid_frame

ot = pytest.importorskip("ot")


def _run(sel: TarotSelector, pool: np.ndarray, tgt: np.ndarray, budget, seed: int = 0):
    table = uid_frame(len(pool))
    tuids = np.asarray([f"t{j:05d}" for j in range(len(tgt))], dtype=object)
    feats = {"feats": FeatureSet("f", np.asarray(table["uid"].to_list(), dtype=object), pool),
             "target_feats": FeatureSet("tf", tuids, tgt)}
    return sel.select(table, feats, budget, seed=seed)


def _idx(res) -> np.ndarray:
    return np.array([int(u[1:]) for u in res.kept_uids], dtype=np.int64)


def _emd_to_targets(pool, tgt, idx) -> float:
    zd, zq = whiten(pool, tgt)
    return exact_ot(zd[idx], zq)


@pytest.fixture(scope="module")
def planted():
    return tarot_modes(seed=0)


def test_selectors_tarot_planted_fixed_size(planted) -> None:
    pool, labels, tgt = planted
    res = _run(TarotSelector(), pool, tgt, 200)
    counts = np.bincount(labels[_idx(res)], minlength=4)
    assert counts[3] == 0 and counts.sum() == 200
    assert np.all(np.abs(counts[:3] / 200 - [0.6, 0.3, 0.1]) <= 0.07), counts
    assert "ot_distance" in res.diagnostics
    mean = _run(TarotSelector(mode="mean_score"), pool, tgt, 200)
    mc = np.bincount(labels[_idx(mean)], minlength=4)
    assert mc[2] / 200 < 0.05, mc
    reasons = set(res.frame["reason"].to_list())
    assert reasons <= {"kept_layer", "kept_tie_break", "dropped_tie_break", "not_reached"}


def _sign_gap(seeds) -> tuple[list[float], list[float]]:
    d_min, d_max = [], []
    for seed in seeds:
        pool, _, tgt = tarot_modes(seed=seed)
        for tie, out in (("min_potential", d_min), ("max_potential", d_max)):
            res = _run(TarotSelector(tie_break=tie), pool, tgt, 200)
            out.append(_emd_to_targets(pool, tgt, _idx(res)))
    return d_min, d_max


@pytest.mark.filterwarnings("ignore:tarot. Sinkhorn")
def test_selectors_tarot_potential_sign() -> None:
    """min_potential (our default) gives a lower exact OT distance than the reference's max_potential
    (calibration, 5 seeds: 0.201 vs 0.236 mean; 0.206 vs 0.281 on seed 0)."""
    assert TarotSelector().tie_break == "min_potential"
    d_min, d_max = _sign_gap([0])
    assert d_min[0] < d_max[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:tarot. Sinkhorn")
def test_selectors_tarot_potential_sign_5_seeds() -> None:
    d_min, d_max = _sign_gap(range(5))
    assert np.mean(d_min) < np.mean(d_max), (d_min, d_max)


def test_selectors_tarot_invariance(planted) -> None:
    pool, _, tgt = planted
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 8)) + 3 * np.eye(8)
    shift = rng.normal(size=8) * 5
    sel = TarotSelector(ridge=1e-12, tie_break="score")
    a = _run(sel, pool, tgt, 200).kept_uids
    b = _run(sel, pool @ w.T + shift, tgt @ w.T + shift, 200).kept_uids
    assert a == b
    default = TarotSelector(tie_break="score")
    assert _run(default, pool, tgt, 200).kept_uids == _run(default, pool * 1000, tgt * 1000, 200).kept_uids
    zd, zq = whiten(pool, tgt, ridge=1e-12)
    zd2, zq2 = whiten(pool @ w.T + shift, tgt @ w.T + shift, ridge=1e-12)
    assert np.allclose(euclid_cost(zd, zq[:5]), euclid_cost(zd2, zq2[:5]), atol=1e-8)


def test_selectors_tarot_nuisance_dimension(planted) -> None:
    pool, labels, tgt = planted
    rng = np.random.default_rng(2)
    pool2 = np.hstack([pool, 50 * rng.normal(size=(len(pool), 1))])
    tgt2 = np.hstack([tgt, 50 * rng.normal(size=(len(tgt), 1))])
    res = _run(TarotSelector(), pool2, tgt2, 200)
    counts = np.bincount(labels[_idx(res)], minlength=4)
    assert counts[3] == 0 and np.all(counts[:3] > 0), counts


def test_selectors_tarot_otm(planted) -> None:
    pool, labels, tgt = planted
    res = _run(TarotSelector(mode="otm"), pool, tgt, 5400)
    counts = np.bincount(labels[_idx(res)], minlength=4)
    assert counts[3] == 0 and np.all(counts[:3] > 0), counts
    assert 0 < res.diagnostics["ratio"] < 0.63
    ref = _run(TarotSelector(mode="otm", otm_keep="reference"), pool, tgt, 5400)
    assert set(res.kept_uids) <= set(ref.kept_uids)  # the argmin set of each fold is inside the reference's


def test_selectors_tarot_otm_few_targets() -> None:
    rng = np.random.default_rng(3)
    res = _run(TarotSelector(mode="otm", whiten=False), rng.normal(size=(80, 4)), rng.normal(size=(4, 4)), 80)
    assert res.n_kept > 0


def test_selectors_tarot_ot_numerics() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 5))
    y = rng.normal(size=(25, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    c = euclid_cost(x, y)
    a, b = np.full(60, 1 / 60), np.full(25, 1 / 25)
    assert exact_ot(x, y) == pytest.approx(ot.emd2(a, b, ot.dist(x, y, metric="euclidean")), abs=1e-7)
    val, f, g = entropic_ot(a, b, c, 0.05, tol=1e-12, max_iter=20000)
    assert val == pytest.approx(ot.solve(c, a, b, reg=0.05).value, abs=1e-8)
    plan = a[:, None] * b[None, :] * np.exp((f[:, None] + g[None, :] - c) / 0.05)
    ref_plan = ot.solve(c, a, b, reg=0.05).plan
    assert np.allclose(plan, ref_plan, atol=1e-8)


def test_selectors_tarot_small_eps_near_exact() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 6))
    y = rng.normal(size=(100, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    a, b = np.full(400, 1 / 400), np.full(100, 1 / 100)
    c = euclid_cost(x, y)
    plan_val = np.sum(c * ot.emd(a, b, c))
    _, f, g = entropic_ot(a, b, c, 1e-4)
    ent_linear = np.sum(c * a[:, None] * b[None, :] * np.exp((f[:, None] + g[None, :] - c) / 1e-4))
    assert abs(ent_linear - plan_val) < 1e-3


def test_selectors_tarot_knn_faiss_equals_dense() -> None:
    rng = np.random.default_rng(6)
    zd = rng.normal(size=(500, 8))
    zd[100] = zd[50]  # exact duplicates: a tie the table must break by the smaller index
    zd[300] = zd[50]
    zd /= np.linalg.norm(zd, axis=1, keepdims=True)
    zq = np.vstack([zd[50], rng.normal(size=(9, 8))])
    zq /= np.linalg.norm(zq, axis=1, keepdims=True)
    r1, _ = knn_table(zd, zq, 20, "dense")
    r2, _ = knn_table(zd, zq, 20, "faiss")
    assert np.array_equal(r1, r2)
    assert r1[0, :3].tolist() == [50, 100, 300]


def test_selectors_tarot_knn_growth(planted) -> None:
    pool, _, tgt = planted
    res = _run(TarotSelector(k_nn=1, tie_break="score"), pool, tgt, 150)
    assert res.n_kept == 150


def test_selectors_tarot_default_whitening_keeps_embedding_targets() -> None:
    """On an embedding-shaped pool (topics in a few directions, noise in many), full whitening of
    3,000 rows in 384 dimensions drowns the topics; the default low-rank whitening does not."""
    import warnings

    from curate.selectors import Budget
    from curate.testing import embedding_pool

    table, targets, feats = embedding_pool()
    lut = dict(zip(table["uid"].to_list(), table["domain"].to_list(), strict=True))
    prec = {}
    for mode in ("auto", "full", "none"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = TarotSelector(whiten=mode).select(table, feats, Budget(fraction=0.05), targets=targets)
        warned = any("poorly estimated" in str(w.message) for w in caught)
        assert warned == (mode == "full"), (mode, [str(w.message) for w in caught])
        prec[mode] = np.mean([lut[u] == "task" for u in res.kept_uids])
        assert res.n_kept == 150
        if mode == "auto":
            assert res.diagnostics["whiten"] == "pca" and res.diagnostics["whiten_rank"] == (3000 + 32) // 50
    assert prec["auto"] >= 0.8 and prec["none"] >= 0.8
    assert prec["full"] < 0.5, prec  # the failure the default avoids: this pool can show it


def test_selectors_tarot_whiten_modes_and_aliases() -> None:
    assert TarotSelector(whiten=True).whiten == "full"
    assert TarotSelector(whiten=False).whiten == "none"
    rng = np.random.default_rng(0)
    pool, tgt = rng.normal(size=(40, 6)), rng.normal(size=(5, 6))
    # auto with 45 rows in 6 dims: 0 directions at 50 rows each -> unwhitened, with a warning
    with pytest.warns(UserWarning, match="too few"):
        res = _run(TarotSelector(), pool, tgt, 10)
    assert res.diagnostics["whiten"] == "none"
    assert _run(TarotSelector(samples_per_dim=5), pool, tgt, 10).diagnostics["whiten"] == "full"
    res = _run(TarotSelector(whiten="pca", whiten_rank=3), pool, tgt, 10)
    assert res.diagnostics["whiten_rank"] == 3


def test_selectors_tarot_lowrank_whitening_at_full_rank_is_full_whitening() -> None:
    from curate.features.whiten import lowrank_whiten

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(5, 5))
    pool, tgt = rng.normal(size=(200, 5)) @ mix, rng.normal(size=(7, 5)) @ mix
    zd, zq = whiten(pool, tgt, ridge=0.0)
    ld, lq = lowrank_whiten(pool, tgt, rank=5, shrink=0.0)
    assert np.allclose(zd @ zq.T, ld @ lq.T, atol=1e-8)
    ld2, lq2 = lowrank_whiten(pool, tgt, rank=2)
    assert ld2.shape == (200, 2) and np.allclose(np.linalg.norm(ld2, axis=1), 1.0)
    # invariant to an invertible linear map only at full rank; any rank is invariant to rotations
    rot = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    rd, rq = lowrank_whiten(pool @ rot, tgt @ rot, rank=2)
    assert np.allclose(rd @ rq.T, ld2 @ lq2.T, atol=1e-8)


def _tie_break_problem(seed: int, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cost matrix of the fixed-size tie-break on the planted problem (new rows of the layer that overflows)."""
    pool, _, tgt = tarot_modes(seed=seed)
    zd, zq = whiten(pool, tgt)
    table, _ = knn_table(zd, zq, 40)
    taken = np.zeros(len(zd), dtype=bool)
    for r in range(table.shape[1]):
        col = table[:, r]
        _, first = np.unique(col, return_index=True)
        new = col[np.sort(first)]
        new = new[~taken[new]]
        if taken.sum() + len(new) > budget:
            break
        taken[new] = True
    a, b = np.full(len(new), 1 / len(new)), np.full(len(zq), 1 / len(zq))
    return a, b, euclid_cost(zd[new], zq)


def test_selectors_tarot_truncated_sinkhorn_has_the_dense_iterates() -> None:
    """Kernel truncation drops only terms below e^-40 of their row's (column's) largest: same iterates."""
    from curate.selectors.tarot import sinkhorn_log, sinkhorn_log_truncated

    a, b, c = _tie_break_problem(0, 200)
    for eps, warm in ((1e-3, None), (4e-3, (np.full(len(a), 3.0), np.full(len(b), -2.0)))):
        u0, v0, e0 = sinkhorn_log(a, b, c, eps, max_iter=300, tol=0.0, warm=warm)
        u1, v1, e1 = sinkhorn_log_truncated(a, b, c, eps, max_iter=300, tol=0.0, warm=warm, dense_above=1.0)
        assert np.allclose(u0, u1, rtol=0, atol=1e-9) and np.allclose(v0, v1, rtol=0, atol=1e-9)
        assert e1 == pytest.approx(e0, rel=1e-6)


@pytest.mark.filterwarnings("ignore:tarot. Sinkhorn")
def test_selectors_tarot_truncated_potentials_are_the_fixed_point() -> None:
    """The truncated solve + Newton meets both marginals to 1e-10 at ε = 1e-3 (the dense solver stops at
    2000 iterations with errors near 1e-3 here), and equals the dense solver where that one converges."""
    a, b, c = _tie_break_problem(4, 150)

    def residual(f, g, eps):
        p = a[:, None] * b[None, :] * np.exp((f[:, None] + g[None, :] - c) / eps)
        return np.abs(p.sum(1) - a).sum() + np.abs(p.sum(0) - b).sum()

    _, f, g = entropic_ot(a, b, c, 1e-3, truncated=True)
    assert residual(f, g, 1e-3) < 1e-10
    _, f0, g0 = entropic_ot(a, b, c, 1e-3)
    assert residual(f0, g0, 1e-3) > 1e-6  # what the old tie-break ranked by
    v0, f0, _ = entropic_ot(a, b, c, 0.05, tol=1e-13, max_iter=20000)
    v1, f1, _ = entropic_ot(a, b, c, 0.05, truncated=True)
    assert v1 == pytest.approx(v0, abs=1e-10)
    assert np.allclose(f1 - f1.mean(), f0 - f0.mean(), atol=1e-8)


@pytest.mark.filterwarnings("ignore:tarot. Sinkhorn")
def test_selectors_tarot_same_picks_as_the_dense_solver() -> None:
    """Where the dense solver's potentials are accurate enough to decide the cut (planted seeds 0, 2, 4 at
    B = 200: error below the gap between the last kept and first dropped potential), the fast solver
    keeps the same rows."""
    for seed in (0, 2, 4):
        pool, _, tgt = tarot_modes(seed=seed)
        fast = _run(TarotSelector(), pool, tgt, 200)
        ref = _run(TarotSelector(ot_solver="dense"), pool, tgt, 200)
        assert "kept_tie_break" in set(fast.frame["reason"].to_list())
        assert sorted(fast.kept_uids) == sorted(ref.kept_uids), seed


def test_selectors_tarot_partial_top_k_is_the_stable_sort_prefix() -> None:
    from curate.selectors.tarot import _top_k_stable

    rng = np.random.default_rng(7)
    for trial in range(40):  # odd trials: many ties at the threshold
        s = rng.integers(0, 4, size=(6, 25)).astype(float) if trial % 2 else rng.normal(size=(6, 25))
        k = int(rng.integers(1, 26))
        assert np.array_equal(_top_k_stable(s, k), np.argsort(-s, axis=1, kind="stable")[:, :k])
