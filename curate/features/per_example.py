"""Tracked-parameter layouts and per-example gradient back-ends (docs/methods/gradient-features.md §2-§4).

Three interchangeable ways to get per-example gradients of the response loss (they agree to float64
round-off, tested): ``func`` (``torch.func`` grad + vmap), ``hooks`` (layer inputs × output
gradients, Linear and GPT-2 Conv1D only) and ``loop`` (batch size 1 autograd, the reference).
``method="auto"`` picks ``hooks`` whenever every selected tensor belongs to a Linear/Conv1D (LoRA and
MLP presets) and ``func`` otherwise, since hooks need no vmap support from the model. Batches are
right padded and run without an attention mask (with causal attention, trailing padding cannot
affect real tokens), which makes each row's gradient independent of its batch.

The ``hooks`` back-end and the factored projection (:mod:`curate.features.factored`) share one
layer capture, :mod:`curate.features.capture` (layer inputs a and output gradients g; the
per-example weight gradient is Σ_t g_t a_tᵀ). Kept apart from :mod:`curate.features.gradients`
(features, Adam, the step) so that the factored projection can use it without a cycle.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.features.capture import BatchCapture, TrackedTensor, batch_captures, param_modules, per_sequence_grads
from curate.features.lm_batches import block_index, collate, row_losses

METHODS = ("auto", "func", "hooks", "loop")
REDUCTIONS = ("mean", "sum")
MLP_NAMES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.c_fc", "mlp.c_proj")


# ================================================================================== layout
@dataclass(frozen=True)
class Layout:
    """The ordered (name, shape) list of the tracked parameters plus a hash of the model config.

    Attributes:
        names: parameter names in ``named_parameters()`` order.
        shapes: their shapes.
        config_hash: SHA-256 of the model config (``to_json_string``), "" when there is none.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    config_hash: str = ""

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) if s else 1 for s in self.shapes]

    @property
    def n_params(self) -> int:
        return int(sum(self.sizes))

    @property
    def hash(self) -> str:
        """The layout hash (SHA-256 of names, shapes and the config hash)."""
        blob = json.dumps({"names": self.names, "shapes": self.shapes, "config": self.config_hash})
        return hashlib.sha256(blob.encode()).hexdigest()


def _config_hash(model: Any) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return ""
    try:
        d = cfg.to_dict()
    except Exception:  # noqa: BLE001 - any config object without to_dict
        return ""
    for k in ("_name_or_path", "transformers_version", "_commit_hash"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def select_parameters(model: Any, params: str | Sequence[str] = "lora") -> Layout:
    """The tracked parameter layout for a preset or a list of globs (docs/methods/gradient-features.md §3).

    Presets: ``lora`` (peft ``lora_A``/``lora_B``), ``mlp`` (MLP projection weights),
    ``last_blocks:k``, ``mlp_last_blocks:k``. A list (or comma-separated string) of ``fnmatch``
    globs selects by name; embeddings and the output head are only selected when listed.

    Raises:
        ParameterError: unknown preset, bad k, or an empty selection.
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if isinstance(params, str) and (params in ("lora", "mlp") or params.startswith(("last_blocks:", "mlp_last_blocks:"))):
        preset = params
        if preset == "lora":
            chosen = [n for n, _ in named if "lora_A" in n or "lora_B" in n]
        else:
            base, _, k = preset.partition(":")
            blocks = sorted({b for n, _ in named if (b := block_index(n)) is not None})
            if k:
                if not k.isdigit() or int(k) < 1:
                    raise param_error("grad_features", "params", "'last_blocks:k' with an integer k >= 1", params)
                last = set(blocks[-int(k):])
            else:
                last = set(blocks)
            in_blocks = [n for n, _ in named if block_index(n) in last]
            if base in ("mlp", "mlp_last_blocks"):
                chosen = [n for n in in_blocks if any(f"{m}." in n for m in MLP_NAMES) and n.endswith("weight")]
            else:
                chosen = in_blocks
            chosen = [n for n in chosen if "lora_" not in n]
    else:
        globs = [g.strip() for g in (params.split(",") if isinstance(params, str) else params) if g.strip()]
        if not globs:
            raise param_error("grad_features", "params", "a preset or a non-empty list of name globs", params)
        chosen = [n for n, _ in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not chosen:
        raise param_error("grad_features", "params", "a selection matching at least one parameter of the model", params)
    shapes = dict(named)
    return Layout(tuple(chosen), tuple(tuple(shapes[n].shape) for n in chosen), _config_hash(model))


def check_compatible(*metas: Mapping[str, Any]) -> None:
    """Raise if feature metas differ in layout hash or projector id (the Quad defect,
    docs/methods/gradient-features.md §3)."""
    for key in ("layout_hash", "projector_id"):
        seen = {m.get(key) for m in metas if m.get(key) is not None}
        if len(seen) > 1:
            raise SchemaError(f"feature sets were computed with different {key.replace('_', ' ')}s and cannot be "
                              "combined.", field=key, expected="one value", found=sorted(seen))


# ========================================================================== per-example loss
def _logits(model: Any, ids: Any, attention_mask: Any = None) -> Any:
    out = model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


class _EvalMode:
    def __init__(self, model: Any) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)


def _grads_loop(model: Any, layout: Layout, examples: Sequence[Any], reduction: str, pad: int) -> tuple[Any, Any]:
    torch = require("torch", "gradient features")
    params = dict(model.named_parameters())
    sel = [params[n] for n in layout.names]
    flags = [p.requires_grad for p in sel]
    dev = _model_device(model)
    rows, losses = [], []
    try:
        for p in sel:
            p.requires_grad_(True)
        for e in examples:
            ids, labels = collate([e], pad)
            loss = row_losses(_logits(model, ids.to(dev)), labels.to(dev), reduction)[0]
            gs = torch.autograd.grad(loss, sel, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, sel, strict=True)]))
            losses.append(loss.detach())
    finally:
        for p, f in zip(sel, flags, strict=True):
            p.requires_grad_(f)
    return torch.stack(rows), torch.stack(losses)


def _grads_func(model: Any, layout: Layout, examples: Sequence[Any], reduction: str, pad: int,
                chunk_size: int | None) -> tuple[Any, Any]:
    torch = require("torch", "gradient features")
    from torch.func import functional_call, grad, vmap

    dev = _model_device(model)
    ids, labels = collate(examples, pad)
    ids, labels = ids.to(dev), labels.to(dev)
    names = set(layout.names)
    sel = {n: p.detach() for n, p in model.named_parameters() if n in names}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    rest.update({n: b.detach() for n, b in model.named_buffers()})

    def loss_one(s: dict[str, Any], i: Any, lab: Any) -> tuple[Any, Any]:
        out = functional_call(model, (s, rest), args=(), kwargs={"input_ids": i[None], "use_cache": False})
        lg = out.logits if hasattr(out, "logits") else out
        loss = row_losses(lg, lab[None], reduction)[0]
        return loss, loss.detach()

    g, losses = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk_size)(sel, ids, labels)
    flat = torch.cat([g[n].reshape(len(examples), -1) for n in layout.names], dim=1)
    return flat, losses


def hooks_supported(model: Any, layout: Layout) -> bool:
    """Whether every tracked tensor is the weight or bias of a Linear / GPT-2 Conv1D."""
    try:
        param_modules(model, layout.names)
    except TypeError:
        return False
    return True


def capture_layer_io(model: Any, layout: Layout, examples: Sequence[Any], reduction: str,
                     pad: int) -> tuple[list[TrackedTensor], BatchCapture]:
    """One batched forward/backward of the summed row losses that captures, for every call of every
    module owning a tracked tensor, its input a (B, T, d_in) and output gradient g (B, T, d_out)
    (:mod:`curate.features.capture`).

    Rows do not interact (no attention mask, right padding), so the per-example weight gradient is
    Σ_t g_t a_tᵀ from these two factors alone; callers form it (:func:`_grads_hooks`) or project the
    factors first (:mod:`curate.features.factored`). A module that does not run has no calls (its
    gradient is 0).

    Returns:
        (tracked, capture): :func:`~curate.features.capture.param_modules` of the layout and the
        batch's :class:`~curate.features.capture.BatchCapture` (``loss`` holds the (B,) losses).
    """
    tracked = param_modules(model, layout.names)
    dev = _model_device(model)

    def losses(batch: tuple[Any, Any]) -> Any:
        ids, labels = batch
        return row_losses(_logits(model, ids.to(dev)), labels.to(dev), reduction)

    (cap,) = batch_captures(model, list(dict.fromkeys(t.module for t in tracked)), examples, loss=losses,
                            collate=lambda rows: collate(rows, pad), params=layout.names, strict=False)
    return tracked, cap


def _grads_hooks(model: Any, layout: Layout, examples: Sequence[Any], reduction: str, pad: int) -> tuple[Any, Any]:
    """G (B, P) in layout order from one capture: a weight block is Σ_t g_t a_tᵀ (transposed for a
    Conv1D, which stores W as d_in × d_out), a bias block Σ_t g_t."""
    torch = require("torch", "gradient features")
    tracked, cap = capture_layer_io(model, layout, examples, reduction, pad)
    params = dict(model.named_parameters())
    b = len(examples)
    cols = []
    for t in tracked:
        calls = cap.calls(t.module, fold_bias=False)
        if not calls:
            part = torch.zeros((b, *params[t.param].shape), dtype=params[t.param].dtype, device=_model_device(model))
        elif t.attr == "bias":
            part = sum(g.sum(dim=1) for _, g, _ in calls)
        else:
            part = per_sequence_grads(calls)
            part = part.transpose(1, 2) if t.conv1d else part
        cols.append(part.reshape(b, -1))
    return torch.cat(cols, dim=1), cap.loss


def per_example_grads(
    model: Any,
    layout: Layout,
    examples: Sequence[Any],
    *,
    method: str = "auto",
    loss_reduction: str = "mean",
    pad_token_id: int = 0,
    chunk_size: int | None = None,
) -> tuple[Any, Any]:
    """Per-example gradients of the response loss, flattened in layout order.

    Args:
        model: a causal LM (HF or any module returning logits from ``input_ids``), used in eval mode.
        layout: from :func:`select_parameters`.
        examples: :class:`~curate.features.lm.Encoded` rows (or dicts with input_ids, labels).
        method: ``auto`` | ``func`` | ``hooks`` | ``loop`` (module docstring).
        loss_reduction: ``mean`` (ℓ_mean, LESS) | ``sum`` (ℓ_sum, EK-FAC).
        pad_token_id: id used for right padding (never attended to by real tokens).
        chunk_size: vmap chunk size for ``func``.

    Returns:
        (G, losses): G of shape (B, P) in the model dtype and the (B,) losses.
    """
    if method not in METHODS:
        raise param_error("per_example_grads", "method", f"one of {METHODS}", method)
    if loss_reduction not in REDUCTIONS:
        raise param_error("per_example_grads", "loss_reduction", f"one of {REDUCTIONS}", loss_reduction)
    if method == "auto":
        method = "hooks" if hooks_supported(model, layout) else "func"
    with _EvalMode(model):
        if method == "loop":
            return _grads_loop(model, layout, examples, loss_reduction, pad_token_id)
        if method == "hooks":
            return _grads_hooks(model, layout, examples, loss_reduction, pad_token_id)
        try:
            return _grads_func(model, layout, examples, loss_reduction, pad_token_id, chunk_size)
        except (RuntimeError, NotImplementedError) as exc:  # vmap-unsupported ops in the model
            warnings.warn(f"vmap failed on this model ({exc}); falling back to the per-example loop.", stacklevel=2)
            return _grads_loop(model, layout, examples, loss_reduction, pad_token_id)
