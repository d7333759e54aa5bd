"""Small built-in steps that need nothing but polars: kind filter and seeded sampling."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import KINDS


@register_step("kind_filter")
@dataclass(frozen=True, kw_only=True)
class KindFilter:
    """Keep rows of the given kinds (e.g. only preference pairs)."""

    kinds: tuple[str, ...] | list[str] = ("sft",)

    def __post_init__(self) -> None:
        kinds = [self.kinds] if isinstance(self.kinds, str) else list(self.kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise param_error("KindFilter", "kinds", f"a non-empty list of {KINDS}", self.kinds)
        object.__setattr__(self, "kinds", tuple(kinds))

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        keep = pl.col("kind").is_in(list(self.kinds))
        return table.select(
            "uid",
            keep.alias("keep"),
            pl.when(keep).then(pl.lit("")).otherwise(pl.lit("kind_filter: kind ") + pl.col("kind")).alias("reason"),
        )


def seeded_key(uid: str, seed: int) -> int:
    """A 64-bit pseudo-random key of (seed, uid): independent of row order, stable across runs."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest(), "big")


@register_step("sample")
@dataclass(frozen=True, kw_only=True)
class Sample:
    """Keep a seeded random sample of ``n`` rows or a ``fraction`` of them (row-order invariant)."""

    n: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.n is None) == (self.fraction is None):
            raise param_error("Sample", "n", "given, or 'fraction' given, but not both", self.n)
        if self.n is not None and (not isinstance(self.n, int) or self.n < 0):
            raise param_error("Sample", "n", "an integer >= 0", self.n)
        if self.fraction is not None and not (0.0 < float(self.fraction) <= 1.0):
            raise param_error("Sample", "fraction", "in (0, 1]", self.fraction)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        n = self.n if self.n is not None else int(round(float(self.fraction) * table.height))
        keys = [seeded_key(u, ctx.seed) for u in table["uid"].to_list()]
        order = sorted(range(table.height), key=lambda i: (keys[i], table["uid"][i]))
        chosen = set(order[: min(n, table.height)])
        keep = [i in chosen for i in range(table.height)]
        return pl.DataFrame(
            {
                "uid": table["uid"],
                "keep": keep,
                "reason": ["" if k else f"sample: not among the {n} sampled rows" for k in keep],
            }
        )
