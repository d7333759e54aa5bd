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

``--default-run``: the README's ``curate select quad`` with default parameters on real rows (300
Alpaca rows sampled with seed 0, 12 GSM8K test problems as targets, MiniLM embeddings computed
before the clock starts), timed in one process on ``--threads`` torch threads: the current defaults
with a cold factor cache, again with the cache warm, and the previous defaults (``OLD_DEFAULTS``:
MLP + attention factors of every block fitted on every pool row, 64 calibration rows, no cache).
Agreement: the overlap of the two selections and the Spearman / Pearson correlation of the two
reward oracles on 48 seeded pool rows. The load average is recorded beside the times.

    .venv/bin/python benchmarks/bench_quad.py --default-run
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

from _common import DATA, record  # noqa: E402

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


#: the defaults before the cost rework (the reward compute and batching are today's in both runs)
OLD_DEFAULTS = {"modules": "mlp+attn", "layers": None, "fit_examples": 2000, "n_calibration": 64, "batch_size": 4,
                "cache_factors": False}


class _KeepOracle(QuadSelector):
    """QuadSelector that keeps its reward oracle for the agreement check."""

    def _oracle(self, ctx):
        fn, facts = super()._oracle(ctx)
        ORACLES.append(getattr(fn, "__self__", None))
        return fn, facts


ORACLES: list = []


def default_run(args: argparse.Namespace) -> None:
    import os
    import tempfile

    import torch
    from scipy.stats import pearsonr, spearmanr

    from curate.features.embed import embed_table
    from curate.features.lm import cache_root
    from curate.io.readers import read_sources

    torch.set_num_threads(args.threads)
    pool = read_sources([str(DATA / "alpaca" / "alpaca_5000.json")]).table.sample(args.pool_rows, seed=0).sort("uid")
    targets = read_sources([str(DATA / "gsm8k" / "test.jsonl")], kind="target").table.head(12)
    feats = {"embed": embed_table(pool, "prompt+response")}
    models = cache_root() / "models"
    budget = 0.1
    runs: dict[str, dict] = {}
    saved = os.environ.get("CURATE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.symlink(models, Path(cache) / "models")  # a cold factor cache; the converted model is reused
        os.environ["CURATE_CACHE"] = cache
        for name, params in (("new_cold", {}), ("new_warm", {}), ("old", OLD_DEFAULTS)):
            if name == "old" and args.skip_old:
                continue
            load0 = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = _KeepOracle(progress=False, **params).select(pool, feats, budget, targets=targets, seed=0)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            d = res.diagnostics
            runs[name] = {"seconds": round(dt, 1), "cpu_seconds": round(cpu, 1), "load_before": round(load0, 2),
                          "load_after": round(os.getloadavg()[0], 2), "kept": res.n_kept,
                          "evaluations": d["n_evaluations"], "factors": d.get("factors"), "n_fit": d.get("n_fit"),
                          "tracked_modules": d.get("n_tracked_modules"), "kept_uids": list(res.kept_uids)}
            print(name, {k: v for k, v in runs[name].items() if k != "kept_uids"}, flush=True)
            if name == "new_warm":  # the current defaults on their own, before the long previous-defaults run
                _record_default_run(args, {k: _public(v) for k, v in runs.items()}, compare_old=False)
        if saved is None:
            os.environ.pop("CURATE_CACHE")
        else:
            os.environ["CURATE_CACHE"] = saved
    metrics: dict = {k: _public(v) for k, v in runs.items()}
    if "old" in runs:
        new_k, old_k = set(runs["new_cold"]["kept_uids"]), set(runs["old"]["kept_uids"])
        metrics["overlap_new_old"] = round(len(new_k & old_k) / max(len(old_k), 1), 3)
        metrics["overlap_random_expected"] = round(len(old_k) / pool.height, 3)
        new_o, old_o = ORACLES[0], ORACLES[-1]
        live = [i for i, e in enumerate(new_o.examples) if e.n_response > 0]
        idx = np.sort(np.random.default_rng(1).choice(live, min(48, len(live)), replace=False))
        a, b = new_o.rows(idx), old_o.rows(idx)
        metrics["reward_spearman_new_old"] = round(float(spearmanr(a, b).statistic), 3)
        metrics["reward_pearson_new_old"] = round(float(pearsonr(a, b).statistic), 3)
        top = set(idx[np.argsort(-a)[:12]].tolist()) & set(idx[np.argsort(-b)[:12]].tolist())
        metrics["reward_top12_of_48_overlap"] = len(top)
    if "old" in runs:
        _record_default_run(args, metrics, compare_old=True)


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "kept_uids"}


def _record_default_run(args: argparse.Namespace, metrics: dict, *, compare_old: bool) -> None:
    current = {f: getattr(QuadSelector, f) for f in ("modules", "layers", "fit_examples", "batch_size")}
    record("quad/default_run", {"pool": f"alpaca_5000 sample {args.pool_rows} (seed 0)", "targets": "gsm8k test 12",
                                "budget": 0.1, "threads": args.threads, "compare_old": compare_old, "defaults": current,
                                "old_defaults": OLD_DEFAULTS if compare_old else None},
           metrics, notes="curate select quad with default parameters; old = the previous defaults on today's code")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma", type=float, default=0.004)
    ap.add_argument("--default-run", action="store_true", help="time the default run on real rows (see above)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-rows", type=int, default=300)
    ap.add_argument("--skip-old", action="store_true", help="with --default-run: only the current defaults")
    args = ap.parse_args()
    if args.default_run:
        default_run(args)
        return
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
