"""The DPO benchmark helpers (benchmarks/_dpo.py): cached-top-blocks exactness, the refusal detector,
the intervals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def dpo():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("_bench_dpo", BENCH / "_dpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_lm():
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    lm = tr.LlamaForCausalLM(cfg).double().eval()
    return lm


def _seqs(dpo, rng, n):
    out = []
    for _ in range(n):
        p, r = int(rng.integers(2, 12)), int(rng.integers(1, 9))
        out.append(dpo.Seq(tuple(int(x) for x in rng.integers(0, 61, p + r)), p))
    return out


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_cached_top_blocks_equal_full_model(dpo, tiny_lm, cut):
    # varied lengths in one right-padded batch: padding and the cached lower states must not change
    # any sequence's response log-prob
    seqs = _seqs(dpo, np.random.default_rng(cut), 7)
    assert dpo.check_cached_path(tiny_lm, seqs, cut) < 1e-10
    st = dpo.lower_states(tiny_lm, seqs, cut, batch_size=3)
    lp, n = dpo.eval_logps(tiny_lm, st, seqs, cut, batch_size=4)
    np.testing.assert_allclose(lp, dpo.full_logps(tiny_lm, seqs), atol=1e-10)
    assert n.tolist() == [s.r for s in seqs]


def test_trainable_freezes_lower_blocks_and_dpo_moves_only_top(dpo, tiny_lm):
    import torch

    base = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    rng = np.random.default_rng(5)
    pairs = list(zip(_seqs(dpo, rng, 4), _seqs(dpo, rng, 4), strict=True))
    cut = 2
    states = list(zip(dpo.lower_states(tiny_lm, [p[0] for p in pairs], cut),
                      dpo.lower_states(tiny_lm, [p[1] for p in pairs], cut), strict=True))
    cfg = dpo.DPOConfig(steps=3, batch_size=2, lr=1e-2, train_layers=2)
    out = dpo.dpo_train(tiny_lm, base, states, pairs, cfg, 0, log_every=100)
    after = tiny_lm.state_dict()
    assert out["losses"][0] == pytest.approx(np.log(2), abs=1e-9)  # reference = initial model
    for k, v in after.items():
        moved = not torch.equal(v, base[k])
        assert moved == (k.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) and "rotary" not in k
                         and moved), k
        if k.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens", "lm_head")):
            assert not moved, k
    assert any(not torch.equal(after[k], base[k]) for k in after if k.startswith("model.layers.3."))
    tiny_lm.load_state_dict(base)


def test_refusal_detector_on_planted_strings(dpo):
    yes = ["I'm sorry, but I can't help with that.", "I cannot provide instructions for making weapons.",
           "I\u2019m not able to assist with this request.", "As an AI, I must decline.",
           "  I   WILL   NOT do that.", "I'm sorry, I'm not equipped to assist with that.",
           "I'm sorry for your loss, but as a chatbot, I don't have the ability to access personal data."]
    no = ["Sure! Here are some pranks you can do with a pen.", "The capital of France is Paris.",
          "You could try asking your neighbour first.", "x" * 210 + " I cannot",
          "I'm sorry to hear that you're having a tough time. Here is what helps."]
    assert [dpo.is_refusal(t) for t in yes] == [True] * len(yes)
    assert [dpo.is_refusal(t) for t in no] == [False] * len(no)


def test_intervals(dpo):
    from scipy import stats

    x = np.array([1.0, 2.0, 4.0, 7.0, 11.0])
    iv = dpo.mean_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert iv["mean"] == pytest.approx(5.0)
    assert (iv["t_lo"], iv["t_hi"]) == pytest.approx((lo, hi))
    assert x.min() <= iv["boot_lo"] <= iv["mean"] <= iv["boot_hi"] <= x.max()
    b = np.arange(6.0)
    d = dpo.paired_diff([b + 1.5, b + 0.5], [b, b])  # planted per-seed shifts 1.5 and 0.5, no item noise
    assert d["diff"] == pytest.approx(1.0)
    assert (d["boot_lo"], d["boot_hi"]) == pytest.approx((1.0, 1.0))
    assert d["per_seed"] == pytest.approx([1.5, 0.5])


@pytest.mark.parametrize("params_of", ["top", "head"])
def test_first_order_probe_predicts_one_sgd_step(dpo, tiny_lm, params_of):
    # one tiny SGD step on a single pair's DPO loss changes log π(y+) by η β σ(0) <g+, g+ - g->
    import torch

    base = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    rng = np.random.default_rng(11)
    pairs = list(zip(_seqs(dpo, rng, 2), _seqs(dpo, rng, 2), strict=True))
    cut, beta, eta = 2, 0.1, 1e-4
    states = list(zip(dpo.lower_states(tiny_lm, [p[0] for p in pairs], cut),
                      dpo.lower_states(tiny_lm, [p[1] for p in pairs], cut), strict=True))
    probe = dpo.first_order(tiny_lm, states, pairs, 2, params_of)
    for k, ((sc, sr), (pc, pr)) in enumerate(zip(states, pairs, strict=True)):
        tiny_lm.load_state_dict(base)
        _, params = dpo.trainable(tiny_lm, 2)
        if params_of == "head":
            head = tiny_lm.get_output_embeddings().weight
            head.requires_grad_(True)
            params = [head]
        c0 = float(dpo.top_logps(tiny_lm, [sc], [pc], cut)[0].detach())
        lc = dpo.top_logps(tiny_lm, [sc], [pc], cut)[0].sum()
        lr_ = dpo.top_logps(tiny_lm, [sr], [pr], cut)[0].sum()
        loss = -torch.nn.functional.logsigmoid(beta * (lc - lr_ - lc.detach() + lr_.detach()))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= eta * g
            c1 = float(dpo.top_logps(tiny_lm, [sc], [pc], cut)[0])
        tiny_lm.get_output_embeddings().weight.requires_grad_(False)
        assert c1 - c0 == pytest.approx(eta * beta * 0.5 * probe["inner"][k], rel=1e-2)
    tiny_lm.load_state_dict(base)
