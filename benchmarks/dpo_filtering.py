"""Does LN-CHES filtering help DPO? All pairs vs CHES-filtered vs a random subset of the same size.

Razin et al. (ICLR 2025, arXiv 2410.08847) report that DPO on preference pairs with high CHES displaces
the likelihood of the preferred responses and can unalign a model (refusal rate 74.4% → 33.4% on
their harmful-prompt set), and that filtering out the top-CHES pairs mitigates it. Here, on the
first ``--n`` hh-rlhf harmless-base pairs by uid (scored with curate's LN-CHES on the packaged
SmolLM2-135M-Instruct, the feature set shared with ``ches_displacement.py``), DPO runs on

- ``all``: every pair;
- ``ches``: the pairs kept by curate's :class:`curate.selectors.ches.ChesSelector` with
  ``drop_top_fraction=--drop-top`` (the most similar pairs by LN-CHES dropped);
- ``random``: a seeded uniform subset of the same size as ``ches`` (a fresh one per seed);

each for the same ``--steps`` Adam steps of ``--batch-size`` pairs (same compute; the smaller arms see
their pairs more often), from the same initial weights. Evaluated after training, and once on the
initial model (``base``):

- held-out log-likelihood: log π(chosen) (summed and per token) of the chosen responses of the
  ``--heldout`` pairs that follow the pool by uid, and the held-out implicit-reward accuracy
  (share of held-out pairs whose DPO margin moved towards chosen);
- refusals: greedy generation of ``--new-tokens`` tokens (full model, KV cache) for the first human
  turn of ``--prompts`` held-out hh-rlhf red-team conversations, scored by the keyword refusal
  detector ``_dpo.is_refusal`` (documented there; tested on planted strings).

Intervals: paired bootstrap over held-out items (95%) of the seed-averaged per-item differences
between arms, and the per-seed differences.

Deviations (2 shared CPU cores): only the top ``--train-layers`` blocks + final norm are trained and
the frozen lower blocks' outputs are cached once per sequence (``benchmarks/_dpo.py``; exact with
dropout off, the script prints the cached-vs-full difference); sequences cut to ``--max-length``
tokens; a 135M model and a few hundred pairs, where the paper trains all weights of 1-8B models.

    python benchmarks/dpo_filtering.py --quick
    python benchmarks/dpo_filtering.py --n 256 --steps 32 --lr 1e-4 --heldout 48 --prompts 32 --new-tokens 32 --seeds 0,1
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
    is_refusal,
    paired_diff,
    seqs_from_pairs,
)
from ches_displacement import load_scored  # noqa: E402

HERE = Path(__file__).resolve().parent
ARMS = ("all", "ches", "random")
COMPARE = {"ches": ("random", "all"), "random": ("all",)}  # arm − other, paired over held-out items


def heldout(n: int, n_eval: int, n_prompts: int, max_length: int, tok: Any) -> tuple[list[Any], list[str], list[str]]:
    """(encoded held-out pairs, their uids, distinct first human turns) from the rows after the pool."""
    from curate.features.ches_states import encode_pairs
    from curate.io import read_sources

    table = read_sources([DATA / "hh-rlhf" / "harmless-base_test.jsonl.gz"]).table
    table = table.filter(table["kind"] == "preference").sort("uid")
    ev = table.slice(n, n_eval)
    prompts: list[str] = []
    for row in table.slice(n, len(table) - n).iter_rows(named=True):
        first = next((m["content"] for m in (row["prompt"] or []) if m["role"] == "user"), "")
        if first.strip() and first not in prompts:
            prompts.append(first)
        if len(prompts) == n_prompts:
            break
    return encode_pairs(ev, tok, max_length=max_length), ev["uid"].to_list(), prompts


def generate(lm: Any, tok: Any, prompts: list[str], new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations (chat template, left-padded batches, KV cache)."""
    import torch

    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                enc = tok(texts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                g = lm.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                out += tok.batch_decode(g[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out


def evaluate(lm: Any, tok: Any, ev_states: list[Any], ev_pairs: list[Any], cut: int, prompts: list[str],
             new_tokens: int, ref: dict[str, Any] | None) -> dict[str, Any]:
    """Held-out log-probs, implicit-reward accuracy vs ``ref`` (the base evaluation) and refusals."""
    t0 = time.perf_counter()
    c, nc = eval_logps(lm, [s[0] for s in ev_states], [p[0] for p in ev_pairs], cut)
    r, _ = eval_logps(lm, [s[1] for s in ev_states], [p[1] for p in ev_pairs], cut)
    gens = generate(lm, tok, prompts, new_tokens)
    out = {"chosen": c.tolist(), "rejected": r.tolist(), "n_chosen": nc.tolist(), "generations": gens,
           "refusal": [int(is_refusal(g)) for g in gens]}
    if ref is not None:
        out["reward_correct"] = [int(v) for v in ((c - np.asarray(ref["chosen"])) - (r - np.asarray(ref["rejected"])) > 0)]
    print(f"  eval {time.perf_counter() - t0:.0f}s: log π(chosen) {c.mean():.2f}, refusal "
          f"{np.mean(out['refusal']):.3f}", flush=True)
    return out


def arm_indices(arm: str, table: Any, fs: Any, drop_top: float, seed: int) -> np.ndarray:
    """Row indices of ``arm``'s training pairs (the CHES arm through curate's selector)."""
    from curate.selectors.ches import ChesSelector

    uids = table["uid"].to_list()
    sel = ChesSelector(drop_top_fraction=drop_top).select(table, {"ches": fs}, 1.0, seed=seed)
    kept = set(sel.kept_uids)
    ches = np.array([i for i, u in enumerate(uids) if u in kept])
    if arm == "ches":
        return ches
    if arm == "all":
        return np.arange(len(uids))
    return np.sort(np.random.default_rng(1000 + seed).choice(len(uids), size=len(ches), replace=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 pairs, 4 steps, 8 held-out pairs, 4 prompts")
    ap.add_argument("--n", type=int, default=256, help="training pool: first n harmless-base pairs by uid")
    ap.add_argument("--drop-top", type=float, default=0.25, help="ChesSelector drop_top_fraction")
    ap.add_argument("--heldout", type=int, default=48, help="held-out pairs for log π(chosen)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out red-team prompts for refusals")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE.parent / "runs" / "ches_bench")
    args = ap.parse_args()
    if args.quick:
        args.n, args.steps, args.heldout, args.prompts, args.new_tokens = 64, 4, 8, 4, 16
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    table, lm, tok, enc, fs = load_scored(args.n, args.max_length, args.out)
    pairs = seqs_from_pairs(enc)
    ev_enc, ev_uids, prompts = heldout(args.n, args.heldout, args.prompts, args.max_length, tok)
    ev_pairs = seqs_from_pairs(ev_enc)
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    cfg = DPOConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
                    train_layers=args.train_layers)
    cut = len(lm.model.layers) - args.train_layers
    print(f"cached-path check (block {cut}): max |Δ summed log-prob| vs full model on 4 sequences = "
          f"{check_cached_path(lm, [s for p in ev_pairs[:2] for s in p], cut):.2e}", flush=True)
    sdir = args.out / "states"
    ev_states = list(zip(cached_lower_states(lm, [p[0] for p in ev_pairs], cut, sdir, "chosen"),
                         cached_lower_states(lm, [p[1] for p in ev_pairs], cut, sdir, "rejected"), strict=True))
    tr_states = list(zip(cached_lower_states(lm, [p[0] for p in pairs], cut, sdir, "chosen"),
                         cached_lower_states(lm, [p[1] for p in pairs], cut, sdir, "rejected"), strict=True))
    cache = JsonCache(args.out / "filtering")
    ev_key = [ev_uids, prompts, args.new_tokens, args.max_length, cut]
    bkey = digest(["base", ev_key])
    base_ev = cache.get(bkey)
    if base_ev is None:
        print("base model: evaluating", flush=True)
        lm.load_state_dict(base)
        base_ev = evaluate(lm, tok, ev_states, ev_pairs, cut, prompts, args.new_tokens, None)
        cache.put(bkey, base_ev)
    res: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    sizes = {}
    for seed in seeds:
        for arm in arms:
            idx = arm_indices(arm, table, fs, args.drop_top, seed)
            sizes[arm] = len(idx)
            key = digest([arm, [table["uid"][int(i)] for i in idx], cfg, seed, ev_key])
            out = cache.get(key)
            if out is None:
                print(f"{arm} ({len(idx)} pairs) seed {seed}: training ({cfg})", flush=True)
                tr = dpo_train(lm, base, [tr_states[i] for i in idx], [pairs[i] for i in idx], cfg, seed,
                               log_every=8, label=f"{arm} s{seed}")
                out = evaluate(lm, tok, ev_states, ev_pairs, cut, prompts, args.new_tokens, base_ev)
                out.update(train_s=tr["train_s"], loss_first8=float(np.mean(tr["losses"][:8])),
                           loss_last8=float(np.mean(tr["losses"][-8:])), n_pairs=len(idx))
                cache.put(key, out)
            else:
                print(f"{arm} seed {seed}: cached", flush=True)
            res[arm].append(out)
    lm.load_state_dict(base)
    for r in [base_ev, *(r for rs in res.values() for r in rs)]:  # the detector may change after caching
        r["refusal"] = [int(is_refusal(g)) for g in r["generations"]]
    params = {k: v for k, v in vars(args).items() if k not in ("threads", "out", "quick", "arms")}
    nb = np.asarray(base_ev["n_chosen"])
    record("dpo_filtering", {**params, "arm": "base"},
           {"heldout_logp_chosen": round(float(np.mean(base_ev["chosen"])), 3),
            "heldout_logp_chosen_per_token": round(float(np.mean(np.asarray(base_ev["chosen"]) / nb)), 4),
            "refusal_rate": round(float(np.mean(base_ev["refusal"])), 3), "n_prompts": len(prompts),
            "n_heldout": len(ev_pairs)}, notes="the initial model (no DPO)")
    for arm in arms:
        rs = res[arm]
        c = [np.asarray(r["chosen"]) for r in rs]
        m: dict[str, Any] = {
            "n_pairs": sizes[arm], "seeds": len(rs),
            "heldout_logp_chosen": round(float(np.mean(c)), 3),
            "heldout_logp_chosen_per_token": round(float(np.mean([x / nb for x in c])), 4),
            "d_vs_base_logp_chosen": paired_diff(c, [np.asarray(base_ev["chosen"])] * len(rs)),
            "heldout_reward_acc": round(float(np.mean([r["reward_correct"] for r in rs])), 3),
            "refusal_rate": round(float(np.mean([r["refusal"] for r in rs])), 3),
            "refusal_vs_base": paired_diff([np.asarray(r["refusal"]) for r in rs], [np.asarray(base_ev["refusal"])] * len(rs)),
            "dpo_loss_first8_last8": [[round(r["loss_first8"], 3), round(r["loss_last8"], 3)] for r in rs],
            "train_s": [r["train_s"] for r in rs], "peak_rss_mb": peak_rss_mb(),
        }
        for other in COMPARE.get(arm, ()):
            o = res.get(other)
            if not o or len(o) != len(rs):
                continue
            m[f"vs_{other}_logp_chosen"] = paired_diff(c, [np.asarray(r["chosen"]) for r in o])
            m[f"vs_{other}_logp_chosen_per_token"] = paired_diff([x / nb for x in c], [np.asarray(r["chosen"]) / nb for r in o])
            m[f"vs_{other}_refusal"] = paired_diff([np.asarray(r["refusal"]) for r in rs], [np.asarray(r["refusal"]) for r in o])
        for v in m.values():
            if isinstance(v, dict):
                for k2 in list(v):
                    v[k2] = [round(x, 4) for x in v[k2]] if isinstance(v[k2], list) else round(v[k2], 4)
        record("dpo_filtering", {**params, "arm": arm}, m,
               notes="held-out = pairs after the pool by uid; paired bootstrap 95% over held-out items; "
                     "refusal = keyword detector on greedy continuations")


if __name__ == "__main__":
    main()
