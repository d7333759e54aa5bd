"""Gradient features on SmolLM2-135M: examples/s at d=512, peak memory, growth with tracked parameters.

Baseline in the same process: the per-example ``loop`` method (batch size 1 autograd) on the same
rows, parameters and projector. ``--quick`` uses 4 Alpaca rows cut to 64 tokens.

    .venv/bin/python benchmarks/bench_gradients.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA, RESULTS, machine, peak_rss_mb, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
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
