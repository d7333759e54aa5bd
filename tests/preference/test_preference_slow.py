"""Slow checks: CHES on the real SmolLM2-135M with hh-rlhf pairs, and the likelihood-displacement effect."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def test_smollm2_on_hh_rlhf_pairs(data_dir):
    torch.set_num_threads(2)
    from curate.features.ches_states import ches_table, encode_pairs, pair_states, response_states
    from curate.features.lm import load_causal_lm
    from curate.io import read_sources
    from curate.preference.diagnostics import ref_margin

    table = read_sources([data_dir / "hh-rlhf" / "harmless-base_test.jsonl.gz"]).table.head(4)
    model, tok = load_causal_lm("default", device="cpu", attn_implementation="sdpa")
    pairs = encode_pairs(table, tok, max_length=256)
    one = pair_states(model, pairs, padding="none", pad_token_id=tok.pad_token_id)
    bat = pair_states(model, pairs, batch_size=8, padding="left", pad_token_id=tok.pad_token_id)
    assert np.isfinite(one).all()
    np.testing.assert_allclose(bat, one, rtol=1e-4, atol=1e-3)  # float32 model
    a, b = ches_table(one), ches_table(bat)
    assert (np.argsort(a["ln_ches"]) == np.argsort(b["ln_ches"])).all()
    # lm_head(h) equals the logits at the captured positions; the EOS is the last response token
    c = pairs[0][0]
    h, logits = response_states(model, c.prompt, c.response)
    head = model.get_output_embeddings()
    assert torch.allclose(head(h.float()), logits, atol=1e-4)
    assert c.response[-1] == tok.eos_token_id
    m = ref_margin(a["logp_chosen"], a["logp_rejected"], a["len_chosen"], a["len_rejected"])
    assert np.isfinite(m["margin"]).all() and (a["len_chosen"] > 1).all()


def _logp(model, x, y):
    ids = torch.tensor([x + y])
    logits = model(input_ids=ids).logits[0, len(x) - 1: len(x) + len(y) - 1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(y)[:, None]).sum()


def test_likelihood_displacement_is_larger_for_high_ches_pairs():
    """Razin et al. §5 in miniature: DPO on the highest-CHES pairs lowers log π(y+) more than on the lowest.

    Thresholds uncalibrated beyond the sign of the mean over seeds (spec §6.8 says calibrate first).
    """
    torch.set_num_threads(2)
    from curate.features.ches_states import SideIds, ches_table, pair_states
    from curate.features.tiny import tiny_llama

    deltas = {"top": [], "bottom": []}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        base = tiny_llama(vocab_size=100, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=48, seed=seed)
        base.set_attn_implementation("sdpa")
        pool = []
        for i in range(40):
            x = [int(t) for t in rng.integers(0, 98, 6)]
            yp = [int(t) for t in rng.integers(0, 98, 6)]
            if i % 2:
                yn = list(yp)
                yn[int(rng.integers(0, 5))] = int(rng.integers(0, 98))
            else:
                yn = [int(t) for t in rng.integers(0, 98, 6)]
            pool.append((x, yp, yn))
        v = pair_states(base, [(SideIds(x, p), SideIds(x, n)) for x, p, n in pool], batch_size=40, pad_token_id=99)
        order = np.argsort(ches_table(v)["ches"], kind="stable")
        for name, idx in (("bottom", order[:8]), ("top", order[-8:])):
            model = tiny_llama(vocab_size=100, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=48, seed=seed)
            model.set_attn_implementation("sdpa")
            ref = tiny_llama(vocab_size=100, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=48, seed=seed)
            ref.set_attn_implementation("sdpa")
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            sel = [pool[i] for i in idx]
            with torch.no_grad():
                before = [float(_logp(model, x, p)) for x, p, _ in sel]
                ref_lp = [(float(_logp(ref, x, p)), float(_logp(ref, x, n))) for x, p, n in sel]
            model.train()
            for _ in range(30):
                opt.zero_grad()
                loss = 0.0
                for (x, p, n), (rp, rn) in zip(sel, ref_lp, strict=True):
                    z = 0.1 * ((_logp(model, x, p) - rp) - (_logp(model, x, n) - rn))
                    loss = loss - torch.nn.functional.logsigmoid(z)
                (loss / len(sel)).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                after = [float(_logp(model, x, p)) for x, p, _ in sel]
            deltas[name].append(float(np.mean(np.array(after) - np.array(before))))
    assert np.mean(deltas["top"]) < np.mean(deltas["bottom"]), deltas
