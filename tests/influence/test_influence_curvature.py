"""Curvature exactness, fit error, bias folding, shared modules, Conv1D, guards, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _influence_models import DT, PlantedGradTask, RegressionTask, TinyLM, arith_sequences
from torch import nn

from curate.errors import ParameterError
from curate.influence import Curvature, LayerFactors, pairwise_scores
from curate.influence.exact import per_example_grads
from curate.influence.scores import example_gradients


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=DT)
    return m @ m.T + 0.5 * torch.eye(n, dtype=DT)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_influence_one_example_equals_exact_damped_inverse(strategy):
    """1a: one token, F = vec(G)vec(G)ᵀ = S ⊗ A exactly, so both iHVPs equal solve(F + λI, v)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).to(DT)
    ex = [(torch.randn(4, dtype=DT), torch.randn(3, dtype=DT))]

    class Task(RegressionTask):
        def loss(self, model, batch):
            return 0.5 * ((model(batch[0]) - batch[1]) ** 2).sum()

    lam = 0.3
    curv = Curvature(strategy=strategy, modules=["0"], fisher="empirical", damping=lam, dtype=DT)
    model = nn.Sequential(layer)
    curv.fit(model, Task(), ex)
    g = per_example_grads(model, Task(), ex, ["0"])["0"][0]
    f = torch.outer(g, g)
    v = torch.randn(3, 5, dtype=DT)
    want = torch.linalg.solve(f + lam * torch.eye(15, dtype=DT), v.reshape(-1)).reshape(3, 5)
    got = curv.precondition({"0": v})["0"]
    assert float((got - want).norm() / want.norm()) < 1e-10


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_influence_precondition_inverts_kronecker_product(strategy):
    """1b: P((S⊗A)v) = v at λ=1e-12 (catches multiply-instead-of-divide and swapped rotations)."""
    g = torch.Generator().manual_seed(1)
    s, a = _spd(3, g), _spd(5, g)
    f = LayerFactors(a_cov=a, s_cov=s)
    curv = Curvature.from_factors({"m": f}, strategy=strategy, damping=1e-12)
    f.lam = torch.outer(f.s_eigvals, f.a_eigvals)
    v = torch.randn(2, 3, 5, generator=g, dtype=DT)
    sv = s @ v @ a  # (S ⊗ A) vec(V) with row-major vec
    got = curv.precondition({"m": sv})["m"]
    assert torch.allclose(got, v, rtol=0, atol=1e-10 * float(v.abs().max()))
    # the damped inverse is not the identity map: a non-Kronecker input is not sent back to itself
    assert not torch.allclose(curv.precondition({"m": v})["m"], v, atol=1e-3)


@pytest.mark.parametrize("correlated", [False, True])
def test_influence_ekfac_fit_error_below_kfac(correlated):
    """2: ‖F − F_EKFAC‖_F ≤ ‖F − F_KFAC‖_F on N = 200 examples of a 4×6 layer."""
    g = torch.Generator().manual_seed(2)
    n = 200
    a = torch.randn(n, 6, generator=g, dtype=DT) * torch.linspace(0.5, 2, 6, dtype=DT)
    mix = torch.randn(4, 6, generator=g, dtype=DT)
    out_g = torch.randn(n, 4, generator=g, dtype=DT) + (a @ mix.T if correlated else 0)
    ex = [(a[i], out_g[i]) for i in range(n)]
    model = nn.Sequential(nn.Linear(6, 4, bias=False).to(DT))
    vecs = torch.einsum("no,ni->noi", out_g, a).reshape(n, -1)
    f = vecs.T @ vecs / n
    errs = {}
    for strategy in ("kfac", "ekfac"):
        curv = Curvature(strategy=strategy, modules=["0"], fisher="empirical", dtype=DT, batch_size=7).fit(
            model, PlantedGradTask(), ex)
        fac = curv.factors["0"]
        q = torch.kron(fac.s_eigvecs, fac.a_eigvecs)
        ev = curv.eigenvalues("0").reshape(-1)
        errs[strategy] = float((f - q @ torch.diag(ev) @ q.T).norm())
    assert errs["ekfac"] <= errs["kfac"] + 1e-12
    assert errs["ekfac"] < errs["kfac"]  # strictly, on these non-Kronecker data


def test_influence_identity_is_gradient_dot_product():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    ex = [(torch.randn(5, dtype=DT), torch.randn((), dtype=DT)) for _ in range(12)]
    curv = Curvature(strategy="identity", modules="all", dtype=DT).fit(model, RegressionTask(), ex)
    s = pairwise_scores(curv, model, RegressionTask(), ex[:3], ex, batch_size=5)
    ref = per_example_grads(model, RegressionTask(), ex, ["0", "2"])
    want = sum(ref[n][:3] @ ref[n].T for n in ref).numpy()
    np.testing.assert_allclose(s.values, want, rtol=1e-10, atol=1e-12)


def test_influence_bias_folding_equals_constant_feature():
    """9: a biased layer equals the bias-free layer fed an explicit constant-1 feature."""
    torch.manual_seed(4)
    biased = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    plain = nn.Sequential(nn.Linear(6, 3, bias=False), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    with torch.no_grad():
        plain[0].weight.copy_(torch.cat([biased[0].weight, biased[0].bias[:, None]], 1))
        plain[2].load_state_dict(biased[2].state_dict())
    xs = [torch.randn(5, dtype=DT) for _ in range(20)]
    ys = [torch.randn((), dtype=DT) for _ in range(20)]
    ex_b = list(zip(xs, ys))
    ex_p = [(torch.cat([x, torch.ones(1, dtype=DT)]), y) for x, y in ex_b]
    cb = Curvature(strategy="ekfac", modules=["0"], fisher="empirical", dtype=DT).fit(biased, RegressionTask(), ex_b)
    cp = Curvature(strategy="ekfac", modules=["0"], fisher="empirical", dtype=DT).fit(plain, RegressionTask(), ex_p)
    for k in ("a_cov", "s_cov", "lam"):
        torch.testing.assert_close(getattr(cb.factors["0"], k), getattr(cp.factors["0"], k), rtol=1e-10, atol=1e-12)
    sb = pairwise_scores(cb, biased, RegressionTask(), ex_b[:4], ex_b).values
    sp = pairwise_scores(cp, plain, RegressionTask(), ex_p[:4], ex_p).values
    np.testing.assert_allclose(sb, sp, rtol=1e-9)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_influence_shared_module_accumulates_calls():
    """10: a module applied twice per forward sums both calls and matches a for-loop reference."""
    torch.manual_seed(5)
    model = Shared().to(DT)
    ex = [(torch.randn(4, dtype=DT), torch.randn((), dtype=DT)) for _ in range(9)]
    curv = Curvature(strategy="ekfac", modules=["lin"], fisher="empirical", dtype=DT, batch_size=4).fit(
        model, RegressionTask(), ex)
    ref = per_example_grads(model, RegressionTask(), ex, ["lin"])["lin"]
    got = example_gradients(curv, model, RegressionTask(), ex, batch_size=4)["lin"].reshape(9, -1)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    fac = curv.factors["lin"]
    lam_ref = ((ref.reshape(9, 4, 5) @ fac.a_eigvecs).transpose(1, 2) @ fac.s_eigvecs).transpose(1, 2) ** 2
    torch.testing.assert_close(fac.lam, lam_ref.mean(0), rtol=1e-10, atol=1e-12)


def test_influence_conv1d_equals_linear():
    """11: GPT-2 Conv1D layers give the same scores as the same weights as nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(6)
    conv = nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(1, 6)).to(DT)
    lin = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    with torch.no_grad():
        for c, lnr in ((conv[0], lin[0]), (conv[2], lin[2])):
            lnr.weight.copy_(c.weight.T)
            lnr.bias.copy_(c.bias)
    ex = [(torch.randn(5, dtype=DT), torch.randn((), dtype=DT)) for _ in range(15)]
    task = RegressionTask()
    sc = pairwise_scores(Curvature(strategy="ekfac", modules="all", fisher="empirical", dtype=DT).fit(conv, task, ex),
                         conv, task, ex[:3], ex).values
    sl = pairwise_scores(Curvature(strategy="ekfac", modules="all", fisher="empirical", dtype=DT).fit(lin, task, ex),
                         lin, task, ex[:3], ex).values
    np.testing.assert_allclose(sc, sl, rtol=1e-9)


# ---------------------------------------------------------------- guards and persistence
def test_influence_nan_covariance_names_module():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).to(DT)
    ex = [(torch.tensor([1.0, float("nan"), 0.0], dtype=DT), torch.zeros((), dtype=DT))]
    with pytest.raises(FloatingPointError, match="'0'"):
        Curvature(strategy="kfac", modules=["0"], fisher="empirical", dtype=DT).fit(model, RegressionTask(), ex)


def test_influence_hooks_not_firing_raises():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.lin.weight, self.lin.bias)

    model = Functional().to(DT)
    ex = [(torch.zeros(3, dtype=DT), torch.zeros((), dtype=DT))]
    with pytest.raises(RuntimeError, match="lin"):
        Curvature(strategy="kfac", modules=["lin"], fisher="empirical", dtype=DT).fit(model, RegressionTask(), ex)


def test_influence_head_and_unknown_modules_refused():
    model = TinyLM().to(DT)
    with pytest.raises(ParameterError, match="lm_head"):
        Curvature(modules=["lm_head"]).fit(model, None, arith_sequences(2, 0))
    with pytest.raises(ParameterError, match="emb"):
        Curvature(modules=["emb"]).fit(model, None, arith_sequences(2, 0))
    with pytest.raises(ParameterError, match="nope"):
        Curvature(modules="blocks.0.mlp.fc1,nope").fit(model, None, arith_sequences(2, 0))
    from curate.influence import select_modules

    assert "lm_head" not in select_modules(model, "all")
    assert select_modules(model, "mlp") == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                            "blocks.1.mlp.fc2"]
    assert "lm_head" in select_modules(model, ["lm_head"], allow_head=True)


@pytest.mark.parametrize("kw", [{"strategy": "eigen"}, {"fisher": "wrong"}, {"damping": -1.0},
                                {"damping_scale": 0}, {"batch_size": 0}, {"max_examples": 0}])
def test_influence_parameter_validation(kw):
    with pytest.raises(ParameterError, match="of Curvature must be"):
        Curvature(**kw)


def test_influence_factors_saved_and_reuse_with_other_arguments_refused(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).to(DT)
    ex = [(torch.randn(4, dtype=DT), torch.randn((), dtype=DT)) for _ in range(10)]
    curv = Curvature(strategy="ekfac", modules=["0"], fisher="empirical", dtype=DT).fit(model, RegressionTask(), ex)
    curv.save(tmp_path / "f")
    back = Curvature(strategy="ekfac", modules=["0"], fisher="empirical", dtype=DT).load(tmp_path / "f")
    v = {"0": torch.randn(3, 5, dtype=DT)}
    torch.testing.assert_close(back.precondition(v)["0"], curv.precondition(v)["0"], rtol=0, atol=0)
    assert Curvature.from_folder(tmp_path / "f").strategy == "ekfac"
    with pytest.raises(ParameterError, match="strategy='ekfac' \\(asked 'kfac'\\)"):
        Curvature(strategy="kfac", modules=["0"], fisher="empirical", dtype=DT).load(tmp_path / "f")
    with pytest.raises(ParameterError, match="fisher"):
        Curvature(strategy="ekfac", modules=["0"], fisher="true", dtype=DT).load(tmp_path / "f")


def test_influence_rotated_grads_both_orders_agree():
    """Λ's rotation Q_Sᵀ G_n Q_A: rotating tokens first (short T) equals rotating G_n (long T)."""
    from curate.influence.curvature import LayerFactors, _rotated_grads, per_sequence_grads

    g = torch.Generator().manual_seed(0)
    qs = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    qa = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    f = LayerFactors(s_eigvecs=qs, a_eigvecs=qa)
    for t in (1, 200):  # 1: tokens first; 200: G_n first
        calls = [(torch.randn(3, t, 4, generator=g, dtype=torch.float64), torch.randn(3, t, 5, generator=g,
                  dtype=torch.float64), (torch.rand(3, t, generator=g) > 0.3).double()) for _ in range(2)]
        ref = qs.T @ per_sequence_grads(calls) @ qa
        torch.testing.assert_close(_rotated_grads(calls, f, torch.float64), ref, rtol=1e-12, atol=1e-12)
