"""Per-example gradients, projection, Adam preconditioning, checkpoint weights (spec §11 items 2-12)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from curate.errors import ParameterError, SchemaError  # noqa: E402
from curate.features import projection  # noqa: E402
from curate.features.checkpoints import lr_weights, stack_checkpoints  # noqa: E402
from curate.features.gradients import (  # noqa: E402
    GradFeaturesStep,
    adam_precondition,
    add_lora,
    check_compatible,
    compute_grad_features,
    load_adam_state,
    normalise_rows,
    per_example_grads,
    select_parameters,
)
from curate.features.lm import encode_examples  # noqa: E402
from curate.features.lm_batches import row_losses  # noqa: E402
from curate.features.projection import Projector  # noqa: E402
from curate.features.tiny import tiny_gpt2, tiny_llama  # noqa: E402
from curate.schema import make_record, to_frame  # noqa: E402


def _records(n: int = 4) -> list[dict]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i}: " + "why? " * (i + 1)},
                {"role": "assistant", "content": "because " * (2 * i + 1) + "done."}]
        if i % 2:
            msgs += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok " * i}]
        out.append(make_record("sft", messages=msgs))
    return out


@pytest.fixture(scope="module")
def enc(tok):
    return encode_examples(_records(4), tok, max_length=256)


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(vocab_size=len(tok))


@pytest.fixture(scope="module")
def lora_llama(tok):
    return add_lora(tiny_llama(vocab_size=len(tok), seed=1), r=2, alpha=4, seed=3)


def _perturb_lora(model, seed=5):
    # fresh LoRA has B = 0 (so dL/dA = 0); give B values so every adapter tensor has a real gradient
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


# ------------------------------------------------------------------ methods agree (§11.2)
@pytest.mark.parametrize("params", ["mlp", "mlp_last_blocks:1", "model.layers.1.*"])
def test_methods_agree_llama(llama, enc, tok, params):
    layout = select_parameters(llama, params)
    ref, ref_loss = per_example_grads(llama, layout, enc, method="loop", pad_token_id=tok.pad_token_id)
    assert ref.abs().max() > 0
    methods = ["func", "hooks", "auto"] if params != "model.layers.1.*" else ["func", "auto"]
    for m in methods:
        g, loss = per_example_grads(llama, layout, enc, method=m, pad_token_id=tok.pad_token_id)
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)


def test_methods_agree_lora(lora_llama, enc):
    _perturb_lora(lora_llama)
    layout = select_parameters(lora_llama, "lora")
    assert all("lora_" in n for n in layout.names) and len(layout.names) == 2 * 4 * 2  # A,B × q,k,v,o × 2 layers
    ref, _ = per_example_grads(lora_llama, layout, enc, method="loop")
    for m in ("func", "hooks"):
        g, _ = per_example_grads(lora_llama, layout, enc, method=m)
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)


def test_hooks_gpt2_conv1d_transposed(tok, enc):
    model = tiny_gpt2(vocab_size=len(tok))
    layout = select_parameters(model, "mlp")
    assert layout.names[0].endswith("mlp.c_fc.weight")
    ref, _ = per_example_grads(model, layout, enc, method="loop")
    g, _ = per_example_grads(model, layout, enc, method="hooks")
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ batch invariance, separability
@pytest.mark.parametrize("method", ["hooks", "func"])
def test_batch_invariance(llama, enc, tok, method):
    layout = select_parameters(llama, "mlp")
    shortest = min(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    alone, _ = per_example_grads(llama, layout, [enc[shortest]], method=method, pad_token_id=tok.pad_token_id)
    batch, _ = per_example_grads(llama, layout, enc, method=method, pad_token_id=tok.pad_token_id)
    assert max(len(e.input_ids) for e in enc) > len(enc[shortest].input_ids)
    torch.testing.assert_close(batch[shortest], alone[0], rtol=0, atol=1e-10)


def test_separability(llama, enc, tok):
    from curate.features.lm_batches import collate

    layout = select_parameters(llama, "mlp")
    g, _ = per_example_grads(llama, layout, enc, method="hooks", pad_token_id=tok.pad_token_id)
    params = dict(llama.named_parameters())
    ids, labels = collate(enc, tok.pad_token_id)
    total = row_losses(llama(input_ids=ids).logits, labels).sum()
    ref = torch.autograd.grad(total, [params[n] for n in layout.names])
    torch.testing.assert_close(g.sum(0), torch.cat([r.reshape(-1) for r in ref]), rtol=1e-10, atol=1e-13)


def test_loss_is_mean_nll_over_response_tokens(llama, enc, tok):
    e = enc[1]
    ids = torch.tensor([e.input_ids])
    logp = torch.log_softmax(llama(input_ids=ids).logits[0], dim=-1)
    resp = [t for t in range(1, len(e.labels)) if e.labels[t] != -100]
    hand = -sum(logp[t - 1, e.input_ids[t]].item() for t in resp) / len(resp)
    _, loss = per_example_grads(llama, select_parameters(llama, "mlp"), [e], method="loop")
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    # prompt tokens really masked: changing a prompt token's *label* (it is -100) cannot matter, and
    # making a prompt position a label changes the loss
    lab = torch.tensor([e.labels])
    lg = llama(input_ids=ids).logits
    lab2 = lab.clone()
    lab2[0, 2] = e.input_ids[2]
    assert row_losses(lg, lab2)[0].item() != pytest.approx(row_losses(lg, lab)[0].item())


def test_no_response_row_and_loss_scale_invariance(llama, tok):
    recs = _records(3)
    enc = encode_examples(recs, tok, max_length=256)
    enc[2].labels = [-100] * len(enc[2].labels)
    enc[2].n_response = 0
    layout = select_parameters(llama, "mlp")
    proj = Projector(layout.n_params, 64, seed=1, layout_hash=layout.hash, dtype="float64")
    mean = compute_grad_features(llama, enc, layout=layout, projector=proj, loss_reduction="mean")
    summ = compute_grad_features(llama, enc, layout=layout, projector=proj, loss_reduction="sum")
    assert mean.reasons == ["", "", "no_response_tokens"]
    # HF's eager attention runs its softmax in float32 even for a float64 model, hence 1e-8
    np.testing.assert_allclose(mean.values[:2], summ.values[:2], rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(mean.values[:2], axis=1), 1.0, rtol=1e-12)
    assert not np.any(mean.values[2])


# ------------------------------------------------------------------ projector (§11.5, §11.6)
def test_projector_determinism_and_chunking():
    p = Projector(10_000, 32, seed=7, cache_dir="/nonexistent")
    g = torch.randn(5, 10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = p.project(g, tiles_per_chunk=1)
    b = p.project(g, tiles_per_chunk=100)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    s = p.matrix()
    assert s.dtype == np.int8 and set(np.unique(s)) == {-1, 1}
    torch.testing.assert_close(a, g @ torch.from_numpy(s.astype(np.float64)) / np.sqrt(32))
    other = Projector(10_000, 32, seed=8, cache_dir="/nonexistent").matrix()
    assert (other != s).mean() > 0.4
    prefix = Projector(5_000, 32, seed=7, cache_dir="/nonexistent").matrix()
    np.testing.assert_array_equal(prefix, s[:5_000])  # tiles, not the total size, define R


def test_projector_generated_once_per_process():
    p = Projector(9_000, 16, seed=11, layout_hash="once", cache_dir="/nonexistent")
    g = torch.ones(3, 9_000)
    for _ in range(3):
        p.project(g)
    Projector(9_000, 16, seed=11, layout_hash="once", cache_dir="/nonexistent").project(g)
    assert projection.GENERATIONS[p.id] == 1


def test_projector_mmap_equals_memory(tmp_path):
    g = torch.randn(4, 20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mem = Projector(20_000, 24, seed=3, layout_hash="m", cache_dir=tmp_path)
    mm = Projector(20_000, 24, seed=3, layout_hash="m", cache_dir=tmp_path, max_cache_bytes=1000)
    projection.clear_cache()
    a = mm.project(g)
    assert (tmp_path / f"{mm.id}.npy").exists()
    torch.testing.assert_close(a, mem.project(g), rtol=0, atol=0)


def test_projector_same_across_processes():
    code = ("import hashlib;from curate.features.projection import Projector;"
            "print(hashlib.sha256(Projector(6000, 8, seed=5, cache_dir='/x').matrix().tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert out == hashlib.sha256(Projector(6000, 8, seed=5, cache_dir="/x").matrix().tobytes()).hexdigest()


def test_projector_identity_and_validation():
    p = Projector(10, 64)
    assert p.identity and p.dim == 10
    x = torch.randn(2, 10, dtype=torch.float64)
    torch.testing.assert_close(p.project(x), x)
    with pytest.raises(ParameterError, match="'kind' parameter"):
        Projector(10, 4, kind="sparse")
    with pytest.raises(SchemaError):
        Projector(100, 4).project(torch.ones(2, 99))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_jl_accuracy(kind):
    rng = np.random.default_rng(0)
    big_p, d, c, n = 3000, 256, 0.5, 200
    x = rng.standard_normal((n, big_p))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z = rng.standard_normal((n, big_p))
    z -= (z * x).sum(1, keepdims=True) * x
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = c * x + np.sqrt(1 - c * c) * z
    p = Projector(big_p, d, seed=2, kind=kind, dtype="float64", cache_dir="/nonexistent")
    err = (p.project(x) * p.project(y)).sum(1) - c
    se = err.std(ddof=1) / np.sqrt(n)
    assert abs(err.mean()) < 3 * se
    expected = np.sqrt((1 + c * c) / d)
    assert abs(err.std(ddof=1) - expected) < 0.2 * expected


# ------------------------------------------------------------------ Adam (§11.7)
def test_adam_hand_formula():
    g, m, v = np.array([0.5, -1.0, 2.0]), np.array([0.1, 0.2, -0.3]), np.array([0.01, 0.04, 0.09])
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g * g
    np.testing.assert_allclose(adam_precondition(g, m, v), m2 / np.sqrt(v2 + 1e-8), rtol=1e-14)
    np.testing.assert_allclose(adam_precondition(g, m, v, form="paper"), m2 / (np.sqrt(v2) + 1e-8), rtol=1e-14)
    # first element by hand: m' = 0.09 + 0.05 = 0.14, v' = 0.00999 + 0.00025 = 0.01024
    assert adam_precondition(g, m, v)[0] == pytest.approx(0.14 / np.sqrt(0.01024 + 1e-8), rel=1e-12)
    with pytest.raises(ParameterError):
        adam_precondition(g, m, v, form="adamw")


def test_adam_state_int_keys_and_shape_mismatch(llama):
    layout = select_parameters(llama, "mlp_last_blocks:1")
    names = [n for n, _ in llama.named_parameters()]
    params = dict(llama.named_parameters())
    state = {"state": {i: {"exp_avg": torch.full(params[n].shape, float(i)), "exp_avg_sq": torch.full(params[n].shape, i + 0.5)}
                       for i, n in enumerate(names)}, "param_groups": [{"params": list(range(len(names)))}]}
    m, v = load_adam_state(state, layout, trainable_names=names)
    want = torch.cat([torch.full((params[n].numel(),), float(names.index(n))) for n in layout.names])
    torch.testing.assert_close(m, want)
    torch.testing.assert_close(v, want + 0.5)
    by_name = {"exp_avg": {n: torch.zeros(params[n].shape) for n in layout.names},
               "exp_avg_sq": {n: torch.zeros(params[n].shape) for n in layout.names}}
    by_name["exp_avg_sq"][layout.names[1]] = torch.zeros(3)
    with pytest.raises(SchemaError, match=layout.names[1].replace(".", r"\.")):
        load_adam_state(by_name, layout)


# ------------------------------------------------------------------ checkpoints, norms, guard (§11.8-11)
def test_checkpoint_weights_stack():
    rng = np.random.default_rng(0)
    phis = [rng.standard_normal((5, 4)) for _ in range(3)]
    psis = [rng.standard_normal((2, 4)) for _ in range(3)]
    lrs = [1.6877e-5, 1.2859e-5, 7.7030e-6]
    w = lr_weights(lrs)
    assert w.sum() == pytest.approx(1.0) and w[0] == pytest.approx(lrs[0] / sum(lrs))
    a = stack_checkpoints(phis, lrs) @ stack_checkpoints(psis, lrs).T
    np.testing.assert_allclose(a, sum(wc * p @ q.T for wc, p, q in zip(w, phis, psis, strict=True)), rtol=1e-12)
    with pytest.raises(ParameterError):
        lr_weights([1.0, -1.0])


def test_normalise_rows_flags_zero():
    out, zero = normalise_rows(np.array([[3.0, 4.0], [0.0, 0.0], [1e-14, 0.0]]))
    np.testing.assert_allclose(out[0], [0.6, 0.8])
    assert zero.tolist() == [False, True, True]


def test_layout_guard(llama):
    a = select_parameters(llama, "mlp")
    b = select_parameters(llama, "mlp_last_blocks:1")
    assert a.hash != b.hash
    with pytest.raises(SchemaError, match="layout hash"):
        check_compatible({"layout_hash": a.hash}, {"layout_hash": b.hash})
    with pytest.raises(SchemaError, match="projector id"):
        check_compatible({"projector_id": "x"}, {"projector_id": "y"})
    check_compatible({"layout_hash": a.hash, "projector_id": "x"}, {"layout_hash": a.hash, "projector_id": "x"})
    with pytest.raises(ParameterError, match="'params' parameter"):
        select_parameters(llama, "lora")  # no adapters in a plain model
    assert not any("embed" in n or "lm_head" in n for n in select_parameters(llama, "last_blocks:2").names)


# ------------------------------------------------------------------ the step
def test_step_end_to_end(tiny_folder, tmp_path):
    from curate.features.store import FeatureStore
    from curate.pipeline.step import StepContext, check_step_output

    table = to_frame(_records(5))
    targets = to_frame([make_record("target", messages=[{"role": "user", "content": "q?"}], answer="a", task="t"),
                        make_record("target", messages=[{"role": "user", "content": "r?"}], answer="b", task="t")])
    step = GradFeaturesStep(model=str(tiny_folder), params="mlp", proj_dim=16, max_length=64, batch_size=2, device="cpu")
    outs = []
    for k in range(2):
        ctx = StepContext(seed=0, features=FeatureStore(tmp_path / f"f{k}"), targets=targets, device="cpu")
        out = check_step_output("g", table, step.apply(table, ctx))
        assert out["keep"].all() and out["uid"].to_list() == table["uid"].to_list()
        fs, ts = ctx.features["grad/sgd"], ctx.features["grad/sgd/targets"]
        assert fs.values.shape == (5, 16) and ts.values.shape == (2, 16)
        np.testing.assert_allclose(np.linalg.norm(fs.values, axis=1), 1, rtol=1e-5)
        assert fs.meta["layout_hash"] == ts.meta["layout_hash"] and fs.meta["projector_id"] == ts.meta["projector_id"]
        outs.append(np.asarray(fs.values))
    np.testing.assert_array_equal(outs[0], outs[1])  # same seed -> identical features


def test_step_params_validated(tiny_folder):
    with pytest.raises(ParameterError, match="'proj_dim' parameter of grad_features"):
        GradFeaturesStep(proj_dim=0)
    with pytest.raises(ParameterError, match="'checkpoints'"):
        GradFeaturesStep(variant="adam")
    with pytest.raises(ParameterError, match="'model'"):
        GradFeaturesStep(model="/no/such/model")
    with pytest.raises(ParameterError, match="'method'"):
        GradFeaturesStep(model=str(tiny_folder), method="fast")


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_smollm2_lora_features(data_dir):
    import json

    from curate.features.lm import load_causal_lm

    rows = json.loads((data_dir / "alpaca" / "alpaca_5000.json").read_text())[:2]
    recs = [make_record("sft", messages=[{"role": "user", "content": r["instruction"]},
                                         {"role": "assistant", "content": r["output"]}]) for r in rows]
    runs = []
    for _ in range(2):
        lm, tk = load_causal_lm("default", device="cpu")
        lm = add_lora(lm, r=8, alpha=32, seed=0)
        _perturb_lora(lm)
        layout = select_parameters(lm, "lora")
        assert layout.n_params == 921_600  # spec §10 cpu-small
        proj = Projector(layout.n_params, 512, seed=0, layout_hash=layout.hash)
        enc = encode_examples(recs, tk, max_length=48)
        res = compute_grad_features(lm, enc, layout=layout, projector=proj, batch_size=2,
                                    pad_token_id=tk.pad_token_id)
        assert np.all(np.isfinite(res.values)) and res.reasons == ["", ""]
        np.testing.assert_allclose(np.linalg.norm(res.values, axis=1), 1, rtol=1e-5)
        runs.append(res.values)
    np.testing.assert_array_equal(runs[0], runs[1])
