"""The one capture mechanism: captured (a, g) give every tracked layer's per-example gradient
Σ_t g_t ā_tᵀ exactly (float64, against autograd one row at a time), one pair per call of a shared
module, bias folding, token masks, micro-batch invariance, frozen untracked weights, strictness."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from curate.features.capture import (  # noqa: E402
    TrackedModules,
    batch_captures,
    is_conv1d,
    layer_dims,
    param_modules,
    per_sequence_grads,
    weight_dims,
)

DT = torch.float64
B, T, D = 3, 5, 4


class SharedNet(nn.Module):
    """x (B,T,4) → inp (bias) → tanh → shared (no bias) twice → out (bias); ``spare`` runs but never
    reaches the loss. Row losses do not mix rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D, 6).to(DT)
        self.shared = nn.Linear(6, 6, bias=False).to(DT)
        self.out = nn.Linear(6, 2).to(DT)
        self.spare = nn.Linear(6, 3).to(DT)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        self.spare(h)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.out(h)


def _row_losses(model, x, y):
    return ((model(x) - y) ** 2).sum(dim=(1, 2)) * 0.5


def _data(n: int = B):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(T, D, generator=g, dtype=DT), torch.randn(T, 2, generator=g, dtype=DT)) for _ in range(n)]


def _collate(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _autograd_layer_grads(model, rows, names):
    """Per row: [∂ℓ/∂W | ∂ℓ/∂b] of each module from autograd on the parameters, one row at a time."""
    mods = dict(model.named_modules())
    out = {n: [] for n in names}
    for x, y in rows:
        loss = _row_losses(model, x[None], y[None]).sum()
        for n in names:
            ps = [mods[n].weight] + ([mods[n].bias] if mods[n].bias is not None else [])
            gs = [torch.zeros_like(p) if gr is None else gr
                  for gr, p in zip(torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True), ps)]
            out[n].append(torch.cat([gs[0]] + ([gs[1][:, None]] if len(gs) > 1 else []), dim=1))
    return {n: torch.stack(v) for n, v in out.items()}


NAMES = ["inp", "shared", "out", "spare"]


def test_captures_give_exact_per_example_layer_gradients():
    model = SharedNet()
    rows = _data()
    (cap,) = batch_captures(model, NAMES, rows, collate=_collate, loss=lambda b: _row_losses(model, *b))
    ref = _autograd_layer_grads(model, rows, NAMES)
    for n in NAMES:
        got = per_sequence_grads(cap.calls(n))
        assert got.shape == (B, *layer_dims(dict(model.named_modules())[n]))
        torch.testing.assert_close(got, ref[n], rtol=1e-12, atol=1e-14)
    assert ref["shared"].abs().max() > 0 and ref["spare"].abs().max() == 0
    torch.testing.assert_close(cap.loss, _row_losses(model, *_collate(rows)).detach())


def test_shared_module_gives_one_pair_per_call_and_unused_output_gets_zero_gradient():
    model = SharedNet()
    (cap,) = batch_captures(model, NAMES, _data(), collate=_collate, loss=lambda b: _row_losses(model, *b))
    assert [len(cap.calls(n)) for n in NAMES] == [1, 2, 1, 1]
    a1, g1, _ = cap.calls("shared")[0]
    a2, _, _ = cap.calls("shared")[1]
    assert not torch.equal(a1, a2) and g1.abs().max() > 0  # the two calls see different inputs
    assert all(g.abs().max() == 0 for _, g, _ in cap.calls("spare"))


def test_bias_folding_and_shapes():
    model = SharedNet()
    (cap,) = batch_captures(model, ["inp", "shared"], _data(), collate=_collate, loss=lambda b: _row_losses(model, *b))
    a, g, m = cap.calls("inp")[0]
    assert a.shape == (B, T, D + 1) and g.shape == (B, T, 6) and m.shape == (B, T)
    assert torch.equal(a[..., -1], torch.ones(B, T, dtype=DT))
    raw, _, _ = cap.calls("inp", fold_bias=False)[0]
    torch.testing.assert_close(raw, a[..., :-1], rtol=0, atol=0)
    assert cap.calls("shared")[0][0].shape == (B, T, 6)  # no bias, nothing folded
    # the folded bias column is Σ_t g_t, the bias gradient
    torch.testing.assert_close(per_sequence_grads(cap.calls("inp"))[..., -1], g.sum(1), rtol=1e-12, atol=1e-14)


def test_mask_dtype_and_two_dim_inputs():
    model = nn.Linear(3, 2).to(DT)
    rows = [torch.randn(T, 3, dtype=DT) for _ in range(2)]
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    (cap,) = batch_captures(model, [""], rows, collate=torch.stack, loss=lambda x: model(x).sum(),
                            mask=lambda _b: mask, dtype=torch.float32)
    a, g, m = cap.calls("")[0]
    assert a.dtype == g.dtype == m.dtype == torch.float32 and torch.equal(m, mask.float())
    g2 = torch.Generator().manual_seed(2)
    flat = [torch.randn(3, generator=g2, dtype=DT) for _ in range(4)]
    (cap,) = batch_captures(model, [""], flat, collate=torch.stack, loss=lambda x: model(x).sum(),
                            mask=lambda _b: mask)  # (B, d) input: one token per row, mask does not fit → 1
    a, g, m = cap.calls("")[0]
    assert a.shape == (4, 1, 4) and torch.equal(m, torch.ones(4, 1, dtype=DT))


def test_micro_batches_do_not_change_per_example_gradients():
    model = SharedNet()
    rows = _data(5)
    whole = [per_sequence_grads(c.calls("shared")) for c in
             batch_captures(model, NAMES, rows, collate=_collate, loss=lambda b: _row_losses(model, *b))]
    parts = [per_sequence_grads(c.calls("shared")) for c in
             batch_captures(model, NAMES, rows, batch_size=2, collate=_collate, loss=lambda b: _row_losses(model, *b))]
    assert [p.shape[0] for p in parts] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(parts), whole[0], rtol=1e-12, atol=1e-14)


def test_only_tracked_parameters_require_grad_inside_and_everything_is_restored():
    model = SharedNet()
    model.out.bias.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with TrackedModules(model, ["shared", "out"]) as tr:
        inside = {n: p.requires_grad for n, p in model.named_parameters()}
        tr.reset()
        tr.backward(_row_losses(model, *_collate(_data())))
        assert len(tr.calls("shared")) == 2
    assert inside == {n: n.startswith(("shared.", "out.")) for n in before}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    tr.reset()
    model(_collate(_data())[0])  # hooks are gone: nothing is captured after the block
    assert tr.cap.a == {}
    with TrackedModules(model, ["inp"], params=["inp.weight"]):
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["inp.weight"]


def test_strict_refuses_a_module_that_did_not_run():
    model = SharedNet()
    model.unused = nn.Linear(2, 2).to(DT)
    def run(strict: bool):
        return list(batch_captures(model, ["inp", "unused"], _data(), collate=_collate,
                                   loss=lambda b: _row_losses(model, *b), strict=strict))[0]

    with pytest.raises(RuntimeError, match="unused"):
        run(True)
    assert run(False).calls("unused") == []


def test_conv1d_is_transposed_linear():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(3)
    conv = pytorch_utils.Conv1D(5, 3).to(DT)  # weight (d_in=3, d_out=5)
    assert is_conv1d(conv) and weight_dims(conv) == (5, 3) and layer_dims(conv) == (5, 4)
    x = torch.randn(2, T, 3, dtype=DT)
    (cap,) = batch_captures(conv, [""], [x[0], x[1]], collate=torch.stack, loss=lambda b: (conv(b) ** 2).sum())
    got = per_sequence_grads(cap.calls(""))
    for b in range(2):
        gw, gb = torch.autograd.grad((conv(x[b : b + 1]) ** 2).sum(), [conv.weight, conv.bias])
        torch.testing.assert_close(got[b], torch.cat([gw.T, gb[:, None]], 1), rtol=1e-12, atol=1e-14)


def test_param_modules_maps_tensors_and_refuses_others():
    model = SharedNet()
    model.emb = nn.Embedding(4, 2)
    tracked = param_modules(model, ["inp.weight", "inp.bias", "shared.weight"])
    assert [(t.module, t.attr, t.conv1d) for t in tracked] == [("inp", "weight", False), ("inp", "bias", False),
                                                                ("shared", "weight", False)]
    with pytest.raises(TypeError, match="emb.weight"):
        param_modules(model, ["emb.weight"])


def test_influence_keeps_the_old_names():
    from curate.features import capture
    from curate.influence._capture import Tracker, select_modules

    assert Tracker is TrackedModules and select_modules is capture.select_modules
