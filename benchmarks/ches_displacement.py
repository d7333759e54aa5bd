"""CHES likelihood displacement at small scale: a few DPO steps on top- vs bottom-LN-CHES pairs.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", ICLR 2025 (arXiv 2410.08847), §5: DPO on the pairs with the highest LN-CHES
(most similar chosen/rejected hidden-state means) lowers log π(chosen) more than DPO on the
lowest-LN-CHES pairs. Here: ``--n`` hh-rlhf harmless-base pairs are scored with curate's CHES
(``curate.features.ches_states.ches_features`` on the packaged SmolLM2-135M-Instruct); the ``--k`` pairs
with the highest and the ``--k`` with the lowest LN-CHES each get ``--steps`` full-batch DPO steps
(β = ``--beta``, reference = the initial model) from the same initial weights; reported: mean
change of log π(chosen) and log π(rejected) (summed over response tokens) on those pairs.

Deviations (2-core CPU): only the top ``--train-layers`` transformer blocks and the final norm are
trained (lower layers frozen), sequences cut to ``--max-length`` tokens, a handful of steps with
Adam instead of the paper's long runs; the paper trains all weights of 1-8B models.

    python benchmarks/ches_displacement.py --quick
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


def seq_logps(model: Any, pairs: list[Any], side: int, pad: int) -> Any:
    """Σ log π(response | prompt) per pair for ``side`` (0 chosen, 1 rejected); a differentiable tensor."""
    import torch

    seqs = [p[side] for p in pairs]
    n = max(len(s.prompt) + len(s.response) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        full = list(s.prompt) + list(s.response)
        ids[i, : len(full)] = torch.tensor(full)
        att[i, : len(full)] = 1
        lab[i, len(s.prompt) : len(full)] = torch.tensor(list(s.response))
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    tgt = lab[:, 1:]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (tgt != -100)).sum(dim=1)


def dpo_run(lm: Any, base_state: dict[str, Any], pairs: list[Any], pad: int, args: argparse.Namespace) -> dict[str, Any]:
    """``args.steps`` full-batch DPO steps from ``base_state``; per-pair log-prob changes."""
    import torch

    lm.load_state_dict(base_state)
    n_blocks = lm.config.num_hidden_layers
    train_names = [f"model.layers.{i}." for i in range(n_blocks - args.train_layers, n_blocks)] + ["model.norm."]
    params = []
    for name, p in lm.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in train_names))
        if p.requires_grad:
            params.append(p)
    lm.eval()  # no dropout
    with torch.no_grad():
        ref_c, ref_r = seq_logps(lm, pairs, 0, pad), seq_logps(lm, pairs, 1, pad)
    torch.manual_seed(args.seed)
    opt = torch.optim.Adam(params, lr=args.lr)
    losses = []
    for _ in range(args.steps):
        lc, lr_ = seq_logps(lm, pairs, 0, pad), seq_logps(lm, pairs, 1, pad)
        margin = args.beta * ((lc - ref_c) - (lr_ - ref_r))
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        new_c, new_r = seq_logps(lm, pairs, 0, pad), seq_logps(lm, pairs, 1, pad)
    dc = (new_c - ref_c).numpy()
    dr = (new_r - ref_r).numpy()
    return {"d_logp_chosen": float(dc.mean()), "d_logp_chosen_std": float(dc.std(ddof=1)),
            "d_logp_rejected": float(dr.mean()), "d_logp_rejected_std": float(dr.std(ddof=1)),
            "frac_chosen_down": float((dc < 0).mean()), "d_margin": float((dc - dr).mean()),
            "dpo_loss_first": losses[0], "dpo_loss_last": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 pairs scored, top/bottom 8, 6 steps")
    ap.add_argument("--n", type=int, default=256, help="hh-rlhf pairs scored with LN-CHES")
    ap.add_argument("--k", type=int, default=32, help="pairs in each of the top and bottom sets")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.steps = 64, 8, 6
    import torch

    torch.set_num_threads(args.threads)
    from curate.features.ches_states import ches_features, ches_table, encode_pairs
    from curate.features.lm import load_causal_lm
    from curate.io import read_sources

    t0 = time.perf_counter()
    table = read_sources([DATA / "hh-rlhf" / "harmless-base_test.jsonl.gz"]).table
    table = table.filter(table["kind"] == "preference").sort("uid").head(args.n)
    lm, tok = load_causal_lm("default", device="cpu", attn_implementation="sdpa")
    fs = ches_features(table, model=lm, tokenizer=tok, max_length=args.max_length, batch_size=8)
    cols = ches_table(fs.align(table["uid"]))
    ln = cols["ln_ches"]
    ok = np.flatnonzero(np.isfinite(ln))
    order = ok[np.lexsort((np.array(table["uid"].to_list(), dtype=object)[ok], ln[ok]))]  # ascending, ties by uid
    bottom, top = order[: args.k], order[::-1][: args.k]
    pairs = encode_pairs(table, tok, max_length=args.max_length)
    pad = int(tok.pad_token_id or 0)
    score_s = time.perf_counter() - t0
    base_state = {k: v.clone() for k, v in lm.state_dict().items()}
    params = {k: v for k, v in vars(args).items() if k != "threads"}
    out = {}
    for name, idx in (("top_ln_ches", top), ("bottom_ln_ches", bottom)):
        t1 = time.perf_counter()
        res = dpo_run(lm, base_state, [pairs[i] for i in idx], pad, args)
        res.update(mean_ln_ches=float(ln[idx].mean()),
                   mean_len_chosen=float(cols["len_chosen"][idx].mean()),
                   mean_len_rejected=float(cols["len_rejected"][idx].mean()),
                   train_s=round(time.perf_counter() - t1, 1), score_s=round(score_s, 1), peak_rss_mb=peak_rss_mb())
        out[name] = res
        record("ches_displacement", {**params, "subset": name}, res,
               notes="Δ = log π after − before DPO, summed over response tokens, mean ± std over the subset's pairs")
    print({k: (round(v["d_logp_chosen"], 3), round(v["d_logp_rejected"], 3)) for k, v in out.items()})


if __name__ == "__main__":
    main()
