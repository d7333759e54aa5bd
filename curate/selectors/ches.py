"""CHES and LN-CHES: filtering preference pairs that cause likelihood displacement.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
ICLR 2025 (arXiv 2410.08847), Definition 2 (CHES) and Appendix A, Definition 3 (LN-CHES); see
``docs/methods/ches.md``. For a prompt x and responses y+ (chosen), y- (rejected), with h the last-layer
hidden state *after the final norm* (the input of the unembedding) at each position that predicts a
response token, s± = Σ_k h_{x,y±<k} and m± = s±/|y±|::

    CHES(x, y+, y-)    = <s+, s- - s+>
    LN-CHES(x, y+, y-) = <m+, m- - m+>

Higher means more similar responses and more expected displacement of log π(y+), so the native quantity
is lower-is-better and ``score = -measure`` (docs/methods/README.md §5).

Positions, the forward passes and the stored ``ches/states`` feature (response state sums and
log-probabilities, one forward pass per response serving CHES and the reference margin of
:mod:`curate.preference.diagnostics`) live in :mod:`curate.features.ches_states`.

Where we deviate from the reference code (``princeton-nlp/unintentional-unalignment``):

- Batching: the batched mode is **left padding with explicit** ``position_ids = clamp(cumsum(mask) - 1, 0)``
  (the reference left-pads without position ids, which is only correct for RoPE models). Left padding lets
  every row's response positions sit at the end of the batch, so the LM head runs only on the last
  ``max R + 1`` positions (``logits_to_keep``). ``padding="right"`` (per-row positions, the plain batched
  mode) and ``padding="none"`` (one example at a time, the reference default) give the same numbers
  (tests: 1e-10 in float64). ``padding="prefix"`` (pairs only) runs the shared prompt once per pair
  and both responses as one batch of two on its KV cache: the same numbers (tests: 1e-10), and fewer
  tokens through the model when prompts are long (multi-turn hh-rlhf). :func:`~curate.features.ches_states.ches_features` picks
  ``prefix`` on CPU and ``left`` on CUDA unless told otherwise.
- Truncation (``max_length``): when prompt + response is too long the response keeps at most
  ``max_length - min(P, max_length // 2)`` tokens and the prompt is cut from the left. The reference
  truncates the concatenated sequence from the right.
- Multi-message responses are joined with blank lines into one response text.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate.errors import SchemaError, param_error
from curate.features.ches_states import FEATURE, PAIR_PADDINGS, ches_features, ches_table, response_text
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.selectors.base import BaseSelector, Choice, SelectContext, check_choice

MEASURES = ("ln_ches", "ches")
KEPT_LOW = "kept_low_ches"
DROPPED_HIGH = "dropped_high_ches"
NO_RESPONSE = "no_response_tokens"
IDENTICAL = "identical_responses"


# ----------------------------------------------------------------------------------- the selector
def _fraction(owner: str, name: str, value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or not 0.0 < float(value) <= 1.0:
        raise param_error(owner, name, "a number in (0, 1] or None", value)


@dataclass(frozen=True, kw_only=True)
class ChesSelector(BaseSelector):
    """CHES / LN-CHES filter of preference pairs (Razin et al., ICLR 2025): keep the least similar pairs.

    Exactly one mode may be given; with none, the paper preset ``keep_bottom_fraction=0.05`` applies.

    Attributes:
        measure: ``ln_ches`` (default, the paper's filtering measure) or ``ches`` (raw; grows with length).
        keep_bottom_fraction: keep the ceil(f·N) pairs with the lowest measure (paper: 0.05 on LN-CHES).
        drop_top_fraction: drop the ceil(q·N) pairs with the highest measure, keep the rest.
        threshold: keep pairs whose measure is <= threshold.
        keep_window: ``(quantile, n)``: keep n pairs centred on that quantile of the ascending order
            (the paper's §5 percentile subsets).

    The budget is a cap on the kept count (lowest measure first). Ties go to the smaller uid. Pairs
    with no response tokens on a side get ``score = -inf`` and reason ``no_response_tokens``. Extra
    columns: ``ches__ches``, ``ches__ln_ches``, ``ches__len_chosen``, ``ches__len_rejected``.
    """

    name: ClassVar[str] = "ches"
    requires: ClassVar[tuple[str, ...]] = ("ches",)
    default_features: ClassVar[dict[str, str]] = {"ches": FEATURE}
    default_budget: ClassVar[Any] = 1.0
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("measure", "cosine"), ("keep_bottom_fraction", 0.0), ("keep_bottom_fraction", 1.5),
        ("drop_top_fraction", -0.1), ("threshold", float("nan")), ("keep_window", (1.5, 3)),
        ("keep_window", (0.5, 0)),
    )

    measure: str = "ln_ches"
    keep_bottom_fraction: float | None = None
    drop_top_fraction: float | None = None
    threshold: float | None = None
    keep_window: tuple[float, int] | None = None

    def __post_init__(self) -> None:
        check_choice("CHES", "measure", self.measure, MEASURES)
        _fraction("CHES", "keep_bottom_fraction", self.keep_bottom_fraction)
        _fraction("CHES", "drop_top_fraction", self.drop_top_fraction)
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t))):
            raise param_error("CHES", "threshold", "a finite number or None", t)
        w = self.keep_window
        if w is not None:
            ok = isinstance(w, (list, tuple)) and len(w) == 2 and isinstance(w[0], numbers.Real) \
                and not isinstance(w[0], bool) and 0.0 <= float(w[0]) <= 1.0 \
                and isinstance(w[1], numbers.Integral) and not isinstance(w[1], bool) and w[1] >= 1
            if not ok:
                raise param_error("CHES", "keep_window", "(quantile in [0, 1], n >= 1) or None", w)
            object.__setattr__(self, "keep_window", (float(w[0]), int(w[1])))
        given = [k for k in ("keep_bottom_fraction", "drop_top_fraction", "threshold", "keep_window")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise param_error("CHES", given[1], f"None when {given[0]} is given (one mode at a time)",
                              getattr(self, given[1]))

    def fills_budget(self) -> bool:
        return False

    def mode(self) -> tuple[str, Any]:
        """The active mode and its value (the paper preset when none is given)."""
        for k in ("keep_bottom_fraction", "drop_top_fraction", "threshold", "keep_window"):
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        return "keep_bottom_fraction", 0.05

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        cols = ches_table(ctx.features["ches"])
        measure = cols[self.measure]
        n = ctx.n
        valid = np.isfinite(measure)
        if not np.isfinite(measure[(cols["len_chosen"] > 0) & (cols["len_rejected"] > 0)]).all():
            i = int(np.argmax(~valid & (cols["len_chosen"] > 0) & (cols["len_rejected"] > 0)))
            raise SchemaError("non-finite CHES score.", field=self.measure, expected="finite", found=f"uid {ctx.uids[i]}")
        vidx = np.flatnonzero(valid)
        asc = vidx[np.argsort(measure[vidx], kind="stable")]  # canonical order = uid order, so ties by uid
        nv = len(asc)
        mode, value = self.mode()
        if mode == "keep_bottom_fraction":
            chosen = asc[: math.ceil(value * nv - 1e-9)]
        elif mode == "drop_top_fraction":
            chosen = asc[: nv - math.ceil(value * nv - 1e-9)]
        elif mode == "threshold":
            chosen = asc[measure[asc] <= value]
        else:
            q, m = value
            m = min(m, nv)
            centre = int(round(q * (nv - 1))) if nv else 0
            lo = min(max(0, centre - m // 2), nv - m)
            chosen = asc[lo: lo + m]
        order = chosen[:k]
        reasons = np.full(n, DROPPED_HIGH, dtype=object)
        reasons[order] = KEPT_LOW
        if mode == "keep_window":
            lo_set = set(asc[: lo].tolist())
            for i in range(n):
                if i in lo_set:
                    reasons[i] = "dropped_below_window"
        for i in chosen[k:]:
            reasons[i] = "over_budget_cap"
        reasons[~valid] = NO_RESPONSE
        v = np.asarray(ctx.features["ches"], dtype=np.float64).reshape(n, 2, -1)
        ident = valid & (cols["len_chosen"] == cols["len_rejected"]) & np.all(v[:, 0, 2:] == v[:, 1, 2:], axis=1)
        for i in np.flatnonzero(ident):
            reasons[i] = f"{reasons[i]}:{IDENTICAL}"
        score = np.where(valid, -np.nan_to_num(measure, nan=0.0), -np.inf)
        extra = {"ches__ches": cols["ches"], "ches__ln_ches": cols["ln_ches"],
                 "ches__len_chosen": cols["len_chosen"].astype(np.int64),
                 "ches__len_rejected": cols["len_rejected"].astype(np.int64)}
        finite = measure[valid]
        diag = {"mode": mode, "value": value, "measure": self.measure, "n_scored": int(nv),
                "n_no_response": int((~valid).sum()), "n_identical": int(ident.sum()),
                "measure_quantiles": {str(q): float(np.quantile(finite, q)) for q in (0.0, 0.05, 0.5, 0.95, 1.0)}
                if nv else {}}
        return Choice(order=np.asarray(order, dtype=np.int64), score=score, reasons=reasons, extra=extra,
                      diagnostics=diag)


# ----------------------------------------------------------------------------------- feature step
@register_step("ches_states")
@dataclass(frozen=True, kw_only=True)
class ChesStates:
    """Compute CHES hidden-state sums and response log-probs (feature ``ches/states``) of preference rows.

    Routes non-preference rows and pairs with an empty response to rejected (reasons ``not_a_pair``,
    ``no_response_tokens``); keeps the rest. Razin et al., ICLR 2025 (see ``curate.selectors.ches``).

    Args:
        model: ``default`` (SmolLM2-135M-Instruct) or a local causal-LM folder.
        append_eos: append EOS to responses (match the trainer).
        max_length: token cap per (prompt, response) sequence; null for none.
        batch_size: sequences per forward pass.
        device: ``auto`` | ``cpu`` | ``cuda``.
        dtype: ``float32`` | ``bfloat16`` | ``float64``.
        padding: ``auto`` (``prefix`` on CPU: each prompt once, both responses on its KV cache,
            1.16x the left-padded batches on hh-rlhf; ``left`` batches on CUDA) or any of
            ``left`` | ``right`` | ``none`` | ``prefix``; all give the same values.
    """

    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    append_eos: bool = True
    max_length: int | None = 1024
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    padding: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise param_error("step 'ches_states'", "model", "'default' or a local model folder", self.model)
        if not isinstance(self.append_eos, bool):
            raise param_error("step 'ches_states'", "append_eos", "True or False", self.append_eos)
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 8):
            raise param_error("step 'ches_states'", "max_length", "an integer >= 8 or null", self.max_length)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("step 'ches_states'", "batch_size", "an integer >= 1", self.batch_size)
        check_choice("step 'ches_states'", "device", self.device, ("auto", "cpu", "cuda"))
        check_choice("step 'ches_states'", "dtype", self.dtype, ("float32", "bfloat16", "float64"))
        check_choice("step 'ches_states'", "padding", self.padding, ("auto", *PAIR_PADDINGS))

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        reasons = pair_problems(table)
        ok = [r == "" for r in reasons]
        sub = table.filter(pl.Series(ok))
        device = ctx.device if self.device == "auto" else self.device
        fs = ches_features(sub, model=self.model, store=ctx.features, append_eos=self.append_eos,
                           max_length=self.max_length, batch_size=self.batch_size, padding=self.padding, device=device,
                           dtype=self.dtype, progress=ctx.progress)
        ctx.stats["ches_states"] = {"n_pairs": len(fs), "dim": fs.meta.get("dim"),
                                    "n_truncated": fs.meta.get("n_truncated")}
        return pl.DataFrame({"uid": table["uid"], "keep": ok, "reason": reasons},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8})


def pair_problems(table: pl.DataFrame) -> list[str]:
    """Per row: ``""`` for a usable preference pair, else ``not_a_pair`` or ``no_response_tokens``."""
    out = []
    for row in table.select("kind", "chosen", "rejected").iter_rows(named=True):
        if row["kind"] != "preference":
            out.append("not_a_pair")
        elif not response_text(row["chosen"]).strip() or not response_text(row["rejected"]).strip():
            out.append(NO_RESPONSE)
        else:
            out.append("")
    return out


__all__ = ["FEATURE", "MEASURES", "ChesSelector", "ChesStates", "pair_problems"]
