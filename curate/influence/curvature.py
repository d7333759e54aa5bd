"""Curvature of tracked ``nn.Linear`` layers: identity, diagonal, K-FAC and EK-FAC (docs/methods/ekfac.md).

Sources: Martens & Grosse, K-FAC (arXiv 1503.05671); George et al., EK-FAC (arXiv 1806.03884);
Grosse et al., "Studying Large Language Model Generalization with Influence Functions" (arXiv
2308.03296). The stages follow the reference library kronfluence (covariances → float64
eigendecomposition → eigenvalue correction) but are implemented here (docs/methods/ekfac.md) so they
share our tasks, masks and gradient streams.

Deviations, all deliberate:

- the default damping is heuristic (``damping_scale`` × mean eigenvalue per module, 0.1 as in
  Grosse et al.), not kronfluence's absolute 1e-8;
- damping is chosen at :meth:`Curvature.precondition` time, not at fit time, so the same factors
  serve several dampings;
- K-FAC eigenvalues λ_S λ_Aᵀ are per-token normalised while EK-FAC's Λ is per sequence (as in
  kronfluence): with absolute damping the two are not comparable; with heuristic damping the scale
  cancels in rankings;
- a query gradient must be a full per-layer gradient (d_out × (d_in+1)); randomly projected
  gradients have no Kronecker structure and are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate._lazy import require
from curate.errors import ParameterError, SchemaError, param_error
from curate.features.capture import BatchCapture, batch_captures, layer_dims, per_sequence_grads, select_modules
from curate.influence.task import Task

torch = require("torch", "influence functions")

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("true", "empirical")
FIT_ARGS = ("strategy", "modules", "fisher", "dtype", "seed", "batch_size", "max_examples")


@dataclass
class LayerFactors:
    """Fitted factors of one module (float64 after the eigendecomposition).

    Attributes:
        a_cov, s_cov: A ((d_in+1)²) and S (d_out²) covariances, per token.
        a_eigvals, a_eigvecs, s_eigvals, s_eigvecs: their eigendecompositions.
        lam: EK-FAC corrected eigenvalues Λ (d_out × (d_in+1)), per sequence.
        diag: diagonal Fisher (d_out × (d_in+1)), per sequence.
    """

    a_cov: Any = None
    s_cov: Any = None
    a_eigvals: Any = None
    a_eigvecs: Any = None
    s_eigvals: Any = None
    s_eigvecs: Any = None
    lam: Any = None
    diag: Any = None

    def tensors(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


class Curvature:
    """An inverse-curvature operator over the tracked linear layers of a model.

    One object serves EK-FAC influence (:mod:`curate.influence.scores`), Quad's preconditioned
    reference gradient and any selector that needs an inverse-Hessian-vector product
    (:meth:`precondition`).

    Args:
        strategy: ``identity`` | ``diagonal`` | ``kfac`` | ``ekfac``.
        modules: ``"mlp"`` (default), ``"mlp+attn"``, ``"all"`` or a list / comma list of names.
        fisher: ``"true"`` (labels sampled from the model, seeded; the GGN for softmax CE) or
            ``"empirical"`` (data labels).
        damping: ``None`` / ``"heuristic"`` (damping_scale × mean eigenvalue per module) or an
            absolute float >= 0. Can be overridden per :meth:`precondition` call.
        damping_scale: the heuristic's factor (0.1, as Grosse et al. and kronfluence).
        dtype: accumulation dtype of the covariances (float32; float64 in tests).
        seed: seed of the CPU generator that samples true-Fisher labels.
        batch_size: micro-batch size for fitting (changes nothing but memory).
        max_examples: fit on a seeded sample of at most this many examples (default 2,000).
        allow_head: allow tracking ``lm_head`` / embeddings when named explicitly.
    """

    def __init__(
        self,
        *,
        strategy: str = "ekfac",
        modules: str | Sequence[str] = "mlp",
        fisher: str = "true",
        damping: float | str | None = None,
        damping_scale: float = 0.1,
        dtype: Any = None,
        seed: int = 0,
        batch_size: int = 8,
        max_examples: int | None = 2000,
        allow_head: bool = False,
    ) -> None:
        if strategy not in STRATEGIES:
            raise param_error("Curvature", "strategy", f"one of {STRATEGIES}", strategy)
        if fisher not in FISHERS:
            raise param_error("Curvature", "fisher", f"one of {FISHERS}", fisher)
        _check_damping(damping)
        if not (isinstance(damping_scale, (int, float)) and damping_scale > 0):
            raise param_error("Curvature", "damping_scale", "> 0", damping_scale)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise param_error("Curvature", "batch_size", "an integer >= 1", batch_size)
        if max_examples is not None and not (isinstance(max_examples, int) and max_examples >= 1):
            raise param_error("Curvature", "max_examples", "an integer >= 1 or None", max_examples)
        self.strategy, self.fisher, self.seed = strategy, fisher, int(seed)
        self.modules = modules if isinstance(modules, str) else list(modules)
        self.damping, self.damping_scale = damping, float(damping_scale)
        self.dtype = dtype if dtype is not None else torch.float32
        self.batch_size, self.max_examples, self.allow_head = batch_size, max_examples, allow_head
        self.names: list[str] = []
        self.dims: dict[str, tuple[int, int]] = {}
        self.factors: dict[str, LayerFactors] = {}
        self.n_tokens: float = 0.0
        self.n_seq: int = 0
        self.fitted = False
        self.extra: dict[str, Any] = {}

    # ------------------------------------------------------------------ arguments
    def arguments(self) -> dict[str, Any]:
        """The fit arguments (saved beside the factors; reuse with others is refused)."""
        return {
            "strategy": self.strategy, "modules": self.modules, "fisher": self.fisher,
            "dtype": _dtype_name(self.dtype), "seed": self.seed, "batch_size": self.batch_size,
            "max_examples": self.max_examples,
        }

    # ------------------------------------------------------------------ fitting
    def fit(self, model: Any, task: Task, examples: Sequence[Any]) -> Curvature:
        """Stages 1-3 of docs/methods/ekfac.md §4-§6 over ``examples`` (the training distribution).

        Args:
            model: any ``nn.Module``; it is put in eval mode and not modified.
            task: gives the loss of a batch (:class:`~curate.influence.task.Task`).
            examples: fit examples; a seeded sample of ``max_examples`` is used when longer.

        Raises:
            ParameterError: bad module names; RuntimeError: hooks that never fire;
            FloatingPointError: a non-finite covariance (naming the module).
        """
        self.names = select_modules(model, self.modules, allow_head=self.allow_head)
        mods = dict(model.named_modules())
        self.dims = {n: layer_dims(mods[n]) for n in self.names}
        examples = list(examples)
        if not examples:
            raise param_error("Curvature.fit", "examples", "non-empty", 0)
        if self.max_examples is not None and len(examples) > self.max_examples:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(examples), generator=g)[: self.max_examples].sort().values
            examples = [examples[i] for i in idx.tolist()]
        self.factors = {n: LayerFactors() for n in self.names}
        if self.strategy == "identity":
            self.n_seq, self.fitted = len(examples), True
            return self
        gen = torch.Generator().manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            if self.strategy in ("kfac", "ekfac"):
                self._covariances(model, task, examples, gen)
                self._eigendecompose()
            if self.strategy in ("ekfac", "diagonal"):
                self._second_pass(model, task, examples, gen)
        finally:
            model.train(was_training)
        self.n_seq = len(examples)
        self.fitted = True
        return self

    def _captures(self, model: Any, task: Task, examples: Sequence[Any], gen: Any) -> Iterator[BatchCapture]:
        return task_captures(model, task, self.names, examples, batch_size=self.batch_size, dtype=self.dtype,
                             sampled_with=gen if self.fisher == "true" else None)

    def _covariances(self, model: Any, task: Task, examples: Sequence[Any], gen: Any) -> None:
        acc_a = {n: 0.0 for n in self.names}
        acc_s = {n: 0.0 for n in self.names}
        n_tok = 0.0
        for cap in self._captures(model, task, examples, gen):
            for n in self.names:
                calls = cap.calls(n)
                for a, g, m in calls:
                    am = a * m[..., None]
                    acc_a[n] = acc_a[n] + torch.einsum("bti,btj->ij", am, a)
                    acc_s[n] = acc_s[n] + torch.einsum("bto,btp->op", g * m[..., None], g)
                if n == self.names[0]:  # tokens counted once per batch, on the first module's first call
                    n_tok += float(calls[0][2].sum())
        self.n_tokens = n_tok
        for n in self.names:
            a_cov, s_cov = acc_a[n] / n_tok, acc_s[n] / n_tok
            for what, t in (("A", a_cov), ("S", s_cov)):
                if not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(
                        f"the {what} covariance of module '{n}' has non-finite entries "
                        "(half precision? use dtype=float32 or float64)."
                    )
            self.factors[n].a_cov, self.factors[n].s_cov = a_cov, s_cov

    def _eigendecompose(self) -> None:
        for n in self.names:
            f = self.factors[n]
            a = f.a_cov.to(torch.float64)
            s = f.s_cov.to(torch.float64)
            f.a_eigvals, f.a_eigvecs = torch.linalg.eigh((a + a.T) / 2)
            f.s_eigvals, f.s_eigvecs = torch.linalg.eigh((s + s.T) / 2)

    def _second_pass(self, model: Any, task: Task, examples: Sequence[Any], gen: Any) -> None:
        acc = {n: 0.0 for n in self.names}
        for cap in self._captures(model, task, examples, gen):
            for n in self.names:
                calls = cap.calls(n)
                if self.strategy == "diagonal":
                    gn = per_sequence_grads(calls)
                    acc[n] = acc[n] + (gn.to(torch.float64) ** 2).sum(0)
                else:
                    rot = _rotated_grads(calls, self.factors[n], self.dtype)
                    acc[n] = acc[n] + (rot.to(torch.float64) ** 2).sum(0)
        for n in self.names:
            v = acc[n] / len(examples)
            if not bool(torch.isfinite(v).all()):
                raise FloatingPointError(f"the eigenvalue correction of module '{n}' has non-finite entries.")
            if self.strategy == "diagonal":
                self.factors[n].diag = v
            else:
                self.factors[n].lam = v

    # ------------------------------------------------------------------ construction from factors
    @classmethod
    def from_factors(
        cls, factors: Mapping[str, LayerFactors], *, strategy: str = "ekfac", damping: float | str | None = None,
        damping_scale: float = 0.1, n_seq: int = 1,
    ) -> Curvature:
        """A curvature built from given factors (tests, or factors computed elsewhere)."""
        c = cls(strategy=strategy, modules=list(factors), fisher="empirical", damping=damping,
                damping_scale=damping_scale, dtype=torch.float64)
        c.names = list(factors)
        c.factors = dict(factors)
        for n, f in c.factors.items():
            if f.a_eigvecs is None and f.a_cov is not None:
                a, s = f.a_cov.double(), f.s_cov.double()
                f.a_eigvals, f.a_eigvecs = torch.linalg.eigh((a + a.T) / 2)
                f.s_eigvals, f.s_eigvecs = torch.linalg.eigh((s + s.T) / 2)
            ref = f.lam if f.lam is not None else f.diag
            if ref is not None:
                c.dims[n] = (int(ref.shape[0]), int(ref.shape[1]))
            else:
                c.dims[n] = (int(f.s_eigvecs.shape[0]), int(f.a_eigvecs.shape[0]))
        c.n_seq, c.fitted = n_seq, True
        return c

    # ------------------------------------------------------------------ preconditioning
    def eigenvalues(self, name: str) -> Any:
        """The d_out × (d_in+1) curvature eigenvalues of one module (None for identity)."""
        f = self.factors[name]
        if self.strategy == "ekfac":
            return f.lam
        if self.strategy == "kfac":
            return torch.outer(f.s_eigvals, f.a_eigvals)
        if self.strategy == "diagonal":
            return f.diag
        return None

    def damping_of(self, name: str, damping: float | str | None = "default") -> float:
        """λ of one module: absolute, or damping_scale × mean eigenvalue (heuristic)."""
        d = self.damping if isinstance(damping, str) and damping == "default" else damping
        _check_damping(d)
        if d is None or d == "heuristic":
            ev = self.eigenvalues(name)
            return 0.0 if ev is None else self.damping_scale * float(ev.mean())
        return float(d)

    def precondition(
        self, grads: Mapping[str, Any], *, damping: float | str | None = "default"
    ) -> dict[str, Any]:
        """Apply the damped inverse curvature P to per-module gradient matrices (§7).

        Args:
            grads: module name -> tensor (Q, d_out, d_in+1) or (d_out, d_in+1) (bias column last).
            damping: override the object's damping for this call.

        Returns:
            module name -> P(V) in float64, same shapes.
        """
        self._check_fitted()
        out: dict[str, Any] = {}
        for n, v in grads.items():
            if n not in self.factors:
                raise SchemaError("gradient for an untracked module.", field=n, expected=f"one of {self.names}", found=n)
            v = torch.as_tensor(v).to(torch.float64)
            single = v.dim() == 2
            if single:
                v = v[None]
            if tuple(v.shape[1:]) != tuple(self.dims[n]):
                raise SchemaError(
                    "gradient matrix has the wrong shape (projected gradients cannot be preconditioned "
                    "by a Kronecker curvature).", field=n, expected=str(tuple(self.dims[n])), found=tuple(v.shape[1:]),
                )
            lam = self.damping_of(n, damping)
            f = self.factors[n]
            dev = v.device
            if self.strategy == "identity":
                p = v.clone()
            elif self.strategy == "diagonal":
                p = v / (f.diag.to(dev) + lam)
            else:
                qs, qa = f.s_eigvecs.to(dev), f.a_eigvecs.to(dev)
                ev = self.eigenvalues(n).to(dev)
                rot = qs.T @ v @ qa
                p = qs @ (rot / (ev + lam)) @ qa.T
            out[n] = p[0] if single else p
        return out

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("Curvature is not fitted: call fit(model, task, examples) or load(folder) first.")

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``factors.pt`` and ``arguments.json`` atomically (temp folder, then rename).

        Args:
            folder: destination folder (replaced as a whole).
            extra: JSON-able facts saved beside the arguments (e.g. the model path and a weight
                fingerprint, used to refuse scoring with another model); read back as ``self.extra``.
        """
        self._check_fitted()
        from curate.io.writers import atomic_dir

        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            tensors = {f"{n}::{k}": v.cpu() for n, f in self.factors.items() for k, v in f.tensors().items()}
            torch.save(tensors, tmp / "factors.pt")
            info = {"arguments": self.arguments(), "names": self.names, "dims": self.dims,
                    "n_seq": self.n_seq, "n_tokens": self.n_tokens,
                    "extra": dict(extra if extra is not None else self.extra)}
            (tmp / "arguments.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return folder

    def load(self, folder: str | os.PathLike[str]) -> Curvature:
        """Load factors fitted with the same arguments as this object; refuse others."""
        folder = Path(folder)
        if not (folder / "arguments.json").exists():
            raise SchemaError("no fitted factors here.", file=str(folder), expected="arguments.json and factors.pt")
        info = json.loads((folder / "arguments.json").read_text())
        saved, mine = info["arguments"], json.loads(json.dumps(self.arguments()))
        diff = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
        if diff:
            raise ParameterError(
                f"{folder}: the factors were fitted with other arguments: "
                + ", ".join(f"{k}={s!r} (asked {m!r})" for k, (s, m) in sorted(diff.items()))
                + ". Refit, or build the Curvature with the saved arguments (Curvature.from_folder)."
            )
        tensors = torch.load(folder / "factors.pt", weights_only=True)
        self.names = list(info["names"])
        self.dims = {n: tuple(d) for n, d in info["dims"].items()}
        self.factors = {n: LayerFactors() for n in self.names}
        for key, v in tensors.items():
            n, k = key.split("::")
            setattr(self.factors[n], k, v)
        self.n_seq, self.n_tokens, self.fitted = int(info["n_seq"]), float(info["n_tokens"]), True
        self.extra = dict(info.get("extra", {}))
        return self

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], **overrides: Any) -> Curvature:
        """A curvature with the saved fit arguments (damping and its scale may be given)."""
        path = Path(folder) / "arguments.json"
        if not path.exists():
            raise SchemaError("no fitted factors here.", file=str(folder), expected="arguments.json and factors.pt")
        try:
            args = dict(json.loads(path.read_text())["arguments"])
            args["dtype"] = getattr(torch, args["dtype"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SchemaError(f"unreadable factors arguments ({type(exc).__name__}: {exc}).", file=str(path),
                              expected="the arguments.json written by Curvature.save") from None
        args.update(overrides)
        return cls(**args).load(folder)


def task_captures(
    model: Any, task: Task, names: Sequence[str], examples: Sequence[Any], *, batch_size: int, dtype: Any,
    sampled_with: Any = None,
) -> Iterator[BatchCapture]:
    """Per-micro-batch captures (a, g, m) of ``task``'s loss (docs/methods/ekfac.md §3): the data-label
    ℓ_sum, or with a generator ``sampled_with`` the sampled-label loss whose gradient samples the true
    Fisher; m is the task's token mask. The one loop behind fitting, scoring and Quad's reward."""
    sampled = sampled_with is not None
    return batch_captures(
        model, names, examples, batch_size=batch_size, collate=task.collate, mask=task.token_mask, dtype=dtype,
        loss=(lambda b: task.sampled_loss(model, b, sampled_with)) if sampled else (lambda b: task.loss(model, b)),
    )


def _rotated_grads(calls: Sequence[tuple[Any, Any, Any]], f: LayerFactors, dtype: Any) -> Any:
    """Q_Sᵀ G_n Q_A for every sequence of a batch, (B, d_out, d_in+1), in ``dtype``.

    When T·(d_out² + d_in²) < d_out·d_in·(d_out + d_in) (short sequences, wide layers) the token
    vectors are rotated first, Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ, which skips the two dense
    d_out×d_out×d_in rotations of G_n (about 6× fewer flops on SmolLM2 MLPs at T = 96).
    Otherwise G_n is formed and rotated. Both give the same matrix.
    """
    qs, qa = f.s_eigvecs.to(dtype), f.a_eigvecs.to(dtype)
    o, i = qs.shape[0], qa.shape[0]
    t = sum(a.shape[1] for a, _, _ in calls)
    if t * (o * o + i * i) < o * i * (o + i):
        total = 0
        for a, g, m in calls:
            total = total + torch.einsum("bto,bti->boi", (g * m[..., None]) @ qs, a @ qa)
        return total
    return qs.T @ per_sequence_grads(calls) @ qa


def _check_damping(damping: Any) -> None:
    if damping is None or damping == "heuristic":
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise param_error("Curvature", "damping", "'heuristic', None or a float >= 0", damping)
