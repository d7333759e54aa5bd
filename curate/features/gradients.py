"""Per-example gradient features of a causal LM (docs/methods/gradient-features.md §2-§8).

The LESS recipe (Xia et al., "LESS: Selecting Influential Data for Targeted Instruction Tuning",
ICML 2024, arXiv 2402.04333; code ``princeton-nlp/LESS``): the gradient of each example's
response-token loss w.r.t. a parameter subset (LoRA adapters, or named Linear layers), randomly
projected (TRAK's Rademacher sketch, see :mod:`curate.features.projection`), optionally
Adam-preconditioned with the warm-up checkpoint's optimizer moments, L2-normalised, and combined
across checkpoints with learning-rate weights.

Per-example gradients come from :mod:`curate.features.per_example` (``func`` | ``hooks`` | ``loop``);
the projection is either the dense Rademacher sketch (:class:`~curate.features.projection.Projector`)
or the factored, per-layer Kronecker one (:class:`~curate.features.factored.FactoredProjector`, LoGra),
which for SGD features never materialises a per-example gradient. DPO objectives are not
implemented yet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.features.checkpoints import checkpoint_id, lr_weights, read_checkpoint, resolve_checkpoints
from curate.features.factored import FactoredProjector, factored_features
from curate.features.lm import Encoded
from curate.features.lm_batches import LORA_TARGETS
from curate.features.per_example import (  # noqa: F401 - re-exported: the public names of this stage
    METHODS,
    MLP_NAMES,
    REDUCTIONS,
    Layout,
    _EvalMode,
    _model_device,
    check_compatible,
    hooks_supported,
    per_example_grads,
    select_parameters,
)
from curate.features.projection import Projector
from curate.pipeline.registry import register_step
from curate.validation import check_int

VARIANTS = ("sgd", "adam")
ADAM_FORMS = ("less_code", "paper")
PROJECTIONS = ("dense", "factored")


# ======================================================================== Adam preconditioning
def adam_precondition(g: Any, m: Any, v: Any, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                      form: str = "less_code") -> Any:
    """LESS's Adam-preconditioned gradient Γ (docs/methods/gradient-features.md §6), element-wise, torch or numpy.

    ``less_code`` (default, the reference code): m' = β₁m + (1−β₁)g, v' = β₂v + (1−β₂)g², Γ = m'/√(v'+ε)
    (one virtual Adam step, ε inside the root, no bias correction). ``paper``: Γ = m'/(√v' + ε).
    """
    if form not in ADAM_FORMS:
        raise param_error("adam_precondition", "form", f"one of {ADAM_FORMS}", form)
    m2 = beta1 * m + (1 - beta1) * g
    v2 = beta2 * v + (1 - beta2) * g * g
    if form == "less_code":
        return m2 / (v2 + eps) ** 0.5
    return m2 / (v2 ** 0.5 + eps)


def load_adam_state(state: Any, layout: Layout, *, trainable_names: Sequence[str] | None = None) -> tuple[Any, Any]:
    """Flattened Adam moments (m, v) for ``layout`` (where m and v come from:
    docs/methods/gradient-features.md §6).

    ``state`` is a path (``torch.load``-able) or a dict in one of two shapes:
    - name-keyed: ``{"exp_avg": {name: tensor}, "exp_avg_sq": {name: tensor}}`` (curate warm-up);
    - an HF Trainer / torch optimizer state dict ``{"state": {int: {...}}, "param_groups": [...]}``,
      whose integer keys are mapped, in parameter-group order, to ``trainable_names`` (the names of
      trainable parameters in ``named_parameters()`` order).

    Raises:
        SchemaError: a missing parameter or a shape mismatch, naming the parameter.
    """
    torch = require("torch", "Adam-preconditioned gradient features")
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(str(state), map_location="cpu", weights_only=True)
    if "exp_avg" in state and isinstance(state["exp_avg"], Mapping):
        m_of, v_of = dict(state["exp_avg"]), dict(state["exp_avg_sq"])
    elif "state" in state:
        if trainable_names is None:
            raise SchemaError("an integer-keyed optimizer state needs the trainable parameter names.",
                              field="trainable_names", expected="names in named_parameters() order")
        order = [i for g in state.get("param_groups", []) for i in g["params"]] or sorted(state["state"])
        if len(order) != len(trainable_names):
            raise SchemaError("the optimizer state does not match the trainable parameters.", field="state",
                              expected=f"{len(trainable_names)} parameters", found=f"{len(order)}")
        m_of, v_of = {}, {}
        for idx, name in zip(order, trainable_names, strict=True):
            st = state["state"].get(idx)
            if st is None:
                continue
            m_of[name], v_of[name] = st["exp_avg"], st["exp_avg_sq"]
    else:
        raise SchemaError("unknown optimizer state format.", field="state",
                          expected="{exp_avg, exp_avg_sq} by name or a torch optimizer state dict",
                          found=sorted(state)[:5])
    ms, vs = [], []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name not in m_of:
            raise SchemaError("the optimizer state lacks a tracked parameter.", field=name,
                              expected="exp_avg and exp_avg_sq", found="nothing")
        for what, src, dst in (("exp_avg", m_of, ms), ("exp_avg_sq", v_of, vs)):
            t = torch.as_tensor(src[name])
            if tuple(t.shape) != tuple(shape):
                raise SchemaError(f"optimizer {what} has the wrong shape.", field=name,
                                  expected=str(tuple(shape)), found=str(tuple(t.shape)))
            dst.append(t.reshape(-1))
    return torch.cat(ms), torch.cat(vs)


# ================================================================================== norms
def normalise_rows(phi: np.ndarray, tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """(φ/‖φ‖ per row, mask of rows with ‖φ‖ < tol, which are left as zeros)
    (docs/methods/gradient-features.md §8)."""
    phi = np.asarray(phi)
    norms = np.linalg.norm(phi.astype(np.float64), axis=1)
    zero = norms < tol
    out = np.zeros_like(phi)
    out[~zero] = phi[~zero] / norms[~zero, None].astype(phi.dtype)
    return out, zero


# ============================================================================ feature computation
@dataclass
class GradFeatures:
    """Per-row outputs of :func:`compute_grad_features` (in input order)."""

    uids: list[str]
    values: np.ndarray  # (N, d) float32 (float64 when the model is float64)
    losses: np.ndarray  # (N,) response loss; nan where no response tokens
    reasons: list[str]  # "" | "no_response_tokens" | "zero_gradient"
    truncated: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    raw: np.ndarray | None = None  # projected, unnormalised (keep_unnormalized=True)


def compute_grad_features(
    model: Any,
    examples: Sequence[Encoded],
    *,
    layout: Layout,
    projector: Projector | FactoredProjector,
    variant: str = "sgd",
    adam_state: tuple[Any, Any] | None = None,
    adam_form: str = "less_code",
    batch_size: int = 8,
    method: str = "auto",
    loss_reduction: str = "mean",
    pad_token_id: int = 0,
    normalize: bool = True,
    keep_unnormalized: bool = False,
) -> GradFeatures:
    """Projected (optionally Adam-preconditioned) L2-normalised gradient features of ``examples``.

    Rows are processed in batches of similar length (sorted, then restored to input order); each
    row's feature does not depend on the batch it is in. Rows without response tokens get zeros and
    reason ``no_response_tokens``; rows whose projected gradient is ~0 get ``zero_gradient``.
    With a :class:`~curate.features.factored.FactoredProjector`, SGD features and method ``auto`` /
    ``hooks``, layer inputs and output gradients are projected before their outer product and no
    per-example gradient is formed; otherwise gradients are formed per batch, then projected.
    """
    torch = require("torch", "gradient features")
    if variant not in VARIANTS:
        raise param_error("compute_grad_features", "variant", f"one of {VARIANTS}", variant)
    if variant == "adam" and adam_state is None:
        raise param_error("compute_grad_features", "adam_state", "the checkpoint's (m, v) for variant 'adam'", None)
    if projector.n_params != layout.n_params or (projector.layout_hash and projector.layout_hash != layout.hash):
        raise SchemaError("the projector was built for another parameter layout.", field="projector",
                          expected=f"P={layout.n_params}, layout {layout.hash[:12]}",
                          found=f"P={projector.n_params}, layout {projector.layout_hash[:12]}")
    dev = _model_device(model)
    dtype = next(model.parameters()).dtype
    out_dtype = np.float64 if dtype == torch.float64 else np.float32
    n = len(examples)
    values = np.zeros((n, projector.dim), dtype=out_dtype)
    losses = np.full(n, np.nan)
    reasons = [""] * n
    live = [i for i, e in enumerate(examples) if int(e["n_response"]) > 0]
    live_set = set(live)
    for i in range(n):
        if i not in live_set:
            reasons[i] = "no_response_tokens"
    live.sort(key=lambda i: (len(examples[i]["input_ids"]), i))
    if adam_state is not None:
        m, v = (t.to(dev, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for t in adam_state)
    fused = isinstance(projector, FactoredProjector) and variant == "sgd" and method in ("auto", "hooks")
    for s in range(0, len(live), batch_size):
        idx = live[s : s + batch_size]
        batch = [examples[i] for i in idx]
        if fused:
            with _EvalMode(model):
                phi, loss = factored_features(model, layout, batch, projector, loss_reduction=loss_reduction,
                                              pad_token_id=pad_token_id)
            phi = phi.detach()
        else:
            g, loss = per_example_grads(model, layout, batch, method=method, loss_reduction=loss_reduction,
                                        pad_token_id=pad_token_id)
            if variant == "adam":
                g = adam_precondition(g.to(m.dtype), m, v, form=adam_form)
            with torch.no_grad():
                phi = projector.project(g.detach())
        values[idx] = phi.cpu().numpy().astype(out_dtype)
        losses[idx] = loss.detach().double().cpu().numpy()
    raw = values.copy() if keep_unnormalized else None
    if normalize:
        values, zero = normalise_rows(values)
        for i in np.flatnonzero(zero):
            reasons[i] = reasons[i] or "zero_gradient"
    if not np.all(np.isfinite(values)):
        bad = [examples[i]["uid"] for i in np.flatnonzero(~np.isfinite(values).all(axis=1))[:5]]
        raise SchemaError("gradient features are not finite.", field="grads", expected="finite values", found=bad)
    meta = {"layout_hash": layout.hash, "n_params": layout.n_params, **projector.describe(), "variant": variant,
            "adam_form": adam_form if variant == "adam" else None, "loss_reduction": loss_reduction,
            "normalized": bool(normalize), "dtype": str(np.dtype(out_dtype))}
    return GradFeatures([str(e["uid"]) for e in examples], values, losses, reasons,
                        np.array([bool(e["truncated"]) for e in examples]), meta, raw)


# ===================================================================================== LoRA
def add_lora(model: Any, *, r: int = 8, alpha: int = 32, targets: Sequence[str] = LORA_TARGETS, seed: int = 0) -> Any:
    """Wrap ``model`` with fresh seeded LoRA adapters (peft), dropout 0 (the CPU preset of
    docs/methods/gradient-features.md §3)."""
    torch = require("torch", "LoRA gradient features")
    peft = require("peft", "LoRA gradient features")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                          task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, cfg)
    wrapped.eval()
    return wrapped


# ================================================================================ the step
@register_step("grad_features")
@dataclass(frozen=True, kw_only=True)
class GradFeaturesStep:
    """Per-example gradient features (LESS) of every row, stored as feature sets; keeps every row.

    Pool rows go to ``name`` (default ``grad/<variant>``): (N, d), or (N, C, d) for C checkpoints
    with meta ``lr_weights``. With ``targets`` and a recipe target table, the targets' plain (SGD)
    gradients go to ``target_name`` (default ``grad/sgd/targets``), compatible by construction.
    ``checkpoints`` lists checkpoint folders, warm-up output folders (``curate warmup -o DIR``: all
    its epochs) or ``from_step`` / ``from_step:<save_as>`` for the checkpoints of an earlier recipe
    step ``warmup`` (see :func:`resolve_checkpoints`); their recorded mean learning rates weight them
    unless ``checkpoint_lrs`` is given. ``projection``: ``dense`` (TRAK/LESS Rademacher sketch of the
    whole gradient, ``proj_dim`` columns) or ``factored`` (LoGra per-layer P_out ⊗ P_in,
    :mod:`curate.features.factored`; ``proj_dim`` is the total budget, the realised width is in the meta).
    Output columns: keep (always True), reason (``no_response_tokens`` / ``zero_gradient`` / ""),
    score (the row's response loss; -inf without response tokens).
    """

    name: ClassVar[str] = "grad_features"
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model", "checkpoints")  # also from_step[:name]
    model: str = "default"
    checkpoints: tuple[str, ...] = ()
    checkpoint_lrs: tuple[float, ...] | None = None
    params: str = "lora"
    proj_dim: int | None = 512
    variant: str = "sgd"
    adam_form: str = "less_code"
    proj_kind: str = "rademacher"
    projection: str = "dense"
    seed: int | None = None
    max_length: int = 512
    batch_size: int = 8
    loss_reduction: str = "mean"
    method: str = "auto"
    field: str = "auto"
    train_on: str = "all_assistant_turns"
    targets: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    dtype: str = "float32"
    device: str | None = None
    feature_name: str | None = None
    target_name: str = "grad/sgd/targets"

    def __post_init__(self) -> None:
        o = "grad_features"
        ckpts = self.checkpoints
        object.__setattr__(self, "checkpoints", (ckpts,) if isinstance(ckpts, (str, Path)) else tuple(ckpts or ()))
        object.__setattr__(self, "checkpoints", tuple(str(c) for c in self.checkpoints))
        if self.checkpoint_lrs is not None:
            lrs = tuple(self.checkpoint_lrs)
            if len(lrs) < 1 or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
                raise param_error(o, "checkpoint_lrs", "None or one positive number per checkpoint", self.checkpoint_lrs)
            object.__setattr__(self, "checkpoint_lrs", lrs)
        check_int(o, "proj_dim", self.proj_dim, 1, allow_none=True)
        check_int(o, "max_length", self.max_length, 2)
        check_int(o, "batch_size", self.batch_size, 1)
        check_int(o, "lora_r", self.lora_r, 1)
        check_int(o, "lora_alpha", self.lora_alpha, 1)
        check_int(o, "seed", self.seed, 0, allow_none=True)
        for pname, value, choices in (
            ("variant", self.variant, VARIANTS), ("adam_form", self.adam_form, ADAM_FORMS),
            ("proj_kind", self.proj_kind, ("rademacher", "gaussian")), ("projection", self.projection, PROJECTIONS),
            ("loss_reduction", self.loss_reduction, REDUCTIONS),
            ("method", self.method, METHODS), ("field", self.field, ("auto", "chosen", "rejected")),
            ("train_on", self.train_on, ("all_assistant_turns", "last_assistant_turn")),
            ("dtype", self.dtype, ("float32", "float64")),
        ):
            if value not in choices:
                raise param_error(o, pname, f"one of {choices}", value)
        if self.projection == "factored" and self.proj_dim is None:
            raise param_error(o, "proj_dim", "an integer >= 1 with projection 'factored'", self.proj_dim)
        if self.variant == "adam" and not self.checkpoints:
            raise param_error(o, "checkpoints", "at least one warm-up checkpoint with optimizer state when variant='adam'",
                              self.checkpoints)
        if not isinstance(self.params, str) or not self.params:
            raise param_error(o, "params", "a preset (lora, mlp, last_blocks:k, mlp_last_blocks:k) or comma-separated globs",
                              self.params)
        if self.model != "default" and not (Path(self.model) / "config.json").exists():
            raise param_error(o, "model", "'default' or a local Hugging Face model folder", self.model)

    def _params(self, seed: int) -> dict[str, Any]:
        from curate.pipeline.step import step_params

        params = {**step_params(self), "seed": seed}
        if params["projection"] == "dense":  # keys of dense features predate the option: keep them valid
            del params["projection"]
        return params

    def _models(self, seed: int, device: str, checkpoints: Sequence[Path]) -> list[tuple[Any, Any, float | None, Path | None]]:
        """(model, tokenizer, mean lr, optimizer file) per checkpoint (the base model when none)."""
        from curate.features.lm import load_causal_lm

        out = []
        for c in checkpoints or (None,):
            lm, tok = load_causal_lm(self.model, device=device, dtype=self.dtype)
            lr, opt = None, None
            if c is not None:
                lm, meta, opt = read_checkpoint(lm, c)
                lr = meta.get("mean_lr")
            elif self.params == "lora":
                lm = add_lora(lm, r=self.lora_r, alpha=self.lora_alpha, seed=seed)
            out.append((lm, tok, lr, opt))
        return out

    def apply(self, table: pl.DataFrame, ctx: Any) -> pl.DataFrame:
        from curate.features.lm import encode_examples, resolve_device
        from curate.io.store import FeatureSet, cache_key

        require("torch", "gradient features")
        seed = ctx.seed if self.seed is None else self.seed
        device = resolve_device(self.device or getattr(ctx, "device", "auto"))
        pool_name = self.feature_name or f"grad/{self.variant}"
        ckpts = resolve_checkpoints(self.checkpoints, getattr(getattr(ctx, "features", None), "root", None))
        if self.checkpoint_lrs is not None and len(self.checkpoint_lrs) != len(ckpts):
            raise param_error("grad_features", "checkpoint_lrs", f"one positive number per checkpoint ({len(ckpts)})",
                              self.checkpoint_lrs)
        params = {**self._params(seed), "checkpoint_ids": [checkpoint_id(c) for c in ckpts]}
        key = cache_key(table["uid"].to_list(), params)
        targets = getattr(ctx, "targets", None) if self.targets else None
        tkey = cache_key(targets["uid"].to_list(), {**params, "variant": "sgd"}) if targets is not None else None
        cached = ctx.features.get(pool_name, key)
        if cached is not None and (targets is None or ctx.features.get(self.target_name, tkey) is not None):
            reasons = cached.meta.get("reasons", {})
            losses = cached.meta.get("losses", {})
            return self._frame(table, reasons, losses)
        pool_parts, tgt_parts, lrs, metas = [], [], [], []
        res = None
        for lm, tok, lr, opt in self._models(seed, device, ckpts):
            layout = select_parameters(lm, self.params)
            proj: Projector | FactoredProjector
            if self.projection == "factored":
                assert self.proj_dim is not None  # checked at construction
                proj = FactoredProjector(lm, layout, self.proj_dim, seed=seed, kind=self.proj_kind)
            else:
                proj = Projector(layout.n_params, self.proj_dim, seed=seed, kind=self.proj_kind,
                                 layout_hash=layout.hash, dtype="float64" if self.dtype == "float64" else "float32")
            kw = {"max_length": self.max_length, "field": self.field, "train_on": self.train_on}
            adam = None
            if self.variant == "adam":
                trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
                if opt is None:
                    raise FileNotFoundError("variant 'adam' needs adam_state.pt or optimizer.pt in every checkpoint.")
                adam = load_adam_state(opt, layout, trainable_names=trainable)
            common = {"layout": layout, "projector": proj, "batch_size": self.batch_size, "method": self.method,
                      "loss_reduction": self.loss_reduction, "pad_token_id": int(tok.pad_token_id or 0)}
            res = compute_grad_features(lm, encode_examples(table, tok, **kw), variant=self.variant,
                                        adam_state=adam, adam_form=self.adam_form, **common)
            pool_parts.append(res.values)
            metas.append(res.meta)
            lrs.append(lr)
            if targets is not None:
                tres = compute_grad_features(lm, encode_examples(targets, tok, **kw), variant="sgd", **common)
                tgt_parts.append(tres.values)
        assert res is not None  # at least one model
        check_compatible(*metas)
        weights = self.checkpoint_lrs or (tuple(lrs) if all(x is not None for x in lrs) else (1.0,) * len(lrs))
        w = lr_weights(weights)
        base_meta = {**metas[-1], "model": self.model, "checkpoints": [str(c) for c in ckpts],
                     "lr_weights": w.tolist(), "seed": seed, "params": self.params, "max_length": self.max_length}
        reasons = {u: r for u, r in zip(res.uids, res.reasons, strict=True) if r}
        losses = {u: (None if not np.isfinite(x) else float(x)) for u, x in zip(res.uids, res.losses, strict=True)}
        pool = np.stack(pool_parts, axis=1) if len(pool_parts) > 1 else pool_parts[0]
        ctx.features.put(FeatureSet(pool_name, np.asarray(res.uids, dtype=object), pool,
                                    {**base_meta, "cache_key": key, "reasons": reasons, "losses": losses}))
        if targets is not None:
            tvals = np.stack(tgt_parts, axis=1) if len(tgt_parts) > 1 else tgt_parts[0]
            ctx.features.put(FeatureSet(self.target_name, np.asarray(targets["uid"].to_list(), dtype=object), tvals,
                                        {**base_meta, "variant": "sgd", "adam_form": None, "cache_key": tkey}))
        return self._frame(table, reasons, losses)

    @staticmethod
    def _frame(table: pl.DataFrame, reasons: Mapping[str, str], losses: Mapping[str, float | None]) -> pl.DataFrame:
        uids = table["uid"].to_list()
        score = [(-math.inf if reasons.get(u) == "no_response_tokens" else (losses.get(u) if losses.get(u) is not None
                  else float("nan"))) for u in uids]
        return pl.DataFrame({"uid": uids, "keep": [True] * len(uids), "reason": [reasons.get(u, "") for u in uids],
                             "score": score}, schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8,
                                                      "score": pl.Float64})
