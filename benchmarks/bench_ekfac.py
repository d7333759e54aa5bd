"""EK-FAC influence benchmark (issue 5): time and memory of fit and score, agreement with exact.

--quick: a tiny float64 transformer (tests/influence/_influence_models.py): EK-FAC vs the exact
block-diagonal Fisher (Pearson) and wall time relative to the identity baseline in the same process.
Default: SmolLM2-135M MLP layers on real Alpaca rows against GSM8K targets on CPU.

Appends one JSON line to benchmarks/results.jsonl.

    .venv/bin/python benchmarks/bench_ekfac.py --quick
    .venv/bin/python benchmarks/bench_ekfac.py --n-candidates 1000 --n-targets 100
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick() -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "influence"))
    from _influence_models import DT, TRACK, arith_sequences, pearson, sample_labels, trained_lm

    from curate.influence import CausalLMTask, Curvature, pairwise_scores
    from curate.influence.exact import exact_scores, fisher_blocks, per_example_grads

    torch.set_num_threads(1)  # tiny ops: thread sync costs more than it saves
    lm = trained_lm(0)
    task = CausalLMTask()
    fit = sample_labels(lm, arith_sequences(2048, 11), seed=0)
    queries, train = arith_sequences(16, 12), arith_sequences(64, 13)
    out: dict = {}
    for strategy in ("identity", "kfac", "ekfac"):
        t0 = time.perf_counter()
        c = Curvature(strategy=strategy, modules=TRACK, fisher="empirical", damping_scale=1.0, dtype=DT,
                      batch_size=256).fit(lm, task, fit)
        t1 = time.perf_counter()
        s = pairwise_scores(c, lm, task, queries, train, batch_size=32).values
        t2 = time.perf_counter()
        out[strategy] = {"fit_s": t1 - t0, "score_s": t2 - t1, "scores": s, "curv": c}
    lam = {n: out["ekfac"]["curv"].damping_of(n) for n in TRACK}
    t0 = time.perf_counter()
    fisher = fisher_blocks(per_example_grads(lm, task, fit, TRACK))
    ref = exact_scores(fisher, per_example_grads(lm, task, queries, TRACK),
                       per_example_grads(lm, task, train, TRACK), lam).numpy()
    exact_s = time.perf_counter() - t0
    base = out["identity"]["fit_s"] + out["identity"]["score_s"]
    return {
        "mode": "quick", "model": "tiny transformer (2 blocks, width 16), fc1/fc2", "n_fit": 2048,
        "n_targets": 16, "n_candidates": 64, "exact_s": exact_s,
        **{f"pearson_{k}_vs_exact": pearson(v["scores"], ref) for k, v in out.items()},
        **{f"{k}_fit_s": v["fit_s"] for k, v in out.items()},
        **{f"{k}_score_s": v["score_s"] for k, v in out.items()},
        "ekfac_time_ratio_vs_identity": (out["ekfac"]["fit_s"] + out["ekfac"]["score_s"]) / base,
        "exact_time_ratio_vs_ekfac": exact_s / (out["ekfac"]["fit_s"] + out["ekfac"]["score_s"]),
        "max_rss_mb": _rss_mb(),
    }


def full(n_candidates: int, n_targets: int, modules: str, query_rank: int | None, max_length: int) -> dict:
    import torch

    from curate.features.lm import encode_examples, load_causal_lm
    from curate.influence import CausalLMTask, Curvature, pairwise_scores
    from curate.schema import make_record, to_frame

    torch.set_num_threads(2)
    alpaca = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n_candidates]
    pool = to_frame([make_record("sft", messages=[
        {"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))},
        {"role": "assistant", "content": r["output"] or "."}]) for r in alpaca])
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:n_targets]]
    tgt = to_frame([make_record("target", task="gsm8k", messages=[{"role": "user", "content": r["question"]}],
                                answer=r["answer"]) for r in gsm])
    lm, tok = load_causal_lm("default", device="cpu")
    task = CausalLMTask(tok.pad_token_id)
    train = encode_examples(pool, tok, max_length=max_length)
    queries = encode_examples(tgt, tok, max_length=max_length)
    res: dict = {"mode": "full", "model": "SmolLM2-135M-Instruct", "modules": modules, "n_candidates": len(train),
                 "n_targets": len(queries), "max_length": max_length, "query_rank": query_rank}
    for strategy in ("identity", "ekfac"):
        t0 = time.perf_counter()
        c = Curvature(strategy=strategy, modules=modules, batch_size=4, max_examples=len(train)).fit(lm, task, train)
        t1 = time.perf_counter()
        s = pairwise_scores(c, lm, task, queries, train, batch_size=4, query_rank=query_rank)
        t2 = time.perf_counter()
        res[f"{strategy}_fit_s"], res[f"{strategy}_score_s"] = t1 - t0, t2 - t1
        res[f"{strategy}_finite"] = bool(np.isfinite(s.values).all())
    res["ekfac_time_ratio_vs_identity"] = (res["ekfac_fit_s"] + res["ekfac_score_s"]) / (
        res["identity_fit_s"] + res["identity_score_s"])
    res["max_rss_mb"] = _rss_mb()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-candidates", type=int, default=1000)
    p.add_argument("--n-targets", type=int, default=100)
    p.add_argument("--modules", default="mlp")
    p.add_argument("--query-rank", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    a = p.parse_args()
    res = quick() if a.quick else full(a.n_candidates, a.n_targets, a.modules, a.query_rank, a.max_length)
    res.update({"bench": "ekfac", "command": " ".join(["benchmarks/bench_ekfac.py", *sys.argv[1:]]),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    line = json.dumps(res, default=float)
    with open(ROOT / "benchmarks" / "results.jsonl", "a") as f:
        f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
