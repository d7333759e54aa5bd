"""Factored (LoGra) gradient projection: equal to the dense Kronecker projection of exact gradients."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from curate.cli import main  # noqa: E402
from curate.errors import ParameterError  # noqa: E402
from curate.features.factored import FactoredProjector, factored_features  # noqa: E402
from curate.features.gradients import (  # noqa: E402
    GradFeaturesStep,
    add_lora,
    compute_grad_features,
    per_example_grads,
    select_parameters,
)
from curate.features.lm import encode_examples  # noqa: E402
from curate.features.store import FeatureStore  # noqa: E402
from curate.features.tiny import tiny_gpt2, tiny_llama  # noqa: E402
from curate.pipeline.step import StepContext  # noqa: E402
from curate.schema import make_record, to_frame  # noqa: E402


def _records(n: int = 4) -> list[dict]:
    return [make_record("sft", messages=[{"role": "user", "content": f"question {i}: " + "why? " * (i + 1)},
                                         {"role": "assistant", "content": "because " * (2 * i + 1) + "done."}])
            for i in range(n)]


@pytest.fixture(scope="module")
def enc(tok):
    return encode_examples(_records(4), tok, max_length=256)


def _kron_reference(model, layout, proj: FactoredProjector) -> np.ndarray:
    """The dense (dim × P) matrix ⊕_tensors (P_out ⊗ P_in) (Conv1D: P_in ⊗ P_out; bias: P_out), built
    explicitly from the projector's per-module matrices and the layout's stored tensor shapes."""
    modules = dict(model.named_modules())
    rows = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        mod, _, attr = name.rpartition(".")
        p_out, p_in = proj.matrices(mod)
        if attr == "bias":
            block = p_out
        elif type(modules[mod]).__name__ == "Conv1D":
            block = np.kron(p_in, p_out)
            assert shape == (p_in.shape[1], p_out.shape[1])
        else:
            block = np.kron(p_out, p_in)
            assert shape == (p_out.shape[1], p_in.shape[1])
        rows.append(block)
    total = sum(b.shape[0] for b in rows)
    out = np.zeros((total, layout.n_params))
    r = c = 0
    for b in rows:
        out[r:r + b.shape[0], c:c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return out


@pytest.mark.parametrize("which", ["llama_mlp", "llama_lora", "gpt2_with_bias"])
def test_factored_equals_dense_kronecker_projection(tok, enc, which):
    if which == "gpt2_with_bias":
        model = tiny_gpt2(vocab_size=len(tok))
        layout = select_parameters(model, "transformer.h.*.mlp.*")
        assert any(n.endswith("bias") for n in layout.names)
    elif which == "llama_lora":
        model = add_lora(tiny_llama(vocab_size=len(tok), seed=1), r=2, alpha=4, seed=3)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # fresh LoRA has B = 0: give B values so every adapter has a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        layout = select_parameters(model, "lora")
    else:
        model = tiny_llama(vocab_size=len(tok))
        layout = select_parameters(model, "mlp")
    assert next(model.parameters()).dtype == torch.float64
    proj = FactoredProjector(model, layout, 60, seed=7)
    # k = isqrt(60 / L) < the layer widths, so both sides really compress somewhere
    assert any(f.k_in < f.d_in and f.k_out < f.d_out for f in proj.factors.values())
    exact, loss_ref = per_example_grads(model, layout, enc, method="loop", pad_token_id=tok.pad_token_id)
    want = exact.numpy() @ _kron_reference(model, layout, proj).T
    got, loss = factored_features(model, layout, enc, proj, pad_token_id=tok.pad_token_id)
    assert got.shape == (len(enc), proj.dim) and proj.dim <= 60 and np.abs(want).max() > 0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(proj.project(exact).numpy(), want, rtol=1e-9, atol=1e-13)  # materialised path
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0)


def test_factored_batch_invariant_and_seeded(tok, enc):
    model = tiny_llama(vocab_size=len(tok))
    layout = select_parameters(model, "mlp")
    proj = FactoredProjector(model, layout, 40, seed=0)
    batch, _ = factored_features(model, layout, enc, proj, pad_token_id=tok.pad_token_id)
    for i in range(len(enc)):
        alone, _ = factored_features(model, layout, [enc[i]], proj, pad_token_id=tok.pad_token_id)
        np.testing.assert_allclose(batch[i].numpy(), alone[0].numpy(), rtol=0, atol=1e-12)
    # a module's matrices depend on (seed, module name) only, not on which other modules are tracked
    sub = select_parameters(model, "model.layers.1.mlp.*")
    other = FactoredProjector(model, sub, 3 * proj.factors["model.layers.1.mlp.up_proj"].k_in ** 2, seed=0)
    for a, b in zip(other.matrices("model.layers.1.mlp.up_proj"), proj.matrices("model.layers.1.mlp.up_proj"),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert FactoredProjector(model, layout, 40, seed=1).id != proj.id
    assert not np.array_equal(FactoredProjector(model, layout, 40, seed=1).matrices("model.layers.0.mlp.up_proj")[0],
                              proj.matrices("model.layers.0.mlp.up_proj")[0])


def test_compute_grad_features_factored_methods_agree(tok, enc):
    model = tiny_llama(vocab_size=len(tok))
    layout = select_parameters(model, "mlp")
    proj = FactoredProjector(model, layout, 48, seed=2)
    fused = compute_grad_features(model, enc, layout=layout, projector=proj, batch_size=3,
                                  pad_token_id=tok.pad_token_id)
    loop = compute_grad_features(model, enc, layout=layout, projector=proj, batch_size=3, method="loop",
                                 pad_token_id=tok.pad_token_id)
    np.testing.assert_allclose(fused.values, loop.values, rtol=1e-9, atol=1e-12)
    assert fused.meta["projection"] == "factored" and fused.meta["proj_dim"] == proj.dim
    assert fused.meta["projector_id"] == proj.id and "factor_dims" in fused.meta


def test_factored_errors(tok):
    model = tiny_llama(vocab_size=len(tok))
    with pytest.raises(ParameterError, match="'projection'"):  # a norm weight is no Linear
        FactoredProjector(model, select_parameters(model, "last_blocks:1"), 64)
    layout = select_parameters(model, "mlp")
    with pytest.raises(ParameterError, match="'proj_dim'"):
        FactoredProjector(model, layout, len(layout.names) - 1)
    with pytest.raises(ParameterError, match="'proj_dim'"):
        GradFeaturesStep(projection="factored", proj_dim=None)
    with pytest.raises(ParameterError, match="'projection'"):
        GradFeaturesStep(projection="kron")


def test_step_records_projection_in_meta_and_key(tiny_folder, tmp_path):
    table = to_frame(_records(5))
    dense = GradFeaturesStep(model=str(tiny_folder), params="mlp", proj_dim=32, max_length=64, device="cpu")
    fact = GradFeaturesStep(model=str(tiny_folder), params="mlp", proj_dim=32, max_length=64, device="cpu",
                            projection="factored")
    assert "projection" not in dense._params(0)  # dense keys are the ones stored before the option existed
    assert fact._params(0)["projection"] == "factored"
    store = FeatureStore(tmp_path / "f")
    ctx = StepContext(seed=0, features=store, device="cpu")
    dense.apply(table, ctx)
    d = store["grad/sgd"]
    fact.apply(table, ctx)  # same store, same name: a different key, so it is recomputed, not reused
    f = store["grad/sgd"]
    assert d.meta["projection"] == "dense" and f.meta["projection"] == "factored"
    assert f.meta["cache_key"] != d.meta["cache_key"] and f.meta["projector_id"] != d.meta["projector_id"]
    assert f.values.shape == (5, f.meta["proj_dim"]) and f.meta["proj_dim"] <= 32
    np.testing.assert_allclose(np.linalg.norm(f.values, axis=1), 1, rtol=1e-5)


def test_cli_projection_option(tiny_folder, tmp_path, capsys):
    pool = tmp_path / "pool.parquet"
    to_frame(_records(4)).write_parquet(pool)
    args = ["gradients", str(pool), "--model", str(tiny_folder), "--params", "mlp", "--proj-dim", "32",
            "--max-length", "64", "--device", "cpu", "--projection", "factored", "--json"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["projection"] == "factored" and s["shape"] == [4, s["proj_dim"]] and s["proj_dim"] <= 32
    assert main([*args[:-3], "--projection", "factored", "--proj-dim", "0", "-o", str(tmp_path / "b")]) == 2
    assert "proj-dim" in capsys.readouterr().err
