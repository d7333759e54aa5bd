"""CHES likelihood displacement: DPO on top- vs bottom-LN-CHES hh-rlhf pairs, log π(chosen) before/after.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
ICLR 2025 (arXiv 2410.08847): DPO can lower the likelihood of the preferred response; the pairs with
the highest (LN-)CHES (most similar chosen/rejected hidden-state means) cause the most of it. Here:
``--n`` hh-rlhf harmless-base pairs (first by uid) are scored with curate's LN-CHES
(``curate.features.ches_states.ches_features`` on the packaged SmolLM2-135M-Instruct, cached in a
feature store under ``--out``); the ``--k`` pairs with the highest and the ``--k`` with the lowest
LN-CHES (ties by uid) each get ``--steps`` DPO steps (Adam, mini-batches of ``--batch-size`` pairs in
a seeded shuffled order, β ``--beta``, reference = the initial model) from the same initial weights,
once per seed in ``--seeds``. After each step in ``--checkpoints`` and the last, every pair's
log π(chosen) and log π(rejected) (summed over response tokens) is measured. Reported per subset
and checkpoint: mean Δ log π(chosen) and Δ log π(rejected) (after − before, paired per pair; 95%
t and bootstrap intervals over pairs of the seed-averaged Δ, and per-seed means), Δ per token, the
share of pairs whose chosen log-prob fell, and the DPO loss on the whole subset (0.693 at start).

Deviations from the paper (2 shared CPU cores): only the top ``--train-layers`` blocks and the final
norm are trained (the paper trains all weights of 1-8B models), sequences are cut to ``--max-length``
tokens, a few dozen steps. **Speed**: the lower blocks are frozen, so the states entering the first
trainable block are computed once per sequence and cached; every step, the reference and the
after-training log-probs run only the top blocks + norm + LM head (``benchmarks/_dpo.py``; exact
with dropout off: the script prints the largest cached-vs-full-model difference on a few pairs).
``--norm mean`` trains on per-token log-probs instead of sums (a diagnostic variant). The seed sets
the mini-batch order (the pair sample is the same for every seed).

``--probe top|head|top+head`` trains nothing: it measures per pair the first-order change of log π(chosen)
under one DPO step on that pair alone, <g+, g+ − g−> (``_dpo.first_order``).

    python benchmarks/ches_displacement.py --quick
    python benchmarks/ches_displacement.py --n 256 --k 32 --steps 48 --checkpoints 8,16,32 --seeds 0,1 --lr 1e-4
    python benchmarks/ches_displacement.py --n 256 --k 32 --probe head
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, peak_rss_mb, record  # noqa: E402
from _dpo import (  # noqa: E402
    DPOConfig,
    JsonCache,
    cached_lower_states,
    check_cached_path,
    digest,
    dpo_train,
    eval_logps,
    first_order,
    mean_interval,
    seqs_from_pairs,
)

HERE = Path(__file__).resolve().parent


def load_scored(n: int, max_length: int, out: Path) -> tuple[Any, Any, Any, Any, Any]:
    """(table, lm, tok, encoded pairs, ``ches/states`` feature set) of the first ``n`` harmless-base pairs by uid;
    the CHES feature set is cached in a curate feature store under ``out``."""
    from curate.features.ches_states import ches_features, encode_pairs
    from curate.features.lm import load_causal_lm
    from curate.io import read_sources
    from curate.io.store import FeatureStore

    table = read_sources([DATA / "hh-rlhf" / "harmless-base_test.jsonl.gz"]).table
    table = table.filter(table["kind"] == "preference").sort("uid").head(n)
    lm, tok = load_causal_lm("default", device="cpu", attn_implementation="sdpa")
    t0 = time.perf_counter()
    store = FeatureStore(out / f"features_n{n}_len{max_length}")
    fs = ches_features(table, model=lm, tokenizer=tok, store=store, max_length=max_length, batch_size=8,
                       progress=True)
    print(f"LN-CHES of {n} pairs: {time.perf_counter() - t0:.0f}s (0 when cached)", flush=True)
    pairs = encode_pairs(table, tok, max_length=max_length)
    return table, lm, tok, pairs, fs


def subsets(table: Any, ln: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The ``k`` highest and ``k`` lowest finite LN-CHES rows (ties by uid)."""
    ok = np.flatnonzero(np.isfinite(ln))
    order = ok[np.lexsort((np.array(table["uid"].to_list(), dtype=object)[ok], ln[ok]))]
    return {"top_ln_ches": order[::-1][:k], "bottom_ln_ches": order[:k]}


def run_one(lm: Any, base: dict[str, Any], states: list[Any], pairs: list[Any], cfg: DPOConfig, seed: int,
            checkpoints: tuple[int, ...], label: str) -> dict[str, Any]:
    """One DPO run; per-pair summed log-probs at each checkpoint."""

    def measure(step: int, cut: int) -> dict[str, list[float]]:
        c, _ = eval_logps(lm, [s[0] for s in states], [p[0] for p in pairs], cut)
        r, _ = eval_logps(lm, [s[1] for s in states], [p[1] for p in pairs], cut)
        return {"chosen": c.tolist(), "rejected": r.tolist()}

    return dpo_train(lm, base, states, pairs, cfg, seed, checkpoints=checkpoints, on_checkpoint=measure,
                     log_every=8, label=label)


def summarise(runs: list[dict[str, Any]], step: int, beta: float, norm: str) -> dict[str, Any]:
    """Metrics of one subset at one checkpoint over the seeds' runs (pairs are the same in every run)."""
    c0, r0 = np.asarray(runs[0]["ref_chosen"]), np.asarray(runs[0]["ref_rejected"])
    nc, nr = np.asarray(runs[0]["len_chosen"]), np.asarray(runs[0]["len_rejected"])
    dc = np.stack([np.asarray(r["checkpoints"][str(step)]["chosen"]) - c0 for r in runs])  # (S, k)
    dr = np.stack([np.asarray(r["checkpoints"][str(step)]["rejected"]) - r0 for r in runs])
    if norm == "mean":
        mc, mr = dc / nc, dr / nr
    else:
        mc, mr = dc, dr
    loss = -np.log(1 / (1 + np.exp(-beta * (mc - mr))))  # (S, k): DPO loss on the whole subset
    ic, ir = mean_interval(dc.mean(0)), mean_interval(dr.mean(0))
    return {
        "d_logp_chosen": round(ic["mean"], 3), "d_chosen_t95": [round(ic["t_lo"], 3), round(ic["t_hi"], 3)],
        "d_chosen_boot95": [round(ic["boot_lo"], 3), round(ic["boot_hi"], 3)],
        "d_chosen_per_seed": [round(float(v), 3) for v in dc.mean(1)],
        "d_logp_rejected": round(ir["mean"], 3), "d_rejected_t95": [round(ir["t_lo"], 3), round(ir["t_hi"], 3)],
        "d_rejected_per_seed": [round(float(v), 3) for v in dr.mean(1)],
        "d_chosen_per_token": round(float((dc / nc).mean()), 4),
        "d_rejected_per_token": round(float((dr / nr).mean()), 4),
        "frac_chosen_down": round(float((dc < 0).mean()), 3),
        "frac_chosen_down_per_seed": [round(float(v), 3) for v in (dc < 0).mean(1)],
        "dpo_loss_start": 0.6931, "dpo_loss": round(float(loss.mean()), 4),
        "dpo_loss_per_seed": [round(float(v), 4) for v in loss.mean(1)],
        "train_acc": round(float(((mc - mr) > 0).mean()), 3),
        "mean_len_chosen": round(float(nc.mean()), 1), "mean_len_rejected": round(float(nr.mean()), 1),
        "_dc_pairs": dc.mean(0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 pairs scored, top/bottom 8, 6 steps, seed 0")
    ap.add_argument("--n", type=int, default=256, help="hh-rlhf pairs scored with LN-CHES")
    ap.add_argument("--k", type=int, default=32, help="pairs in each of the top and bottom sets")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per run")
    ap.add_argument("--checkpoints", default="8,16,32", help="steps after which all pairs are measured")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step (>= k: full batch)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--norm", choices=("sum", "mean"), default="sum", help="DPO on summed or per-token log-probs")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--subsets", default="top_ln_ches,bottom_ln_ches")
    ap.add_argument("--probe", choices=("top", "head", "top+head"), default=None,
                    help="only the first-order probe <g+, g+ - g-> per pair over these parameters (no training; "
                         "see _dpo.first_order)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE.parent / "runs" / "ches_bench")
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.steps, args.checkpoints, args.seeds = 64, 8, 6, "3", "0"
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    ckpts = tuple(sorted({int(s) for s in args.checkpoints.split(",") if s} | {args.steps}))
    from curate.features.ches_states import ches_table

    table, lm, _, enc, fs = load_scored(args.n, args.max_length, args.out)
    cols = ches_table(fs.align(table["uid"]))
    pairs = seqs_from_pairs(enc)
    ln = cols["ln_ches"]
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    cfg = DPOConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                    train_layers=args.train_layers, norm=args.norm)
    cut = len(lm.model.layers) - args.train_layers
    check = [s for p in pairs[:3] for s in p]
    print(f"cached-path check (block {cut}): max |Δ summed log-prob| vs full model on 6 sequences = "
          f"{check_cached_path(lm, check, cut):.2e}", flush=True)
    cache = JsonCache(args.out / "displacement")
    params = {k: v for k, v in vars(args).items() if k not in ("threads", "out", "quick", "subsets")}
    for name in args.subsets.split(","):
        idx = subsets(table, ln, args.k)[name]
        sub = [pairs[i] for i in idx]
        uids = [table["uid"][int(i)] for i in idx]
        t0 = time.perf_counter()
        st_c = cached_lower_states(lm, [p[0] for p in sub], cut, args.out / "states", "chosen")
        st_r = cached_lower_states(lm, [p[1] for p in sub], cut, args.out / "states", "rejected")
        states = list(zip(st_c, st_r, strict=True))
        if args.probe:
            pkey = digest(["probe", uids, args.train_layers, args.max_length, args.probe])
            pr = cache.get(pkey)
            if pr is None:
                pr = first_order(lm, states, sub, args.train_layers, args.probe)
                cache.put(pkey, pr)
            ratio = np.asarray(pr["ratio"])
            iv = mean_interval(ratio)
            m = {"share_inner_negative": round(float((np.asarray(pr["inner"]) < 0).mean()), 3),
                 "mean_inner_over_gpos2": round(iv["mean"], 4), "t95": [round(iv["t_lo"], 4), round(iv["t_hi"], 4)],
                 "min_inner_over_gpos2": round(float(ratio.min()), 4),
                 "mean_cos_gpos_gneg": round(float(np.mean(pr["cos"])), 4), "mean_ln_ches": round(float(ln[idx].mean()), 3)}
            print(name, m, flush=True)
            record("ches_first_order", {"n": args.n, "k": args.k, "train_layers": args.train_layers,
                                        "max_length": args.max_length, "params_of": args.probe, "subset": name}, m,
                   notes="<g+, g+ - g-> over the trainable parameters per pair: < 0 means one DPO step on the "
                         "pair alone lowers log π(chosen); ratio = <g+, g+ - g-> / |g+|^2")
            continue
        runs = []
        for seed in seeds:
            key = digest([uids, cfg, seed, args.max_length, list(ckpts)])
            res = cache.get(key)
            if res is None:
                print(f"{name} seed {seed}: training ({cfg})", flush=True)
                res = run_one(lm, base, states, sub, cfg, seed, ckpts, f"{name} s{seed}")
                res["checkpoints"] = {str(k): v for k, v in res["checkpoints"].items()}
                cache.put(key, res)
            else:
                print(f"{name} seed {seed}: cached", flush=True)
            runs.append(res)
        for step in ckpts:
            m = summarise(runs, step, args.beta, args.norm)
            m.pop("_dc_pairs")
            m.update(mean_ln_ches=round(float(ln[idx].mean()), 3), train_s=[r["train_s"] for r in runs],
                     wall_s=round(time.perf_counter() - t0, 1), peak_rss_mb=peak_rss_mb())
            record("ches_displacement", {**params, "subset": name, "at_step": step}, m,
                   notes="Δ = log π after − before DPO (summed over response tokens), mean over the subset's "
                         "pairs of the seed-averaged Δ; intervals 95% over pairs; dpo_loss on the whole subset")
    if args.probe:
        return
    # top − bottom difference of Δ log π(chosen) (different pairs: Welch interval)
    from scipy import stats

    subs = subsets(table, ln, args.k)
    for step in ckpts:
        got = {}
        for name, idx in subs.items():
            uids = [table["uid"][int(i)] for i in idx]
            rs = [cache.get(digest([uids, cfg, s, args.max_length, list(ckpts)])) for s in seeds]
            if all(r is not None for r in rs):
                got[name] = (summarise(rs, step, args.beta, args.norm)["_dc_pairs"], np.asarray(rs[0]["len_chosen"]),
                             ln[idx], cols["ches"][idx])
        if len(got) == 2:
            for unit, div in (("summed", False), ("per token", True)):
                a, b = (g[0] / g[1] if div else g[0] for g in (got["top_ln_ches"], got["bottom_ln_ches"]))
                w = stats.ttest_ind(a, b, equal_var=False)
                ci = w.confidence_interval(0.95)
                print(f"step {step}: Δ log π(chosen) {unit}, top − bottom = {a.mean() - b.mean():+.4f} "
                      f"(Welch 95% [{ci.low:+.4f}, {ci.high:+.4f}], p={w.pvalue:.3f})", flush=True)
            for unit, div in (("summed", False), ("per token", True)):
                dc = np.concatenate([got[k][0] / got[k][1] if div else got[k][0] for k in got])
                for measure, col in (("LN-CHES", 2), ("CHES", 3)):
                    rho = stats.spearmanr(np.concatenate([got[k][col] for k in got]), dc)
                    print(f"step {step}: Spearman({measure}, Δ log π(chosen) {unit}) over {len(dc)} pairs = "
                          f"{rho.statistic:+.3f} (p={rho.pvalue:.3g})", flush=True)


if __name__ == "__main__":
    main()
