"""Layer inputs and output gradients of tracked ``nn.Linear`` / GPT-2 ``Conv1D`` modules: the one
capture mechanism behind curvature, influence scores, Quad's reward, per-example gradients and the
factored projection (docs/methods/ekfac.md §2-§3, docs/methods/gradient-features.md §4-§5).

For a tracked layer y_t = W a_t + b applied at positions t = 1..T of one row, with loss ℓ,

    g_t = ∂ℓ/∂y_t,    ∂ℓ/∂W = Σ_t g_t a_tᵀ,    ∂ℓ/∂b = Σ_t g_t,

so with the bias folded into the input, ā_t = [a_t; 1], the whole layer gradient is one sum of
outer products, [∂ℓ/∂W | ∂ℓ/∂b] = Σ_t g_t ā_tᵀ (d_out × (d_in+1), bias column last). The pair
(a, g) is all any consumer needs: per-example gradients (:func:`per_sequence_grads`), the K-FAC
covariances A = E[ā āᵀ] and S = E[g gᵀ], rotated or projected gradients Σ_t (Q g_t)(R ā_t)ᵀ.

Mechanism (:class:`TrackedModules`): a forward hook stores each call's input a (detached) and
output y; after the forward pass a single ``torch.autograd.grad(loss, [y, ...])`` gives every g at
once, so no parameter's ``.grad`` is touched and no weight gradient is formed. While tracking, only
the tracked parameters require grad (the rest of the model is frozen and restored on exit): that
keeps every tracked output on the autograd graph and saves nothing for untracked weights. When the
loss is a sum of per-row losses and rows do not interact (right padding with causal attention, or
no cross-row operation), g_t of row b is the gradient of row b's own loss, so a batched pass gives
per-example (a, g). A module called several times in one forward pass (shared weights) yields one
(a, g) pair per call; its gradient is the sum over calls. An output that does not reach the loss
gets g = 0.

:func:`batch_captures` is the one loop every consumer runs: micro-batch → collate → loss → one
backward → a :class:`BatchCapture` holding that batch's pairs and token mask m_t (padding masked
out of the covariances and scores). Module selection for influence (:func:`select_modules`: MLP /
attention presets by name, the output head only on request) lives here too, as does the mapping of
parameter names to their modules (:func:`param_modules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from curate._lazy import require
from curate.errors import ParameterError, param_error


def _torch() -> Any:
    # torch is imported when a capture is made, not with the package (``import curate`` stays light)
    return require("torch", "activation and gradient capture")


MLP_PATTERN = re.compile(r"(^|\.)mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj|fc1|fc2)$")
ATTN_PATTERN = re.compile(r"(^|\.)(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj|c_attn|c_proj)$")


# ================================================================================ what is tracked
def is_conv1d(module: Any) -> bool:
    """HF GPT-2 ``Conv1D`` (y = x W + b with W of shape (d_in, d_out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_trackable(module: Any) -> bool:
    """Whether hooks can capture ``module``: an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    torch = _torch()
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def weight_dims(module: Any) -> tuple[int, int]:
    """(d_out, d_in) of a tracked module, whatever the storage order of its weight."""
    w = module.weight
    d_out, d_in = (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])
    return int(d_out), int(d_in)


def layer_dims(module: Any) -> tuple[int, int]:
    """(d_out, d_in + 1 if bias else d_in): the shape of the bias-folded layer gradient."""
    d_out, d_in = weight_dims(module)
    return d_out, d_in + (1 if module.bias is not None else 0)


def _head_names(model: Any) -> set[str]:
    """Names of embeddings and the output head: never tracked without an explicit opt-in."""
    torch = _torch()
    heads: set[str] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) or mod is out_emb or name.split(".")[-1] in ("lm_head", "embed_out"):
            heads.add(name)
    return heads


def select_modules(model: Any, modules: str | Sequence[str], *, allow_head: bool = False) -> list[str]:
    """Names of the tracked modules (docs/methods/ekfac.md §2).

    Args:
        model: any ``nn.Module``.
        modules: ``"mlp"`` (Llama gate/up/down_proj, GPT-2 c_fc/c_proj, fc1/fc2 under ``mlp``),
            ``"mlp+attn"``, ``"all"`` (every Linear/Conv1D except the head) or a list of names.
        allow_head: allow ``lm_head`` / embeddings when named explicitly.

    Raises:
        ParameterError: unknown names, non-Linear modules, the head without opt-in, or no module.
    """
    named = dict(model.named_modules())
    heads = _head_names(model)
    if isinstance(modules, str) and modules in ("mlp", "mlp+attn", "all"):
        names = []
        for name, mod in named.items():
            if not is_trackable(mod) or name in heads:
                continue
            if modules == "all" or MLP_PATTERN.search(name) or (modules == "mlp+attn" and ATTN_PATTERN.search(name)):
                names.append(name)
        if not names:
            raise param_error("Curvature", "modules", f"a preset that matches some nn.Linear of the model ({modules!r} matched none)", modules)
        return names
    wanted = [m.strip() for m in modules.split(",")] if isinstance(modules, str) else list(modules)
    unknown = [m for m in wanted if m not in named]
    if unknown:
        linear = [n for n, m in named.items() if is_trackable(m)]
        raise ParameterError(
            f"The 'modules' parameter of Curvature names unknown modules {unknown[:5]}. "
            f"Trackable modules include {linear[:8]}."
        )
    for m in wanted:
        if not is_trackable(named[m]):
            raise param_error("Curvature", "modules", "names of nn.Linear (or GPT-2 Conv1D) modules", f"{m} is {type(named[m]).__name__}")
        if m in heads and not allow_head:
            raise ParameterError(
                f"The 'modules' parameter of Curvature names the output head or an embedding ({m!r}); "
                "its curvature is vocabulary-sized. Pass allow_head=True to track it anyway."
            )
    if not wanted:
        raise param_error("Curvature", "modules", "a non-empty list", wanted)
    return wanted


class TrackedTensor(NamedTuple):
    """One tracked parameter tensor: its name, its module's name, ``weight``/``bias``, and whether the
    module is a Conv1D (whose weight gradient is the transpose of Σ_t g_t a_tᵀ)."""

    param: str
    module: str
    attr: str
    conv1d: bool


def param_modules(model: Any, params: Sequence[str]) -> list[TrackedTensor]:
    """The module of every named parameter, in order.

    Raises:
        TypeError: a parameter that is not the weight or bias of an ``nn.Linear`` / ``Conv1D``
            (its gradient is not Σ_t g_t a_tᵀ, so it cannot come from a capture).
    """
    modules = dict(model.named_modules())
    out = []
    for n in params:
        mod_name, _, attr = n.rpartition(".")
        mod = modules.get(mod_name)
        if attr not in ("weight", "bias") or mod is None or not is_trackable(mod):
            raise TypeError(f"parameter {n} does not belong to an nn.Linear or Conv1D; use method='func' or 'loop'.")
        out.append(TrackedTensor(n, mod_name, attr, is_conv1d(mod)))
    return out


# ================================================================================ the mechanism
@dataclass
class Capture:
    """Raw per-call storage of one forward/backward: module name -> [a], [y] (until the backward),
    [g] (after it)."""

    a: dict[str, list[Any]] = field(default_factory=dict)
    y: dict[str, list[Any]] = field(default_factory=dict)
    g: dict[str, list[Any]] = field(default_factory=dict)


def _calls(module: Any, a_list: Sequence[Any], g_list: Sequence[Any], mask: Any | None, dtype: Any | None,
           fold_bias: bool) -> list[tuple[Any, Any, Any]]:
    """[(a (B,T,i), g (B,T,o), m (B,T))] per call: cast to ``dtype`` (None keeps it), token axes
    flattened to one (a 2-D input is one token per row), the bias folded as a last column of ones
    when ``fold_bias`` and the module has a bias; m is ``mask`` when it fits the token axis, else 1."""
    torch = _torch()
    out = []
    for a, g in zip(a_list, g_list, strict=True):
        if dtype is not None:
            a, g = a.to(dtype), g.to(dtype)
        if a.dim() == 2:
            a, g = a[:, None, :], g[:, None, :]
        elif a.dim() > 3:
            a, g = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
        if fold_bias and module.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if mask is not None and tuple(mask.shape) == tuple(a.shape[:2]):
            m = mask.to(device=a.device, dtype=a.dtype)
        else:
            m = torch.ones(a.shape[:2], dtype=a.dtype, device=a.device)
        out.append((a, g, m))
    return out


class TrackedModules:
    """Context manager that hooks the named modules of ``model`` and captures (a, g) per call.

    Inside the ``with`` block only the tracked parameters require grad (``params``: parameter names,
    default every parameter of the tracked modules); the flags and the hooks are restored on exit.
    Use: ``reset()``, run the forward pass and the loss, ``backward(loss)``, then ``calls(name, mask)``.

    Args:
        model: any ``nn.Module``.
        names: module names (from :func:`select_modules`, or the modules of :func:`param_modules`).
        dtype: dtype of the tensors :meth:`calls` returns (None keeps the model's).
        params: names of the parameters that require grad while tracking.
        strict: raise when a tracked module did not run in the forward pass (else it has no calls).
    """

    def __init__(self, model: Any, names: Sequence[str], dtype: Any = None, *, params: Sequence[str] | None = None,
                 strict: bool = True) -> None:
        self.model, self.names, self.dtype, self.strict = model, list(names), dtype, strict
        self.modules = dict(model.named_modules())
        unknown = [n for n in self.names if n not in self.modules]
        if unknown:
            raise ValueError(f"tracked modules {unknown[:5]} are not modules of the model.")
        self.params = None if params is None else list(params)
        self.cap = Capture()
        self._handles: list[Any] = []
        self._flags: list[tuple[Any, bool]] = []

    def _grad_ids(self) -> set[int]:
        # by identity, not name: a tied weight has one name in named_parameters() but is the
        # tracked module's parameter all the same
        if self.params is None:
            return {id(p) for n in self.names for p in self.modules[n].parameters(recurse=False)}
        named = dict(self.model.named_parameters())
        return {id(named[p]) for p in self.params}

    def __enter__(self) -> TrackedModules:
        keep = self._grad_ids()
        for p in self.model.parameters():
            self._flags.append((p, p.requires_grad))
            p.requires_grad_(id(p) in keep)
        for name in self.names:
            self._handles.append(self.modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._handles, self._flags = [], []

    def _hook(self, name: str) -> Any:
        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            self.cap.a.setdefault(name, []).append(inputs[0].detach())
            self.cap.y.setdefault(name, []).append(output)

        return hook

    def reset(self) -> None:
        """Forget the previous batch (a :class:`BatchCapture` of it keeps its own copy)."""
        self.cap = Capture()

    def backward(self, loss: Any) -> None:
        """Fill ``cap.g`` with g = ∂loss/∂y for every call at once (a non-scalar loss is summed).

        Raises:
            RuntimeError: with ``strict``, a tracked module whose hook did not fire.
        """
        torch = _torch()
        missing = [n for n in self.names if n not in self.cap.y]
        if missing and self.strict:
            raise RuntimeError(
                f"the hooks of tracked module(s) {missing[:5]} did not fire in the forward pass "
                "(is the weight used functionally, or the module not on the loss path?)."
            )
        outs = [y for n in self.names for y in self.cap.y.get(n, [])]
        total = loss.sum() if loss.dim() > 0 else loss
        grads = torch.autograd.grad(total, outs, allow_unused=True) if outs else ()
        it = iter(grads)
        for n in self.names:
            self.cap.g[n] = [torch.zeros_like(y) if (gr := next(it)) is None else gr.detach()
                             for y in self.cap.y.get(n, [])]
        self.cap.y = {}

    def calls(self, name: str, mask: Any | None = None, *, fold_bias: bool = True) -> list[tuple[Any, Any, Any]]:
        """[(a (B,T,i), g (B,T,o), m (B,T))] per call of ``name`` in the last batch, bias folded."""
        return _calls(self.modules[name], self.cap.a.get(name, []), self.cap.g.get(name, []), mask, self.dtype,
                      fold_bias)


@dataclass
class BatchCapture:
    """The captures of one micro-batch.

    Attributes:
        examples: the micro-batch's examples; batch: what ``collate`` made of them.
        loss: the loss value (detached; per row when the loss function returned one per row).
        mask: the (B, T) token mask m_t, or None (every position counts).
    """

    examples: Sequence[Any]
    batch: Any
    loss: Any
    mask: Any | None
    cap: Capture
    modules: dict[str, Any]
    dtype: Any = None

    def calls(self, name: str, *, fold_bias: bool = True) -> list[tuple[Any, Any, Any]]:
        """[(a (B,T,i), g (B,T,o), m (B,T))] per call of module ``name`` (:class:`TrackedModules`)."""
        return _calls(self.modules[name], self.cap.a.get(name, []), self.cap.g.get(name, []), self.mask, self.dtype,
                      fold_bias)


def batch_captures(
    model: Any,
    names: Sequence[str],
    examples: Sequence[Any],
    *,
    loss: Callable[[Any], Any],
    collate: Callable[[Sequence[Any]], Any] | None = None,
    mask: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    dtype: Any = None,
    params: Sequence[str] | None = None,
    strict: bool = True,
) -> Iterator[BatchCapture]:
    """For every micro-batch of ``examples``: collate, forward and loss, one backward, its captures.

    The modules stay hooked (and the untracked parameters frozen) until the generator is exhausted
    or closed; consume it fully, or close it, before using the model for anything else.

    Args:
        model, names: the model and the tracked module names.
        examples: the rows, cut into micro-batches of ``batch_size`` (None: one batch) in order.
        loss: batch -> the loss (a scalar, or one value per row, summed for the backward).
        collate: examples -> batch (None: the list itself).
        mask: batch -> the (B, T) token mask m_t, or None.
        dtype, params, strict: as :class:`TrackedModules`.
    """
    rows = list(examples)
    step = len(rows) if batch_size is None else int(batch_size)
    with TrackedModules(model, names, dtype, params=params, strict=strict) as tr:
        for s in range(0, len(rows), max(step, 1)):
            chunk = rows[s : s + step]
            batch = collate(chunk) if collate is not None else chunk
            tr.reset()
            value = loss(batch)
            tr.backward(value)
            yield BatchCapture(chunk, batch, value.detach(), mask(batch) if mask is not None else None, tr.cap,
                               tr.modules, dtype)


def per_sequence_grads(calls: Sequence[tuple[Any, Any, Any]]) -> Any:
    """G_b = Σ_calls Σ_t m_t g_t a_tᵀ for every row b, shape (B, d_out, d_in(+1)).

    With folded calls this is [∂ℓ_b/∂W | ∂ℓ_b/∂b] (a Conv1D's stored weight gradient is its
    transpose); ``0`` when there is no call."""
    torch = _torch()
    total = 0
    for a, g, m in calls:
        total = total + torch.einsum("bto,bti->boi", g * m[..., None], a)
    return total
