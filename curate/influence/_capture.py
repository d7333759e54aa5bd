"""Module selection and activation/output-gradient capture for tracked layers (docs/methods/ekfac.md §2-§3).

A forward hook stores each tracked module's input a (bias folded: a constant 1 appended) and its
output; after the loss, ``torch.autograd.grad`` gives g = ∂L/∂y for every call at once, so no
parameter ``.grad`` is touched. A module called several times per forward pass yields one
(a, g) pair per call; everything downstream sums over calls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from curate._lazy import require
from curate.errors import ParameterError, param_error

torch = require("torch", "influence functions")

MLP_PATTERN = re.compile(r"(^|\.)mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj|fc1|fc2)$")
ATTN_PATTERN = re.compile(r"(^|\.)(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj|c_attn|c_proj)$")


def is_conv1d(module: Any) -> bool:
    """HF GPT-2 ``Conv1D`` (y = x W + b with W of shape (d_in, d_out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def is_trackable(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def layer_dims(module: Any) -> tuple[int, int]:
    """(d_out, d_in + 1 if bias else d_in) of a tracked module."""
    w = module.weight
    d_out, d_in = (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])
    return int(d_out), int(d_in) + (1 if module.bias is not None else 0)


def _head_names(model: Any) -> set[str]:
    """Names of embeddings and the output head: never tracked without an explicit opt-in."""
    heads: set[str] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) or mod is out_emb or name.split(".")[-1] in ("lm_head", "embed_out"):
            heads.add(name)
    return heads


def select_modules(model: Any, modules: str | Sequence[str], *, allow_head: bool = False) -> list[str]:
    """Names of the tracked modules.

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


@dataclass
class Capture:
    """Per-batch captured (a, g, mask) for every call of every tracked module."""

    a: dict[str, list[Any]] = field(default_factory=dict)
    y: dict[str, list[Any]] = field(default_factory=dict)
    g: dict[str, list[Any]] = field(default_factory=dict)


class Tracker:
    """Context manager that hooks the tracked modules of ``model``."""

    def __init__(self, model: Any, names: Sequence[str], dtype: Any) -> None:
        self.model, self.names, self.dtype = model, list(names), dtype
        self.modules = dict(model.named_modules())
        self.cap = Capture()
        self._handles: list[Any] = []
        self._grad_state: dict[str, bool] = {}

    def __enter__(self) -> Tracker:
        for name in self.names:
            mod = self.modules[name]
            for pname, p in mod.named_parameters(recurse=False):
                self._grad_state[f"{name}.{pname}"] = p.requires_grad
                p.requires_grad_(True)
            self._handles.append(mod.register_forward_hook(self._hook(name, mod)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for name in self.names:
            for pname, p in self.modules[name].named_parameters(recurse=False):
                p.requires_grad_(self._grad_state[f"{name}.{pname}"])

    def _hook(self, name: str, mod: Any) -> Any:
        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            a = inputs[0].detach()
            self.cap.a.setdefault(name, []).append(a)
            self.cap.y.setdefault(name, []).append(output)

        return hook

    def reset(self) -> None:
        self.cap = Capture()

    def backward(self, loss: Any) -> None:
        """Fill ``cap.g`` with ∂loss/∂y per call; raise if a tracked module never ran."""
        missing = [n for n in self.names if n not in self.cap.y]
        if missing:
            raise RuntimeError(
                f"the hooks of tracked module(s) {missing[:5]} did not fire in the forward pass "
                "(is the weight used functionally, or the module not on the loss path?)."
            )
        outs = [y for n in self.names for y in self.cap.y[n]]
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        it = iter(grads)
        for n in self.names:
            self.cap.g[n] = [torch.zeros_like(y) if (gr := next(it)) is None else gr.detach() for y in self.cap.y[n]]
        self.cap.y = {}

    def calls(self, name: str, mask: Any | None) -> list[tuple[Any, Any, Any]]:
        """[(a (B,T,i), g (B,T,o), m (B,T))] per call, bias folded, in ``self.dtype``."""
        mod = self.modules[name]
        out = []
        for a, g in zip(self.cap.a[name], self.cap.g[name]):
            a = a.to(self.dtype)
            g = g.to(self.dtype)
            if a.dim() == 2:
                a, g = a[:, None, :], g[:, None, :]
            elif a.dim() > 3:
                a, g = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
            if mod.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            if mask is not None and mask.shape == a.shape[:2]:
                m = mask.to(device=a.device, dtype=self.dtype)
            else:
                m = torch.ones(a.shape[:2], dtype=self.dtype, device=a.device)
            out.append((a, g, m))
        return out
