"""Gradient features on SmolLM2-135M: examples/s at d=512, peak memory, growth with tracked parameters.

Baseline in the same process: the per-example ``loop`` method (batch size 1 autograd) on the same
rows, parameters and projector. ``--quick`` uses 4 Alpaca rows cut to 64 tokens.

    .venv/bin/python benchmarks/bench_gradients.py --quick

``--projections`` compares the factored (LoGra) projection with the dense Rademacher one at the same
total dimension (the factored projector's realised width) on the MLPs of the last 4 blocks (10.6 M
parameters): Alpaca pool rows, GSM8K + MMLU target rows. Each of ``dense``, ``factored`` and
``exact`` (unprojected gradients, cosine computed streaming, the reference for agreement) runs in
its own subprocess so its peak RSS is its own. Reports seconds (projection generation apart), peak
RSS and peak RSS above the loaded model, and LESS (task max) / BIDS top-5% overlap of each
projection with the exact selection and with each other.

    nice -n 15 .venv/bin/python benchmarks/bench_gradients.py --projections --n 128 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA, RESULTS, machine, peak_rss_mb, record, versions  # noqa: E402


# ------------------------------------------------------------------ factored vs dense projection
def _rows(n: int, n_targets: int) -> tuple[list[dict], list[dict], list[str]]:
    """Alpaca pool records; GSM8K test and MMLU val target records (as SFT rows) and their task names."""
    import csv

    from curate.schema import make_record

    def sft(user: str, answer: str) -> dict:
        return make_record("sft", messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}])

    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    pool = [sft(r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""), r["output"]) for r in rows]
    gsm = [json.loads(x) for x in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:n_targets]]
    targets = [sft(r["question"], r["answer"]) for r in gsm]
    mmlu = []
    for f in sorted((DATA / "mmlu" / "val").glob("*.csv")):
        with f.open(newline="") as fh:
            mmlu.extend(list(csv.reader(fh))[:1])
        if len(mmlu) == n_targets:
            break
    targets += [sft(f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}", f"The answer is {ans}.") for q, a, b, c, d, ans in mmlu]
    return pool, targets, ["gsm8k"] * len(gsm) + ["mmlu"] * len(mmlu)


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): on a shared machine a fairer cost than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args: argparse.Namespace) -> None:
    """One projection in this process: features (or, for ``exact``, the N x M cosine matrix) to --out."""
    import numpy as np
    import torch

    torch.set_num_threads(2)
    from curate.features.factored import FactoredProjector
    from curate.features.gradients import compute_grad_features, per_example_grads, select_parameters
    from curate.features.lm import encode_examples, load_causal_lm
    from curate.features.projection import Projector

    pool, targets, _ = _rows(args.n, args.targets)
    model, tok = load_causal_lm("default", device="cpu")
    enc = encode_examples(pool, tok, max_length=args.max_length)
    tenc = encode_examples(targets, tok, max_length=args.max_length)
    layout = select_parameters(model, args.params)
    fact = FactoredProjector(model, layout, args.dim, seed=0)
    rss_loaded = peak_rss_mb()
    out: dict = {"n_params": layout.n_params, "dim": fact.dim, "rss_loaded_mb": rss_loaded}
    t0, c0 = time.perf_counter(), _cpu_s()
    if args.worker == "exact":
        assert all(e.n_response > 0 for e in enc + tenc)
        tg, _ = per_example_grads(model, layout, tenc, pad_token_id=tok.pad_token_id)
        tg = torch.nn.functional.normalize(tg.detach(), dim=1)
        cos = np.zeros((len(enc), len(tenc)))
        for s in range(0, len(enc), args.batch_size):
            g, _ = per_example_grads(model, layout, enc[s : s + args.batch_size], pad_token_id=tok.pad_token_id)
            cos[s : s + len(g)] = (torch.nn.functional.normalize(g.detach(), dim=1) @ tg.T).double().numpy()
        np.savez(args.out, cos=cos)
    else:
        if args.worker == "dense":
            # R (P x d int8) goes to a memory-mapped file in the run's temporary folder, not the user cache
            proj = Projector(layout.n_params, fact.dim, seed=0, layout_hash=layout.hash,
                             cache_dir=Path(args.out).parent / "projectors")
            proj.project(torch.zeros(1, layout.n_params))  # generate R once (not per call), timed apart
        else:
            proj = fact
        out["proj_gen_s"] = round(time.perf_counter() - t0, 2)
        t0, c0 = time.perf_counter(), _cpu_s()
        spent = [0.0, 0.0]  # wall, CPU seconds inside the projection itself
        inner = proj.project if args.worker == "dense" else proj.project_io

        def timed(*a: object, **k: object) -> object:
            t, c = time.perf_counter(), _cpu_s()
            try:
                return inner(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
                spent[1] += _cpu_s() - c

        setattr(proj, "project" if args.worker == "dense" else "project_io", timed)
        kw = {"layout": layout, "projector": proj, "batch_size": args.batch_size, "pad_token_id": tok.pad_token_id}
        pv = compute_grad_features(model, enc, **kw).values
        tv = compute_grad_features(model, tenc, **kw).values
        np.savez(args.out, pool=pv, targets=tv)
        out["projection_s"], out["projection_cpu_s"] = round(spent[0], 2), round(spent[1], 2)
    out["seconds"], out["cpu_s"] = round(time.perf_counter() - t0, 2), round(_cpu_s() - c0, 2)
    if args.worker == "factored" and args.floor:
        # the floor both projections share: the batched forward/backward that captures layer inputs and
        # output gradients, on the same length-sorted batches, with no gradient formed or projected
        from curate.features.per_example import capture_layer_io

        t0, c0 = time.perf_counter(), _cpu_s()
        for rows in (enc, tenc):
            rows = sorted(rows, key=lambda e: len(e.input_ids))
            for s in range(0, len(rows), args.batch_size):
                capture_layer_io(model, layout, rows[s : s + args.batch_size], "mean", tok.pad_token_id)
        out["backprop_floor_s"], out["backprop_floor_cpu_s"] = (round(time.perf_counter() - t0, 2),
                                                                round(_cpu_s() - c0, 2))
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_above_loaded_mb"] = round(out["peak_rss_mb"] - rss_loaded, 1)
    Path(args.out + ".json").write_text(json.dumps(out))


def _selections(a, tasks: list[str], k: int) -> dict[str, set[int]]:
    """LESS (task max: per-task mean, max over tasks; ties by index) and BIDS picks of an N x M matrix."""
    import numpy as np

    from curate.selectors.bids import bids_pruned, column_zscore

    names = sorted(set(tasks))
    means = np.stack([a[:, [j for j, t in enumerate(tasks) if t == nm]].mean(axis=1) for nm in names], axis=1)
    less = np.lexsort((np.arange(len(a)), -means.max(axis=1)))[:k]
    at, ok = column_zscore(a)
    bids, *_ = bids_pruned(at[:, ok], k)
    return {"less": set(less.tolist()), "bids": set(bids.tolist())}


def compare(args: argparse.Namespace) -> None:
    """Run the three workers one after another and record times, memory and selection agreement."""
    import subprocess
    import tempfile

    import numpy as np

    _, _, tasks = _rows(args.n, args.targets)
    runs: dict[str, dict] = {}
    arrays: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("factored", "dense", "exact"):
            out = str(Path(tmp) / kind)
            cmd = [sys.executable, __file__, "--worker", kind, "--out", out, "--n", str(args.n), "--max-length",
                   str(args.max_length), "--dim", str(args.dim), "--params", args.params, "--targets",
                   str(args.targets), "--batch-size", str(args.batch_size)] + (["--floor"] if args.floor else [])
            subprocess.run(cmd, check=True)
            runs[kind] = json.loads(Path(out + ".json").read_text())
            arrays[kind] = dict(np.load(out + ".npz"))
            print(kind, runs[kind], flush=True)
    mats = {"exact": arrays["exact"]["cos"]}
    for kind in ("dense", "factored"):
        mats[kind] = arrays[kind]["pool"].astype(np.float64) @ arrays[kind]["targets"].astype(np.float64).T
    k = max(1, int(round(0.05 * args.n)))
    k25 = max(1, int(round(0.25 * args.n)))
    sel = {kind: _selections(m, tasks, k) for kind, m in mats.items()}
    sel25 = {kind: _selections(m, tasks, k25) for kind, m in mats.items()}

    def overlap(x: str, y: str, method: str, top: int = k) -> float:
        s = sel if top == k else sel25
        return round(len(s[x][method] & s[y][method]) / top, 3)

    def corr(x: str, y: str) -> float:
        return round(float(np.corrcoef(mats[x].ravel(), mats[y].ravel())[0, 1]), 4)

    d, f = runs["dense"], runs["factored"]
    metrics = {
        "n_params": f["n_params"], "dim": f["dim"], "top_k": k,
        "factored_s": f["seconds"], "dense_s": d["seconds"], "dense_proj_gen_s": d["proj_gen_s"],
        "speedup": round(d["seconds"] / f["seconds"], 2),
        "factored_cpu_s": f["cpu_s"], "dense_cpu_s": d["cpu_s"], "speedup_cpu": round(d["cpu_s"] / f["cpu_s"], 2),
        "projection_cpu_s": {"factored": f.get("projection_cpu_s"), "dense": d.get("projection_cpu_s")},
        "speedup_incl_gen": round((d["seconds"] + d["proj_gen_s"]) / (f["seconds"] + f["proj_gen_s"]), 2),
        "factored_peak_rss_mb": f["peak_rss_mb"], "dense_peak_rss_mb": d["peak_rss_mb"],
        "memory_ratio": round(d["peak_rss_mb"] / f["peak_rss_mb"], 2),
        "factored_above_model_mb": f["peak_above_loaded_mb"], "dense_above_model_mb": d["peak_above_loaded_mb"],
        "memory_ratio_above_model": round(d["peak_above_loaded_mb"] / max(f["peak_above_loaded_mb"], 1.0), 2),
        "exact_s": runs["exact"]["seconds"],
        "less_top5_overlap_factored_vs_dense": overlap("factored", "dense", "less"),
        "bids_top5_overlap_factored_vs_dense": overlap("factored", "dense", "bids"),
        "less_top5_overlap_vs_exact": {"factored": overlap("factored", "exact", "less"),
                                       "dense": overlap("dense", "exact", "less")},
        "bids_top5_overlap_vs_exact": {"factored": overlap("factored", "exact", "bids"),
                                       "dense": overlap("dense", "exact", "bids")},
        "less_top25_overlap_vs_exact": {"factored": overlap("factored", "exact", "less", k25),
                                        "dense": overlap("dense", "exact", "less", k25)},
        "bids_top25_overlap_vs_exact": {"factored": overlap("factored", "exact", "bids", k25),
                                        "dense": overlap("dense", "exact", "bids", k25)},
        "score_pearson_vs_exact": {"factored": corr("factored", "exact"), "dense": corr("dense", "exact")},
    }
    if args.floor:
        metrics["backprop_floor_s"] = f["backprop_floor_s"]
        metrics["backprop_floor_cpu_s"] = f["backprop_floor_cpu_s"]
        metrics["cpu_ratio_above_floor"] = round((d["cpu_s"] - f["backprop_floor_cpu_s"])
                                                 / max(f["cpu_s"] - f["backprop_floor_cpu_s"], 0.01), 2)
    params = {"n": args.n, "targets": len(tasks), "max_length": args.max_length, "params": args.params,
              "proj_dim_requested": args.dim, "batch_size": args.batch_size, "torch_threads": 2,
              "model": "SmolLM2-135M-Instruct (dequantised Q4_1)",
              "baseline": "dense Rademacher projection (curate Projector) at the same total dimension, "
                          "same rows, model and batches; exact = unprojected gradient cosine"}
    record("gradients/projection", params, metrics)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--projections", action="store_true", help="factored vs dense projection (module docstring)")
    ap.add_argument("--params", default="mlp_last_blocks:4", help="--projections: tracked parameters")
    ap.add_argument("--targets", type=int, default=8, help="--projections: target rows per task (GSM8K, MMLU)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--floor", action="store_true", help="--projections: also time the bare forward/backward")
    ap.add_argument("--worker", choices=["dense", "factored", "exact"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.projections:
        compare(args)
        return
    n, max_len = (4, 64) if args.quick else (args.n, args.max_length)

    import numpy as np
    import torch

    torch.set_num_threads(2)
    from curate.features.gradients import add_lora, compute_grad_features, select_parameters
    from curate.features.lm import encode_examples, load_causal_lm
    from curate.features.projection import Projector
    from curate.schema import make_record

    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    recs = [make_record("sft", messages=[{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
                                         {"role": "assistant", "content": r["output"]}]) for r in rows]
    t0 = time.perf_counter()
    base, tok = load_causal_lm("default", device="cpu")
    load_s = time.perf_counter() - t0
    enc = encode_examples(recs, tok, max_length=max_len)
    tokens = sum(len(e.input_ids) for e in enc)
    results = []
    configs = [("lora", "hooks"), ("lora", "loop"), ("mlp_last_blocks:1", "hooks"), ("mlp_last_blocks:4", "hooks")]
    lora_model = add_lora(base, r=8, alpha=32, seed=0)
    for params, method in configs:
        model = lora_model if params == "lora" else lora_model.get_base_model()
        layout = select_parameters(model, params)
        proj = Projector(layout.n_params, args.dim, seed=0, layout_hash=layout.hash)
        t = time.perf_counter()
        proj.project(torch.zeros(1, layout.n_params))  # materialise R once (not per call)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        res = compute_grad_features(model, enc, layout=layout, projector=proj, batch_size=4, method=method,
                                    pad_token_id=tok.pad_token_id)
        sec = time.perf_counter() - t
        assert np.all(np.isfinite(res.values))
        results.append({"params": params, "method": method, "n_params": layout.n_params, "proj_gen_s": round(gen_s, 2),
                        "seconds": round(sec, 2), "examples_per_s": round(len(enc) / sec, 3),
                        "tokens_per_s": round(tokens / sec, 1), "peak_rss_mb_so_far": peak_rss_mb()})
        print(results[-1], flush=True)
    hooks = next(r for r in results if r["params"] == "lora" and r["method"] == "hooks")
    loop = next(r for r in results if r["params"] == "lora" and r["method"] == "loop")
    line = {"bench": "gradients", "command": "benchmarks/bench_gradients.py" + (" --quick" if args.quick else ""),
            "quick": args.quick, "model": "SmolLM2-135M-Instruct (dequantised Q4_1)", "n": len(enc), "tokens": tokens,
            "max_length": max_len, "proj_dim": args.dim, "load_s": round(load_s, 2), "torch_threads": 2,
            "baseline": "per-example loop (batch size 1 autograd), same rows/params/projector",
            "ratio_hooks_vs_loop": round(loop["seconds"] / hooks["seconds"], 3), "results": results,
            "machine": machine(), "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps({k: v for k, v in line.items() if k not in ("machine", "versions")}, indent=1))


if __name__ == "__main__":
    main()
