"""LESS warm-up on SmolLM2-135M (CPU): training tokens/s with LoRA on the top k blocks vs every block,
and load times of the default LM (first in a process, then again).

Baseline in the same process: LoRA on all 30 blocks (the LESS layout), which back-propagates through
the whole network; the ratio shows what freezing the lower blocks buys.

    .venv/bin/python benchmarks/bench_warmup.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA, RESULTS, machine, peak_rss_mb, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 rows, 1 epoch")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    n = 16 if args.quick else args.n

    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    from curate.features.lm import default_model_path, encode_examples, load_causal_lm
    from curate.features.warmup import WarmupConfig, warmup_train
    from curate.schema import make_record, to_frame

    imports = time.perf_counter() - t0
    path = default_model_path()
    loads = []
    for _ in range(2):
        t = time.perf_counter()
        load_causal_lm("default", device="cpu")
        loads.append(round(time.perf_counter() - t, 3))

    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    table = to_frame([make_record("sft", messages=[
        {"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")},
        {"role": "assistant", "content": r["output"]}]) for r in rows])
    metrics: dict[str, object] = {"import_s": round(imports, 3), "load_first_s": loads[0], "load_again_s": loads[1],
                                  "model_dir": str(path)}
    for label, layers in ((f"top{args.top}", args.top), ("all", None)):
        lm, tok = load_causal_lm("default", device="cpu")
        enc = encode_examples(table, tok, max_length=args.max_length)
        tokens = sum(len(e.input_ids) for e in enc)
        cfg = WarmupConfig(epochs=1, batch_size=16, micro_batch_size=4, max_length=args.max_length,
                           lora_layers=layers, min_rows=0)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = warmup_train(lm, enc, Path(tmp) / "ck", config=cfg, pad_token_id=int(tok.pad_token_id))
            sec = time.perf_counter() - t
        metrics[label] = {"seconds": round(sec, 2), "tokens": tokens, "tokens_per_s": round(tokens / sec, 1),
                          "rows_per_s": round(len(enc) / sec, 2), "n_trainable": res.summary["n_trainable"],
                          "loss": res.epoch_losses[0]}
        print(label, metrics[label], flush=True)
    metrics["speedup_top_vs_all"] = round(metrics["all"]["seconds"] / metrics[f"top{args.top}"]["seconds"], 2)
    metrics["peak_rss_mb"] = peak_rss_mb()
    line = {"bench": "warmup", "command": "python benchmarks/bench_warmup.py " + " ".join(sys.argv[1:]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "versions": versions(),
            "params": {"n": n, "max_length": args.max_length, "top": args.top, "batch_size": 16}, "metrics": metrics}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
