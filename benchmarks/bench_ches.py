"""CHES + reference log-prob margin throughput on SmolLM2-135M (CPU): batched (left padding, LM head on the
response window only) and shared-prompt (``padding="prefix"``: the prompt once per pair, both responses
on its KV cache) vs one pair at a time (the reference script's mode), with identical scores.

One forward pass per response yields both the CHES hidden-state sums and the response log-prob used by
the margin, so "pairs/s" covers both diagnostics. Pairs: the first ``--n`` hh-rlhf harmless test pairs
(``../shared/data/hh-rlhf``), split at the last assistant turn by curate's reader.

    python benchmarks/bench_ches.py --n 32 --batch-size 8 --max-length 512 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, peak_rss_mb, record, timer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from curate.features.ches_states import ches_table, encode_pairs, pair_states
    from curate.features.lm import load_causal_lm
    from curate.io import read_sources

    table = read_sources([DATA / "hh-rlhf" / "harmless-base_test.jsonl.gz"]).table.head(args.n)
    model, tok = load_causal_lm("default", device="cpu", attn_implementation="sdpa")
    pairs = encode_pairs(table, tok, max_length=args.max_length)
    n_tokens = sum(len(s.prompt) + len(s.response) for p in pairs for s in p)
    pair_states(model, pairs[:2], batch_size=2, pad_token_id=tok.pad_token_id)  # warm-up
    with timer() as t_one:
        one = pair_states(model, pairs, padding="none", pad_token_id=tok.pad_token_id)
    with timer() as t_bat:
        bat = pair_states(model, pairs, batch_size=args.batch_size, padding="left", pad_token_id=tok.pad_token_id)
    with timer() as t_pre:
        pre = pair_states(model, pairs, padding="prefix", pad_token_id=tok.pad_token_id)
    a, b, c = ches_table(one), ches_table(bat), ches_table(pre)
    n_tokens_prefix = sum(len(p[0].prompt) + len(p[0].response) + len(p[1].response) for p in pairs)
    rel = float(np.max(np.abs(a["ln_ches"] - b["ln_ches"]) / (np.abs(a["ln_ches"]) + 1e-12)))
    ra, rb = np.argsort(a["ln_ches"], kind="stable"), np.argsort(b["ln_ches"], kind="stable")
    record("ches", vars(args), {
        "pairs": len(pairs), "tokens": n_tokens,
        "pairs_per_s_one_at_a_time": len(pairs) / t_one["seconds"],
        "pairs_per_s_batched": len(pairs) / t_bat["seconds"],
        "tokens_per_s_batched": n_tokens / t_bat["seconds"],
        "speedup": t_one["seconds"] / t_bat["seconds"],
        "max_rel_diff_ln_ches": rel,
        "max_abs_diff_logp": float(np.max(np.abs(a["logp_chosen"] - b["logp_chosen"]))),
        "same_order": bool((ra == rb).all()),
        "pairs_per_s_shared_prompt": len(pairs) / t_pre["seconds"],
        "speedup_shared_prompt": t_one["seconds"] / t_pre["seconds"],
        "tokens_through_model_shared_prompt": n_tokens_prefix,
        "max_rel_diff_ln_ches_shared_prompt": float(np.max(np.abs(a["ln_ches"] - c["ln_ches"])
                                                          / (np.abs(a["ln_ches"]) + 1e-12))),
        "same_order_shared_prompt": bool((ra == np.argsort(c["ln_ches"], kind="stable")).all()),
        "peak_rss_mb": peak_rss_mb(),
    }, notes="float32 model; batched = left padding + explicit position ids + logits_to_keep; "
             "shared prompt = padding='prefix'")


if __name__ == "__main__":
    main()
