"""Quad: quality reached versus influence evaluations spent, against exhaustive influence top-k.

Pool: the synthetic cluster world of docs/methods/quad.md §7(a) scaled up — K clusters with unit centroids
in R^8, true cluster means μ_k = 0.002 + 0.003·(ĉ_k·w)/‖w‖, per-row influence ρ ~ N(μ_k, σ). The
full selector path runs (faiss k-means on noisy embeddings around the centroids, chunks, bandit) with
an oracle that returns ρ; every oracle call is one "influence evaluation".

Baselines, same pool and budget B (in the same process):
- exhaustive top-k: evaluate all N rows, keep the B with the largest ρ (N evaluations);
- cluster oracle: the B rows of the clusters with the largest true μ (the best any cluster-level
  policy can do; 0 evaluations but needs the truth);
- random: B uniform rows.

Quality = mean ρ of the selected rows (the "mean exhaustive influence of the selection"). Reported
for a curve of probe budgets (``max_probe_evals`` as a fraction of N): raw ratio to top-k and the
excess-over-random ratio (q − q_random)/(q_topk − q_random).

    .venv/bin/python benchmarks/bench_quad.py --quick
    .venv/bin/python benchmarks/bench_quad.py
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import record  # noqa: E402

from curate.features.store import FeatureSet  # noqa: E402
from curate.selectors.quad import QuadSelector  # noqa: E402
from curate.testing import uid_frame  # noqa: E402


def world(n_clusters: int, per: int, sigma: float, seed: int):
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(n_clusters, 8))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    w = rng.normal(size=8)
    mu = 0.002 + 0.003 * cent @ w / np.linalg.norm(w)
    lab = np.repeat(np.arange(n_clusters), per)
    emb = cent[lab] + 0.02 * rng.normal(size=(len(lab), 8))
    rho = rng.normal(mu[lab], sigma)
    return lab, mu, emb, rho


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma", type=float, default=0.004)
    args = ap.parse_args()
    n_cl, per = (100, 100) if args.quick else (400, 250)
    budget_frac = 0.1
    lab, mu, emb, rho = world(n_cl, per, args.sigma, args.seed)
    n = len(lab)
    b = int(budget_frac * n)
    table = uid_frame(n)
    uids = np.asarray(table["uid"].to_list(), dtype=object)
    pos = {u: i for i, u in enumerate(uids.tolist())}
    feats = {"embed": FeatureSet("e", uids, emb)}
    calls = {"n": 0}

    def oracle(us):
        calls["n"] += len(us)
        return rho[[pos[u] for u in us]]

    q_topk = float(np.sort(rho)[::-1][:b].mean())
    best_cl = np.argsort(-mu)
    q_cluster = float(np.concatenate([rho[lab == k] for k in best_cl])[:b].mean())
    q_rand = float(rho[np.random.default_rng(args.seed + 1).choice(n, b, replace=False)].mean())
    curve = []
    for frac in (0.01, 0.02, 0.05, 0.1, None):
        calls["n"] = 0
        sel = QuadSelector(n_clusters=n_cl, reward_fn=oracle, fill="ucb",
                           max_probe_evals=None if frac is None else int(frac * n))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sel.select(table, feats, b, seed=args.seed)
        dt = time.perf_counter() - t0
        kept = np.array([pos[u] for u in res.kept_uids])
        q = float(rho[kept].mean())
        curve.append({
            "max_eval_fraction": frac, "evaluations": calls["n"], "eval_fraction": round(calls["n"] / n, 4),
            "quality": q, "ratio_to_topk": round(q / q_topk, 4),
            "excess_ratio_to_topk": round((q - q_rand) / (q_topk - q_rand), 4),
            "ratio_to_cluster_oracle": round(q / q_cluster, 4), "rounds": res.diagnostics["rounds"],
            "clusters_touched": res.diagnostics["clusters_touched"],
            "kept_before_fill": res.diagnostics["n_kept_before_fill"], "seconds": round(dt, 3),
        })
        print(curve[-1])
    record("quad", {"n": n, "n_clusters": n_cl, "budget": b, "sigma": args.sigma, "seed": args.seed,
                    "quick": args.quick},
           {"q_topk": q_topk, "q_cluster_oracle": q_cluster, "q_random": q_rand, "topk_evaluations": n,
            "curve": curve},
           notes="synthetic cluster world (docs/methods/quad.md §7a scaled); quality = mean per-row influence")


if __name__ == "__main__":
    main()
