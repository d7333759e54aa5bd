"""Quad's bandit on synthetic clusters with known quality (docs/methods/quad.md §7 a-c, e) and the contract."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import polars as pl
import pytest

from curate.errors import ParameterError
from curate.features.store import FeatureSet
from curate.selectors import SELECTORS
from curate.selectors.quad import (
    QuadSelector,
    cluster_rows,
    default_calibration,
    make_chunks,
    relabel_by_first,
    run_bandit,
    ucb_values,
)
from curate.testing import check_selector, uid_frame

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

K, D_EMB, N_CHUNKS, C, M, A, B_CHUNKS, NOISE = 300, 8, 5, 10, 10, 20, 120, 0.004


def _world(seed: int):
    """Spec §7(a): 300 unit centroids in R^8, μ_k = 0.002 + 0.003·(ĉ_k·w)/‖w‖, ρ ~ N(μ_k, 0.004)."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(K, D_EMB))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    w = rng.normal(size=D_EMB)
    mu = 0.002 + 0.003 * cent @ w / np.linalg.norm(w)
    dist = np.clip(1 - cent @ cent.T, 0, 2)
    np.fill_diagonal(dist, 0)
    n = K * N_CHUNKS * C
    labels = np.repeat(np.arange(K), N_CHUNKS * C)
    rho = rng.normal(mu[labels], NOISE)
    chunks = [[np.arange(k * N_CHUNKS * C + j * C, k * N_CHUNKS * C + (j + 1) * C) for j in range(N_CHUNKS)]
              for k in range(K)]
    return n, labels, mu, rho, dist, chunks


def _run(seed: int, alpha: float, tau: float = 0.002, gamma: float = 0.2, budget_chunks: int = B_CHUNKS):
    n, labels, mu, rho, dist, chunks = _world(seed)
    res = run_bandit(chunks, dist, lambda idx: rho[idx], budget=budget_chunks * C, alpha=alpha, tau=tau,
                     gamma=gamma, probe_size=M, arms_per_round=A, seed=seed)
    return res, labels, mu, chunks


def _quality(res, labels, mu) -> tuple[float, int]:
    lab = labels[res.order]
    return float(mu[lab].mean()) if len(lab) else float("nan"), len({a for a, _, _ in res.accepted})


def _random_policy(seed: int) -> float:
    n, labels, mu, rho, dist, chunks = _world(seed)
    rng = np.random.default_rng(seed + 1000)
    pairs = [(k, j) for k in range(K) for j in range(N_CHUNKS)]
    pick = rng.permutation(len(pairs))[:B_CHUNKS]
    return float(np.mean([mu[pairs[p][0]] for p in pick]))


@pytest.fixture(scope="module")
def sweeps():
    seeds = range(20)
    out = {"random": np.mean([_random_policy(s) for s in seeds])}
    for alpha in (0.0, 1e-4, 1e-3):
        q, d = [], []
        for s in seeds:
            res, labels, mu, chunks = _run(s, alpha)
            # 4: no cluster pulled more often than it has chunks; 5: stops exactly at the budget
            assert all(res.pulls[k] <= len(chunks[k]) for k in range(K))
            assert len(res.order) == B_CHUNKS * C and res.stop == "budget"
            qq, dd = _quality(res, labels, mu)
            q.append(qq)
            d.append(dd)
        out[alpha] = (float(np.mean(q)), float(np.mean(d)))
    return out


def test_selectors_quad_beats_random(sweeps) -> None:
    for alpha in (0.0, 1e-4, 1e-3):
        assert sweeps[alpha][0] > sweeps["random"] + 0.0005, (alpha, sweeps)


def test_selectors_quad_diversity_grows_with_alpha(sweeps) -> None:
    d = [sweeps[a][1] for a in (0.0, 1e-4, 1e-3)]
    assert d[0] < d[1] < d[2], sweeps
    q = [sweeps[a][0] for a in (0.0, 1e-4, 1e-3)]
    assert q[2] < max(q[0], q[1]), sweeps  # quality falls (gently) at large alpha; no monotonicity claimed


def test_selectors_quad_high_tau_accepts_nothing() -> None:
    n, labels, mu, rho, dist, chunks = _world(0)
    tau = float(mu.max()) + 5 * NOISE
    table = uid_frame(n)
    emb = np.eye(K)[labels] + 0.0  # not used for clustering below; the selector path is tested elsewhere
    del emb
    res = run_bandit(chunks, dist, lambda idx: rho[idx], budget=B_CHUNKS * C, alpha=1e-4, tau=tau,
                     probe_size=M, arms_per_round=A, max_rounds=30, seed=0)
    assert len(res.order) == 0 and not res.accepted
    assert {s for cl in res.chunk_state for s in cl} <= {"rejected", ""}
    # and through the selector: every reason is a rejection / not pulled
    sel = QuadSelector(reward_fn=lambda uids: np.full(len(uids), -1.0), tau=0.5, alpha=0.0, max_rounds=5)
    small = uid_frame(200)
    feats = {"embed": FeatureSet("e", np.asarray(small["uid"].to_list(), dtype=object),
                                 np.random.default_rng(0).normal(size=(200, 4)))}
    out = sel.select(small, feats, 50)
    assert out.n_kept == 0
    assert set(out.frame["reason"].to_list()) <= {"chunk_rejected", "chunk_not_pulled", "cluster_never_pulled"}
    assert table.height == n


def _independent_ucb(pulls: list[tuple[int, float]], k: int, alpha: float) -> np.ndarray:
    """Textbook per-arm UCB1 over the same pull sequence: mean_k + α·√(2 ln T / (T_k + 1))."""
    s, t = np.zeros(k), np.zeros(k)
    for arm, r in pulls:
        s[arm] += r
        t[arm] += 1
    total = t.sum()
    out = np.empty(k)
    for j in range(k):
        out[j] = (s[j] / t[j] if t[j] else 0.0) + alpha * math.sqrt(2 * math.log(max(total, 1)) / (t[j] + 1))
    return out


def test_selectors_quad_gamma_to_zero_is_independent_ucb() -> None:
    n, labels, mu, rho, dist, chunks = _world(3)
    alpha = 1e-3
    res = run_bandit(chunks, dist, lambda idx: rho[idx], budget=10**9, alpha=alpha, tau=0.002, gamma=1e-9,
                     probe_size=M, arms_per_round=A, max_rounds=6, seed=3)
    seq = []
    for rec in res.trace:
        seq += list(zip(rec["arms"], rec["reward"], strict=True))
        # the UCB each round's arms were chosen with equals the independent reference of the pulls so far
    ref = _independent_ucb(seq, K, alpha)
    exhausted = np.array([res.pulls[k] >= len(chunks[k]) for k in range(K)])
    ref[exhausted] = -np.inf
    np.testing.assert_allclose(res.ucb, ref, rtol=1e-12, atol=1e-15)
    assert np.array_equal(res.cnt, res.pulls.astype(float))
    # with gamma = 0.2 neighbours are credited: counts exceed pulls somewhere (the test is not vacuous)
    res2 = run_bandit(chunks, dist, lambda idx: rho[idx], budget=10**9, alpha=alpha, tau=0.002, gamma=0.2,
                      probe_size=M, arms_per_round=A, max_rounds=6, seed=3)
    assert (res2.cnt > res2.pulls).any()


def test_selectors_quad_exhausted_arm_never_pulled() -> None:
    # one excellent cluster with 2 chunks: pulled at most twice, then -inf
    rho_of = {0: 1.0, 1: 0.0, 2: -0.1}
    chunks = [[np.arange(0, 4), np.arange(4, 8)], [np.arange(8, 12), np.arange(12, 16), np.arange(16, 20)],
              [np.arange(20, 24)]]
    lab = np.repeat([0, 1, 2], [8, 12, 4])
    dist = np.full((3, 3), 1.0)
    np.fill_diagonal(dist, 0)
    res = run_bandit(chunks, dist, lambda idx: np.array([rho_of[int(lab[i])] for i in idx]), budget=100,
                     alpha=0.0, tau=0.05, probe_size=2, arms_per_round=1, init="index_order", seed=0)
    assert res.pulls.tolist() == [2, 3, 1] and res.stop == "no_arm_left"
    assert np.isneginf(res.ucb).all()
    assert len(res.order) == 8  # only cluster 0's chunks pass tau


def test_selectors_quad_probe_from_chunk() -> None:
    """Spec §7(b): the first chunk is good, the rest bad (keyed by row): only that chunk is accepted."""
    n = 40
    table = uid_frame(n)
    uids = table["uid"].to_list()
    emb = np.tile([1.0, 0.0], (n, 1))
    feats = {"embed": FeatureSet("e", np.asarray(uids, dtype=object), emb)}
    sel0 = QuadSelector(n_clusters=1, chunk_size=10, probe_size=3, arms_per_round=1, tau=0.0, alpha=0.0,
                        reward_fn=lambda u: np.zeros(len(u)))
    first = sel0.select(table, feats, 40).frame.filter(pl.col("chunk") == 0)["uid"].to_list()
    good = set(first)
    sel = QuadSelector(n_clusters=1, chunk_size=10, probe_size=3, arms_per_round=1, tau=0.0, alpha=0.0,
                       reward_fn=lambda u: np.array([1.0 if x in good else -1.0 for x in u]))
    res = sel.select(table, feats, 40)
    assert set(res.kept_uids) == good
    fr = res.frame
    assert set(fr.filter(~pl.col("keep"))["reason"].to_list()) == {"chunk_rejected"}
    assert res.diagnostics["n_pulls"] == 4 and res.diagnostics["n_evaluations"] == 12


def _planted_pool(n_cl: int = 12, per: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(n_cl, 16))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    lab = np.repeat(np.arange(n_cl), per)
    emb = cent[lab] + 0.05 * rng.normal(size=(len(lab), 16))
    table = uid_frame(len(lab))
    quality = np.linspace(-1, 1, n_cl)[rng.permutation(n_cl)]
    rho = {u: quality[lab[i]] + 0.3 * rng.normal() for i, u in enumerate(table["uid"].to_list())}
    feats = {"embed": FeatureSet("e", np.asarray(table["uid"].to_list(), dtype=object), emb)}
    return table, feats, rho, lab, quality


def test_selectors_quad_scale_free_and_deterministic() -> None:
    """Spec §7(c, e): ×1000 rewards leave the selection unchanged under auto τ, α; same seed, same frame."""
    table, feats, rho, lab, quality = _planted_pool()
    base = QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u]))
    big = QuadSelector(reward_fn=lambda u: 1000 * np.array([rho[x] for x in u]))
    a = base.select(table, feats, 120, seed=1)
    b = big.select(table, feats, 120, seed=1)
    assert a.kept_uids == b.kept_uids
    assert b.diagnostics["tau"] == pytest.approx(1000 * a.diagnostics["tau"])
    assert a.frame.equals(base.select(table, feats, 120, seed=1).frame)
    # the planted good clusters dominate the selection
    kept_q = quality[lab[[int(u[1:]) for u in a.kept_uids]]]
    assert kept_q.mean() > 0.4 and a.n_kept == 120
    d = a.diagnostics
    assert d["n_evaluations"] < 0.5 * table.height and d["clusters_touched"] <= d["n_clusters"]
    assert len(d["ucb_trace"]) == d["rounds"] and len(d["per_cluster"]) == d["n_clusters"]


def test_selectors_quad_row_order_and_labels() -> None:
    table, feats, rho, lab, _ = _planted_pool(seed=2)
    sel = QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u]))
    a = sel.select(table, feats, 100, seed=0).frame
    perm = np.random.default_rng(5).permutation(table.height)
    b = sel.select(table[perm.tolist()], feats, 100, seed=0).frame
    key = ["uid", "keep", "rank", "reason", "cluster", "chunk"]
    assert a.sort("uid").select(key).equals(b.sort("uid").select(key))
    # labels do not depend on faiss's centroid order: any renumbering of an assignment maps back
    assign = np.random.default_rng(0).integers(0, 7, size=50)
    ren = np.random.default_rng(1).permutation(7)[assign]
    assert np.array_equal(relabel_by_first(assign), relabel_by_first(ren))
    labels, dist = cluster_rows(feats["embed"].values, 12, seed=0)
    first = [int(np.flatnonzero(labels == k)[0]) for k in range(labels.max() + 1)]
    assert first == sorted(first) and np.allclose(np.diag(dist), 0)
    # planted clusters are mostly recovered (k-means may split one and merge two from its random start)
    assert sum(len(set(labels[lab == k])) == 1 for k in range(12)) >= 9


def test_selectors_quad_chunks_and_ucb() -> None:
    labels = np.array([0, 1, 0, 0, 1, 0, 0])
    ch = make_chunks(labels, 2, np.random.default_rng(0))
    assert [len(c) for c in ch[0]] == [2, 2, 1] and sorted(np.concatenate(ch[0]).tolist()) == [0, 2, 3, 5, 6]
    u = ucb_values(np.array([1.0, 0.0]), np.array([2.0, 0.0]), 2, 0.5, np.array([False, True]))
    assert u[0] == pytest.approx(0.5 + 0.5 * math.sqrt(2 * math.log(2) / 3)) and np.isneginf(u[1])


def test_selectors_quad_fill_and_params() -> None:
    table, feats, rho, _, _ = _planted_pool()
    sel = QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u]), fill="ucb", max_rounds=2)
    res = sel.select(table, feats, 200)
    assert res.n_kept == 200 and "filled_by_ucb" in set(res.frame["reason"].to_list())
    with pytest.raises(ParameterError, match="The 'alpha' parameter of Quad must be"):
        QuadSelector(alpha=-1)
    with pytest.raises(ParameterError, match="'gamma'"):
        QuadSelector(gamma=0)


def _hash_reward(uids):
    return np.array([int(hashlib.md5(u.encode()).hexdigest()[:6], 16) / 2**24 for u in uids])


@pytest.mark.parametrize("params", [{"reward_fn": _hash_reward}, {"reward_fn": _hash_reward, "fill": "ucb"}])
def test_selectors_quad_contract(params) -> None:
    assert SELECTORS["quad"] is QuadSelector
    check_selector(QuadSelector, params)


def test_selectors_quad_calibration_scales_with_the_pool() -> None:
    """A small pool spends about a tenth of its rows on calibration (at least 16, at most 64)."""
    assert [default_calibration(n) for n in (50, 300, 640, 10_000)] == [16, 30, 64, 64]
    table, feats, rho, _, _ = _planted_pool(n_cl=10, per=30)
    res = QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u])).select(table, feats, 30)
    assert res.diagnostics["n_calibration"] == 30
    assert QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u]), n_calibration=64).select(
        table, feats, 30).diagnostics["n_calibration"] == 64


def test_selectors_quad_progress(capsys) -> None:
    table, feats, rho, _, _ = _planted_pool()
    QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u]), progress=True).select(table, feats, 120)
    err = capsys.readouterr().err
    assert "quad: bandit" in err and "calibration rows" in err and "rows scored" in err
    QuadSelector(reward_fn=lambda u: np.array([rho[x] for x in u]), progress=False).select(table, feats, 120)
    assert "quad:" not in capsys.readouterr().err
