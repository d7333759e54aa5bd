"""Quad's reward oracle: the cosine of a candidate's loss gradient with the EK-FAC-preconditioned
target gradient (docs/methods/quad.md §3.2, §5), and the on-disk cache of its fitted factors.

For a candidate z with captured layer inputs a_t and output gradients g_t (bias folded, response
tokens only) and the preconditioned target gradient P = P(V) of one tracked module,

    ⟨P, G_z⟩ = Σ_t g_tᵀ P a_t,        ‖G_z‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s),

summed over modules, so the per-example gradient G_z = Σ_t g_t a_tᵀ is never formed
(docs/methods/ekfac.md §8). ρ(z) = ⟨P, G_z⟩ / (‖G_z‖·‖P‖) (``reward="cosine"``) or ⟨P, G_z⟩
(``reward="influence"``).

Cost. Every scored row costs one forward pass and one backward pass that stops at the lowest
tracked layer; fitting costs two such passes per fit row (covariances, then the eigenvalue
correction) and one float64 eigendecomposition of every A and S factor (about 2 s per 1536² factor
on one core). So the number of fit rows, the tracked blocks (``layers``) and the scored rows set the
bill; the fitted factors are cached on disk under ``$CURATE_CACHE/quad/factors/<key>``, keyed by a
digest of the model weights, the tracked modules, the fit arguments and the token ids of the fit
rows (which covers their uids, the tokenizer and ``max_length``), so a second call with the same
model, arguments and pool skips the fit. Damping is applied when preconditioning and is not part of
the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import MissingFeatureError, SchemaError, param_error

#: bumped when the fitting code changes what a cached folder holds
CACHE_FORMAT = "quad-ekfac-1"
#: cached factor sets kept (least recently used removed first): one is ~2.6 GB for SmolLM2's MLPs
CACHE_KEEP = 2
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def work_dtype(model: Any) -> Any:
    """float64 for float64 models (exact tests), else float32 (as the influence scores path)."""
    torch = require("torch", "Quad influence rewards")
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def last_blocks(names: Sequence[str], n_blocks: int | None) -> list[str]:
    """The modules of ``names`` inside the last ``n_blocks`` transformer blocks (all when None).

    The block of a module is the integer after ``layers.`` / ``h.`` / ``blocks.`` in its name.

    Raises:
        ParameterError: a module name without a block index, or no module left.
    """
    if n_blocks is None:
        return list(names)
    idx = {}
    for n in names:
        m = _BLOCK.search(n)
        if m is None:
            raise param_error("Quad", "layers", "None for modules outside numbered blocks", f"{n_blocks} (module {n})")
        idx[n] = int(m.group(1))
    top = max(idx.values())
    return [n for n in names if idx[n] > top - n_blocks]


def weights_digest(model: Any) -> str:
    """A digest of every parameter (name, shape, Σw, Σw², Σ|w| in float64, rounded to 10 digits)."""
    torch = require("torch", "Quad influence rewards")
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().double()
            sums = [float(w.sum()), float((w * w).sum()), float(w.abs().sum())]
            h.update(f"{name}{tuple(p.shape)}{[f'{s:.10g}' for s in sums]}".encode())
    return h.hexdigest()


def factors_key(model: Any, names: Sequence[str], fit: Sequence[Any], args: dict[str, Any]) -> str:
    """Cache key of EK-FAC factors: weights, tracked modules, fit arguments and the fit rows' tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"format": CACHE_FORMAT, "weights": weights_digest(model), "names": list(names),
                         "args": args}, sort_keys=True, default=str).encode())
    for e in fit:
        h.update(e.uid.encode())
        h.update(np.asarray(e["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(e["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()


def fit_sample(examples: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A seeded sample of at most ``n`` rows with response tokens, ordered by length (less padding).

    The sample is the one :class:`~curate.influence.curvature.Curvature` draws with ``max_examples``
    (a seeded permutation of the candidates, first ``n``), so the rows do not change; only the
    batches are length-sorted, with ties by uid.
    """
    torch = require("torch", "Quad influence rewards")
    live = [e for e in examples if e.n_response > 0]
    if len(live) > n:
        idx = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        live = [live[i] for i in idx.tolist()]
    return sorted(live, key=lambda e: (len(e["input_ids"]), e.uid))


class _Bar:
    """A tqdm bar when ``enabled`` (the codebase's progress mechanism), else nothing."""

    def __init__(self, enabled: bool, total: int | None, desc: str, unit: str = "row") -> None:
        self.bar = require("tqdm", "progress bars").tqdm(total=total, desc=desc, unit=unit) if enabled else None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, note: str | None = None) -> None:
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note)
            self.bar.close()


class _CountingTask:
    """A task that advances a progress bar by the rows of every batch it collates."""

    def __init__(self, task: Any, bar: _Bar) -> None:
        self._task, self._bar = task, bar

    def collate(self, examples: Sequence[Any]) -> Any:
        self._bar.update(len(examples))
        return self._task.collate(examples)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def fitted_factors(model: Any, task: Any, examples: Sequence[Any], *, modules: str, layers: int | None,
                   fit_examples: int, batch_size: int, seed: int, damping: float | str | None = "heuristic",
                   cache: bool | str | Path = True, progress: bool = False) -> tuple[Any, str]:
    """EK-FAC factors (true Fisher) of ``model`` on a seeded sample of ``examples``, fitted or from the cache.

    Args:
        modules: a :func:`~curate.influence.select_modules` spec; ``layers`` keeps the last blocks only.
        cache: True (``$CURATE_CACHE/quad/factors``), a folder, or False (always fit, write nothing).

    Returns:
        (the fitted :class:`~curate.influence.curvature.Curvature`, ``"fitted"`` | ``"cache"``).
    """
    from curate.features.capture import select_modules
    from curate.features.lm import cache_root
    from curate.influence.curvature import Curvature

    names = last_blocks(select_modules(model, modules), layers)
    fit = fit_sample(examples, fit_examples, seed)
    if not fit:
        raise SchemaError("Quad: no pool row has response tokens to fit EK-FAC on.", field="messages",
                          expected="rows with an assistant turn")
    curv = Curvature(strategy="ekfac", modules=names, fisher="true", damping=damping, seed=seed,
                     batch_size=batch_size, max_examples=None)
    folder = None
    if cache is not False:
        root = (cache_root() / "quad" / "factors") if cache is True else Path(cache)
        folder = root / factors_key(model, names, fit, curv.arguments())
        if (folder / "arguments.json").exists():
            try:
                loaded = Curvature.from_folder(folder, damping=damping)
                folder.touch()  # most recently used: the last to be evicted
                if progress:
                    require("tqdm", "progress bars").tqdm.write(f"quad: EK-FAC factors from the cache ({folder})",
                                                                 file=sys.stderr)
                return loaded, "cache"
            except (OSError, ValueError, RuntimeError) as exc:  # a damaged cache entry is refitted
                warnings.warn(f"quad: ignoring unreadable cached factors {folder} ({exc}).", stacklevel=3)
    bar = _Bar(progress, 2 * len(fit), f"quad: fit EK-FAC on {len(fit)} rows ({len(names)} modules)")
    curv.fit(model, _CountingTask(task, bar), fit)
    bar.close()
    for f in curv.factors.values():  # EK-FAC preconditions with eigenvectors and Λ only: a third less disk
        f.a_cov = f.s_cov = None
    if folder is not None:
        try:
            curv.save(folder, extra={"rows": len(fit)})
            _evict(folder.parent, keep=CACHE_KEEP)
        except OSError as exc:  # a read-only cache must not fail the selection
            warnings.warn(f"quad: could not cache the factors in {folder} ({exc}).", stacklevel=3)
    return curv, "fitted"


def _evict(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used entries (an entry can be gigabytes)."""
    import shutil

    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


class InfluenceReward:
    """ρ(z) = cos(G_z, P(V)) (or the raw ⟨P(V), G_z⟩) with EK-FAC fitted on the pool (docs/methods/quad.md §3.2).

    V = Σ_{r ∈ targets} ∇ℓ_sum(r) over the tracked modules (``reference_agg="sum"``) or the mean of
    the unit-normalised per-target P(V_r) (``"mean_of_normalized"``, the reference code's average of
    per-target cosines). P is the damped EK-FAC inverse of :class:`curate.influence.Curvature`,
    fitted on a seeded sample of at most ``fit_examples`` **pool** rows (never on the targets, which
    was a defect of the reference code), loaded from ``factors`` (``curate influence fit``) or from
    the factor cache (module docstring).

    Args:
        model, tokenizer: a causal LM (``nn.Module``) and its tokenizer.
        pool: the pool table (``uid`` plus canonical text columns).
        targets: the target table (reference set R).
        modules: tracked modules (``"mlp"``, ``"mlp+attn"`` as the paper, any :class:`Curvature` spec);
            ``layers``: keep only the modules of the last ``layers`` blocks (None: all).
        factors: folder of fitted factors, or an already fitted ``Curvature``; None fits on the pool.
        cache: where fitted factors are cached (see :func:`fitted_factors`).
        progress: show progress bars for the fit and the target gradients.
        fit_examples, damping, reward, reference_agg, max_length, batch_size, seed: see ``QuadSelector``.
    """

    def __init__(self, model: Any, tokenizer: Any, pool: pl.DataFrame, targets: pl.DataFrame, *,
                 modules: str = "mlp", layers: int | None = None, factors: Any = None, fit_examples: int = 2000,
                 damping: float | str | None = "heuristic", reward: str = "cosine", reference_agg: str = "sum",
                 max_length: int = 256, batch_size: int = 4, seed: int = 0, cache: bool | str | Path = False,
                 progress: bool = False) -> None:
        from curate.features.lm import encode_examples
        from curate.influence.curvature import Curvature
        from curate.influence.scores import example_gradients
        from curate.influence.task import CausalLMTask

        self.torch = require("torch", "Quad influence rewards")
        self.model, self.reward, self.batch_size = model, reward, batch_size
        self.dtype = work_dtype(model)
        self.task = CausalLMTask(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.uids = pool["uid"].to_list()
        self.pos = {u: i for i, u in enumerate(self.uids)}
        self.examples = encode_examples(pool, tokenizer, max_length=max_length)
        tgt = encode_examples(targets, tokenizer, max_length=max_length)
        tgt = [e for e in tgt if e.n_response > 0]
        if not tgt:
            raise SchemaError("Quad: no target row has response tokens (a reference answer) to take a loss on.",
                              field="answer", expected="target rows with an answer or an assistant turn")
        self.factors_source = "given"
        if isinstance(factors, Curvature):
            curv = factors
        elif factors is not None:
            curv = Curvature.from_folder(factors, damping=damping)
        else:
            curv, self.factors_source = fitted_factors(
                model, self.task, self.examples, modules=modules, layers=layers, fit_examples=fit_examples,
                batch_size=batch_size, seed=seed, damping=damping, cache=cache, progress=progress)
        self.curv = curv
        bar = _Bar(progress, len(tgt), f"quad: gradients of {len(tgt)} targets")
        task = _CountingTask(self.task, bar)
        if reference_agg == "sum":
            v = example_gradients(curv, model, task, tgt, batch_size=batch_size, aggregate="sum")
            pv = curv.precondition({n: g[0] for n, g in v.items()})
        else:
            pv = {n: 0.0 for n in curv.names}
            for e in tgt:
                g = example_gradients(curv, model, task, [e], batch_size=1)
                p = curv.precondition({n: x[0] for n, x in g.items()})
                norm = math.sqrt(sum(float((x**2).sum()) for x in p.values())) or 1.0
                pv = {n: pv[n] + p[n] / (norm * len(tgt)) for n in curv.names}
        bar.close()
        self.pv = pv
        self.pv_norm = math.sqrt(sum(float((x**2).sum()) for x in pv.values()))
        dev = next(model.parameters()).device
        self._p = {n: p.to(device=dev, dtype=self.dtype) for n, p in pv.items()}
        self.n_targets = len(tgt)
        self.n_scored = 0

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """ρ for pool rows by position (rows without response tokens get 0).

        Rows are scored in length-sorted micro-batches (right padding, so a row's ρ does not depend
        on its batch); the values come back in the order of ``idx``.
        """
        from curate.influence.curvature import task_captures

        torch = self.torch
        idx = [int(i) for i in idx]
        out = np.zeros(len(idx))
        live = sorted((j for j, i in enumerate(idx) if self.examples[i].n_response > 0),
                      key=lambda j: (len(self.examples[idx[j]]["input_ids"]), idx[j]))
        if not live:
            return out
        names = self.curv.names
        caps = task_captures(self.model, self.task, names, [self.examples[idx[j]] for j in live],
                             batch_size=self.batch_size, dtype=self.dtype)
        done = 0
        for cap in caps:
            part = live[done : done + len(cap.examples)]
            done += len(cap.examples)
            dot: Any = 0.0
            norm2: Any = 0.0
            for n in names:
                calls = cap.calls(n)
                a = torch.cat([c[0] for c in calls], 1)
                g = torch.cat([c[1] * c[2][..., None] for c in calls], 1)
                dot = dot + torch.einsum("bto,bto->b", g, a @ self._p[n].T).double()
                if self.reward == "cosine":
                    norm2 = norm2 + ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2)).double()
            if self.reward == "cosine":
                den = torch.sqrt(torch.clamp(norm2, min=0.0)) * self.pv_norm
                val = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0)
            else:
                val = dot
            out[part] = val.detach().cpu().numpy()
        self.n_scored += len(live)
        return out

    def __call__(self, uids: Sequence[str]) -> np.ndarray:
        """ρ for pool rows by uid (the ``reward_fn`` protocol)."""
        try:
            idx = [self.pos[u] for u in uids]
        except KeyError as exc:
            raise MissingFeatureError(f"Quad reward: uid {exc.args[0]} is not in the pool the oracle was built on.") from None
        return self.rows(idx)
