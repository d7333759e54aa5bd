"""Factored (per-layer Kronecker) gradient projection (docs/methods/gradient-features.md §5).

Source: Choe et al., "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence
Functions" (LoGra, arXiv 2405.13954). For a linear layer y = W a (W ∈ ℝ^{d_out×d_in}) the
per-example weight gradient is a sum of outer products over the T positions of the row,

    G = Σ_t g_t a_tᵀ,   g_t = ∂ℓ/∂y_t,  a_t the layer input,

so with seeded P_in ∈ ℝ^{k_in×d_in} and P_out ∈ ℝ^{k_out×d_out} the projected gradient is

    φ = P_out G P_inᵀ = Σ_t (P_out g_t)(P_in a_t)ᵀ   (k_out × k_in),

and vec_row(φ) = (P_out ⊗ P_in) vec_row(G): a random projection whose matrix is the Kronecker
product of two small ones. Projecting a_t and g_t first costs O(T(d_in k_in + d_out k_out + k_in
k_out)) per row and layer and never forms the d_out × d_in gradient, against O(T d_in d_out + P d)
for the per-example gradient followed by a dense P × d sketch (:mod:`curate.features.projection`).
A bias gradient Σ_t g_t is projected by the layer's P_out. GPT-2 ``Conv1D`` stores W transposed
(d_in × d_out); its block is P_in G P_outᵀ so that it is again (P_in ⊗ P_out) on the stored layout.

Matrices: P = S/√k with S_ij = ±1 (``rademacher``) or N(0, 1) (``gaussian``), so E‖(P_out ⊗ P_in)
v‖² = ‖v‖² as for the dense sketch. Each module's pair is drawn from
``default_rng(SeedSequence([seed, STREAM_FACT, hash(module name), side]))``: a layer's matrices do
not depend on which other layers are tracked. A side whose width d ≤ k is not projected (P = I).

Dimensions: with L tracked modules and a total budget d, every module gets k = ⌊√(d/L)⌋ per side
(k_in = min(k, d_in), k_out = min(k, d_out)); the realised total Σ k_out·k_in (+ k_out per bias)
is ≤ d and is what the features' ``proj_dim`` records.

Deviation from LoGra: no projected-space curvature (LoGra's EK-FAC on projected factors); these are
LESS-style features (normalised, optionally Adam-preconditioned). Adam preconditioning is
element-wise on the full gradient, so with ``variant="adam"`` the gradient is formed per batch and
then projected factor-wise (still no P × d matrix).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.features.capture import param_modules, weight_dims
from curate.features.per_example import Layout, capture_layer_io

STREAM_FACT = 0x4C4F4752  # "LOGR": the seed stream of factored projections
KINDS = ("rademacher", "gaussian")
VERSION = 1


@dataclass(frozen=True)
class ModuleFactor:
    """One tracked module's projection sides: widths d and projected widths k (k == d: identity)."""

    module: str
    d_in: int
    d_out: int
    k_in: int
    k_out: int


@dataclass(frozen=True)
class _Block:
    """One tracked tensor: its module, ``weight``/``bias``, whether it is a transposed Conv1D,
    and its slices in the flat gradient (``src``) and in the projected vector (``dst``)."""

    module: str
    attr: str
    conv1d: bool
    src: slice
    dst: slice


def _side_matrix(seed: int, kind: str, module: str, side: int, k: int, d: int) -> np.ndarray:
    """The scaled float64 matrix P (k × d) of one side (0 = input, 1 = output) of ``module``."""
    if k >= d:
        return np.eye(d)
    tag = int.from_bytes(hashlib.blake2b(module.encode(), digest_size=4).digest(), "little")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), STREAM_FACT, tag, side]))
    if kind == "rademacher":
        n = k * d
        bits = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8))[:n]
        s = (bits.astype(np.float64) * 2 - 1).reshape(k, d)
    else:
        s = rng.standard_normal((k, d))
    return s / math.sqrt(k)


class FactoredProjector:
    """A seeded per-layer Kronecker projection of the gradients of tracked Linear / Conv1D tensors.

    Args:
        model: the model whose ``layout`` it projects (module types and widths are read from it).
        layout: from :func:`~curate.features.per_example.select_parameters`; every tensor must be
            the weight or bias of an ``nn.Linear`` or GPT-2 ``Conv1D``.
        dim: the total budget d (see the module docstring for how it is split).
        seed: the projection seed.
        kind: ``rademacher`` | ``gaussian``.

    Raises:
        ParameterError: a bad ``dim``/``kind``, a tracked tensor outside Linear/Conv1D, or d smaller
            than the number of tracked modules.
    """

    projection = "factored"

    def __init__(self, model: Any, layout: Layout, dim: int, *, seed: int = 0, kind: str = "rademacher") -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise param_error("FactoredProjector", "dim", "an integer >= 1", dim)
        if kind not in KINDS:
            raise param_error("FactoredProjector", "kind", f"one of {KINDS}", kind)
        try:
            tracked = param_modules(model, layout.names)
        except TypeError as exc:
            raise param_error("grad_features", "projection", "'dense' when a tracked tensor is not the weight or "
                              f"bias of an nn.Linear / Conv1D ({exc})", "factored") from None
        modules = dict(model.named_modules())
        widths: dict[str, tuple[int, int]] = {}  # module -> (d_in, d_out)
        for t in tracked:
            d_out, d_in = weight_dims(modules[t.module])
            widths.setdefault(t.module, (d_in, d_out))
        k = math.isqrt(dim // len(widths)) if dim >= len(widths) else 0
        if k < 1:
            raise param_error("grad_features", "proj_dim", f"at least the number of tracked modules ({len(widths)}) "
                              "for the factored projection", dim)
        self.factors = {nm: ModuleFactor(nm, di, do, min(k, di), min(k, do)) for nm, (di, do) in widths.items()}
        blocks, src, dst = [], 0, 0
        for t, size in zip(tracked, layout.sizes, strict=True):
            f = self.factors[t.module]
            out = f.k_out if t.attr == "bias" else f.k_out * f.k_in
            blocks.append(_Block(f.module, t.attr, t.conv1d, slice(src, src + size), slice(dst, dst + out)))
            src, dst = src + size, dst + out
        self.blocks: tuple[_Block, ...] = tuple(blocks)
        self.n_params, self.dim, self.requested_dim = layout.n_params, dst, int(dim)
        self.seed, self.kind, self.layout_hash = int(seed), kind, layout.hash
        self.identity = False
        self._np: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._torch: dict[tuple[str, str, Any], tuple[Any, Any]] = {}

    @property
    def id(self) -> str:
        """Hash of (seed, kind, per-module widths, layout hash); features from different ids never mix."""
        key = {"v": VERSION, "projection": "factored", "seed": self.seed, "kind": self.kind, "layout": self.layout_hash,
               "factors": [[f.module, f.d_in, f.d_out, f.k_in, f.k_out] for f in self.factors.values()]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def describe(self) -> dict[str, Any]:
        """Projector metadata for feature ``meta`` (``proj_dim`` is the realised total)."""
        return {"projector_id": self.id, "projection": "factored", "proj_seed": self.seed, "proj_kind": self.kind,
                "n_params": self.n_params, "proj_dim": self.dim, "proj_dim_requested": self.requested_dim,
                "identity": False, "factor_dims": {f.module: [f.k_out, f.k_in] for f in self.factors.values()}}

    def matrices(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(P_out, P_in) of ``module`` as scaled float64 arrays, (k_out × d_out) and (k_in × d_in)."""
        if module not in self._np:
            f = self.factors[module]
            self._np[module] = (_side_matrix(self.seed, self.kind, module, 1, f.k_out, f.d_out),
                                _side_matrix(self.seed, self.kind, module, 0, f.k_in, f.d_in))
        return self._np[module]

    def _tmat(self, module: str, like: Any) -> tuple[Any, Any]:
        torch = require("torch", "gradient projection")
        key = (module, str(like.device), like.dtype)
        if key not in self._torch:
            p_out, p_in = self.matrices(module)
            self._torch[key] = (torch.from_numpy(p_out).to(like.device, like.dtype),
                                torch.from_numpy(p_in).to(like.device, like.dtype))
        return self._torch[key]

    def _ftype(self, t: Any) -> Any:
        torch = require("torch", "gradient projection")
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ a materialised gradient
    def project(self, grads: Any) -> Any:
        """Φ = G (⊕_ℓ P_out,ℓ ⊗ P_in,ℓ)ᵀ for flattened gradients G (B, P), torch or numpy;
        float64 for float64 input, else float32 (used after Adam preconditioning and by tests)."""
        torch = require("torch", "gradient projection")
        is_np = isinstance(grads, np.ndarray)
        g = torch.from_numpy(np.asarray(grads)) if is_np else grads
        if g.ndim != 2 or g.shape[1] != self.n_params:
            raise SchemaError("gradients do not match the projector.", field="grads",
                              expected=f"(B, {self.n_params})", found=tuple(g.shape))
        g = g.to(self._ftype(g))
        b = g.shape[0]
        out = torch.empty((b, self.dim), dtype=g.dtype, device=g.device)
        for blk in self.blocks:
            f = self.factors[blk.module]
            p_out, p_in = self._tmat(blk.module, g)
            x = g[:, blk.src]
            if blk.attr == "bias":
                y = x @ p_out.T
            elif blk.conv1d:
                y = p_in @ x.reshape(b, f.d_in, f.d_out) @ p_out.T
            else:
                y = p_out @ x.reshape(b, f.d_out, f.d_in) @ p_in.T
            out[:, blk.dst] = y.reshape(b, -1)
        return out.cpu().numpy() if is_np else out

    # ------------------------------------------------------------------ from layer factors
    def project_io(self, io: dict[str, list[tuple[Any, Any]]], batch: int, like: Any) -> Any:
        """Φ (B, dim) from each module's captured (input a (B, T, d_in), output gradient g (B, T, d_out))
        pairs, one per call, projecting a and g before their outer product (the module docstring's
        Σ_t (P_out g_t)(P_in a_t)ᵀ)."""
        torch = require("torch", "gradient projection")
        out = torch.zeros((batch, self.dim), dtype=self._ftype(like), device=like.device)
        proj: dict[str, list[tuple[Any, Any]]] = {}
        for module, calls in io.items():
            p_out, p_in = self._tmat(module, out)
            proj[module] = [(g.to(out.dtype) @ p_out.T, a.to(out.dtype) @ p_in.T) for a, g in calls]
        for blk in self.blocks:
            acc = None
            for pg, pa in proj[blk.module]:
                if blk.attr == "bias":
                    part = pg.sum(dim=1)
                elif blk.conv1d:
                    part = torch.einsum("btq,btp->bqp", pa, pg)
                else:
                    part = torch.einsum("btp,btq->bpq", pg, pa)
                acc = part if acc is None else acc + part
            if acc is not None:
                out[:, blk.dst] = acc.reshape(batch, -1)
        return out


def factored_features(model: Any, layout: Layout, examples: Sequence[Any], projector: FactoredProjector, *,
                      loss_reduction: str = "mean", pad_token_id: int = 0) -> tuple[Any, Any]:
    """Projected per-example gradients (B, dim) and losses (B,) without forming any per-example gradient.

    One batched forward/backward captures every tracked module's inputs and output gradients
    (:func:`~curate.features.per_example.capture_layer_io`); :meth:`FactoredProjector.project_io`
    projects both before their outer product. Equal to ``projector.project(per_example_grads(...))``
    up to float round-off (tested in float64).
    """
    _, cap = capture_layer_io(model, layout, examples, loss_reduction, pad_token_id)
    io = {m: [(a, g) for a, g, _ in cap.calls(m, fold_bias=False)] for m in projector.factors}
    return projector.project_io(io, len(examples), next(model.parameters())), cap.loss
