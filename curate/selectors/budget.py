"""What to select: :class:`Budget` (rows, a fraction or tokens) and :class:`Quota` (per-group shares).

A budget is parsed once from a recipe or command-line value (:meth:`Budget.parse`) and validated
with the one parameter-error template; :class:`~curate.selectors.base.BaseSelector` spends it through
:func:`curate.selectors.quotas.fill`. Kept hashable (frozen; group mappings stored as sorted pairs)
so steps and recipes can hold it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate.errors import param_error
from curate.selectors.quotas import token_counts

# --------------------------------------------------------------------------- budget
_SIZE_KEYS = ("n", "fraction", "tokens")
_GROUP_KEYS = {"ratios": "ratios", "min": "min_share", "max": "max_share", "min_share": "min_share",
               "max_share": "max_share"}
_BUDGET_KEYS = (*_SIZE_KEYS, "overshoot", "by", *_GROUP_KEYS, "also")


def _group_shares(name: str, value: Any) -> tuple[tuple[str, float], ...] | None:
    """A ``{group: number >= 0}`` mapping (or its sorted pairs) as sorted pairs, so a Budget stays hashable."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        out = tuple(sorted((str(k), v) for k, v in pairs))
    except (TypeError, ValueError):
        raise param_error("Budget", name, "a mapping of group -> number >= 0", value) from None
    if not out or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or v < 0
                      for _, v in out):
        raise param_error("Budget", name, "a non-empty mapping of group -> number >= 0", value)
    return tuple((k, float(v)) for k, v in out)


@dataclass(frozen=True)
class Quota:
    """Quotas over one column: ``ratios`` (exact shares summing to 1) or ``min_share`` /
    ``max_share`` floors and caps (see :class:`Budget`)."""

    by: str
    ratios: Any = None
    min_share: Any = None
    max_share: Any = None

    def __post_init__(self) -> None:
        for name in ("ratios", "min_share", "max_share"):
            object.__setattr__(self, name, _group_shares(name, getattr(self, name)))
        if not isinstance(self.by, str) or not self.by.strip():
            raise param_error("Budget", "by", "a column name", self.by)
        if not (self.ratios or self.min_share or self.max_share):
            raise param_error("Budget", "by", "given with ratios, min or max", self.by)
        if self.ratios and (self.min_share or self.max_share):
            raise param_error("Budget", "ratios", "given alone (ratios fix every group; min/max are for "
                              "budgets without ratios)", dict(self.ratios))
        if self.ratios:
            total = sum(v for _, v in self.ratios)
            if abs(total - 1.0) > 1e-6 or any(k == "*" for k, _ in self.ratios):
                raise param_error("Budget", "ratios", "shares of named groups that sum to 1", dict(self.ratios))

    @classmethod
    def parse(cls, value: Any) -> Quota:
        if isinstance(value, Quota):
            return value
        if not isinstance(value, Mapping) or set(map(str, value)) - {"by", *_GROUP_KEYS}:
            raise param_error("Budget", "also", "a list of {by: COLUMN, ratios | min | max: {group: share}}", value)
        return cls(**{_GROUP_KEYS.get(k, k): v for k, v in value.items()})

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"by": self.by}
        for key, name in (("ratios", "ratios"), ("min", "min_share"), ("max", "max_share")):
            if getattr(self, name):
                out[key] = dict(getattr(self, name))
        return out


@dataclass(frozen=True)
class Budget:
    """How much to select: exactly one of ``n`` (rows), ``fraction`` (of the pool) or ``tokens``,
    optionally stratified by a column.

    ``fraction`` resolves to ``floor(fraction * N)`` rows (LESS's top-p). ``tokens`` walks the
    selector's pick order first-fit, so the kept rows' token counts (the ``count_tokens`` step's
    ``n_tokens``, else a word estimate; see :func:`curate.selectors.quotas.token_counts`) fill the
    budget to within one row; ``overshoot`` keeps the row that crosses it instead.

    Stratified budgets (:mod:`curate.selectors.quotas`): ``by`` names a column (``source``,
    ``task``, ``language`` for ``lang_id__language``, any user column) and either ``ratios``
    (group -> share, summing to 1: largest-remainder quotas met exactly) or ``min_share`` /
    ``max_share`` (group -> floor / cap; a value <= 1 is a share of the budget, above 1 a number
    of rows or tokens; the group ``"*"`` sets every unnamed group). Within each group the
    selector's own order decides; rows cut by a quota get ``over_quota: <group>``. ``also`` adds
    quotas over more columns, met together (``{tokens: 2e6, by: source, ratios: {...}, also:
    [{by: language, min: {"*": 0.1}}]}``: 60/40 sources and every language at least 10%).
    """

    n: int | None = None
    fraction: float | None = None
    tokens: float | None = None
    overshoot: bool = False
    by: str | None = None
    ratios: Any = None
    min_share: Any = None
    max_share: Any = None
    also: Any = None

    def __post_init__(self) -> None:
        given = [k for k in _SIZE_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise param_error("Budget", "n", "given alone (exactly one of n, fraction, tokens)", given or None)
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1):
            raise param_error("Budget", "n", "an integer >= 1", self.n)
        if self.fraction is not None and (
            isinstance(self.fraction, bool) or not isinstance(self.fraction, numbers.Real)
            or not (0.0 < float(self.fraction) <= 1.0)
        ):
            raise param_error("Budget", "fraction", "in (0, 1]", self.fraction)
        if self.tokens is not None and (
            isinstance(self.tokens, bool) or not isinstance(self.tokens, numbers.Real)
            or not math.isfinite(float(self.tokens)) or float(self.tokens) <= 0
        ):
            raise param_error("Budget", "tokens", "a finite number > 0", self.tokens)
        if not isinstance(self.overshoot, bool):
            raise param_error("Budget", "overshoot", "true or false", self.overshoot)
        if self.by is not None:
            primary = Quota(self.by, self.ratios, self.min_share, self.max_share)
            for name in ("ratios", "min_share", "max_share"):
                object.__setattr__(self, name, getattr(primary, name))
        elif self.ratios or self.min_share or self.max_share:
            raise param_error("Budget", "by", "a column name when ratios, min or max are given", self.by)
        also = self.also
        if also is not None:
            if isinstance(also, Mapping) or not isinstance(also, (list, tuple)) or not also:
                raise param_error("Budget", "also", "a list of {by: COLUMN, ratios | min | max: {group: share}}", also)
            object.__setattr__(self, "also", tuple(Quota.parse(q) for q in also))
            if self.by is None:
                raise param_error("Budget", "by", "given when 'also' is", self.by)
            columns = [self.by, *(q.by for q in self.also)]
            if len(set(columns)) != len(columns):
                raise param_error("Budget", "also", "quotas over distinct columns", columns)

    def quotas(self) -> list[Quota]:
        """Every quota of the budget: the ``by`` one, then those of ``also``."""
        if self.by is None:
            return []
        return [Quota(self.by, self.ratios, self.min_share, self.max_share), *(self.also or ())]

    @classmethod
    def parse(cls, value: Any) -> Budget:
        """``Budget`` from a recipe/CLI value (see :meth:`_parse`); errors name the 'budget' parameter."""
        from curate.errors import ParameterError

        try:
            return cls._parse(value)
        except ParameterError as exc:
            msg = str(exc)
            if "'budget' parameter" in msg or any(f"'{k}' parameter of Budget" in msg for k in
                                                 ("overshoot", "by", "ratios", "min_share", "max_share", "also")):
                raise
            raise param_error("Budget", "budget", "an int >= 1, a float in (0, 1], 'tokens:X' (X > 0) or "
                              "{n|fraction|tokens: v}", value) from exc

    @classmethod
    def _parse(cls, value: Any) -> Budget:
        """``Budget`` from a recipe/CLI value.

        ``500`` → n; ``0.1`` → fraction; ``"tokens:2e6"``, ``"n:500"``, ``"0.1"``;
        ``{"tokens": 2e6}``; ``{"tokens": 2e6, "by": "source", "ratios": {"alpaca": 0.6, ...}}``
        (keys: one of n/fraction/tokens, plus overshoot, by, ratios, min, max); or a ``Budget``.
        """
        if isinstance(value, Budget):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(map(str, value)) - set(_BUDGET_KEYS))
            sizes = [k for k in _SIZE_KEYS if k in value]
            if unknown or len(sizes) != 1:
                raise param_error("Budget", "budget", "a mapping with exactly one of n, fraction, tokens (plus "
                                  "overshoot, by, ratios, min, max)", dict(value))
            key = sizes[0]
            size = cls._parse_size(key, value[key])
            extra = {_GROUP_KEYS.get(k, k): v for k, v in value.items() if k not in _SIZE_KEYS}
            return cls(**{key: size}, **extra)
        if isinstance(value, str) and value.strip().startswith("{"):  # a YAML/JSON mapping on the command line
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise param_error("Budget", "budget", "a YAML mapping such as {tokens: 2e6, by: source, ratios: "
                                  "{a: 0.6, b: 0.4}}", value) from None
            if not isinstance(value, Mapping):
                raise param_error("Budget", "budget", "a mapping", value)
            return cls._parse(value)
        if isinstance(value, str):
            text = value.strip()
            if ":" in text:
                key, _, num = text.partition(":")
                try:
                    v = float(num)
                except ValueError:
                    raise param_error("Budget", "budget", "'n:INT', 'fraction:X' or 'tokens:X'", value) from None
                return cls._parse({key.strip(): v})
            try:
                num = float(text)
            except ValueError:
                raise param_error("Budget", "budget", "a number or 'tokens:X'", value) from None
            if not math.isfinite(num):
                raise param_error("Budget", "budget", "a finite number or 'tokens:X'", value)
            value = int(num) if ("." not in text and "e" not in text.lower()) else num
        if isinstance(value, bool):
            raise param_error("Budget", "budget", "an int >= 1, a float in (0, 1] or a mapping", value)
        if isinstance(value, numbers.Integral):
            return cls(n=int(value))
        if isinstance(value, numbers.Real):
            v = float(value)
            if 0.0 < v <= 1.0:
                return cls(fraction=v)
            if v > 1.0 and v.is_integer():
                return cls(n=int(v))
            raise param_error("Budget", "budget", "an int >= 1 or a float in (0, 1]", value)
        raise param_error("Budget", "budget", "an int >= 1, a float in (0, 1] or a mapping", value)

    @staticmethod
    def _parse_size(key: str, v: Any) -> Any:
        if isinstance(v, str):  # YAML reads 2e6 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise param_error("Budget", key, "a number", v) from None
        if key == "n" and isinstance(v, float) and v.is_integer():
            v = int(v)
        return v

    def rows(self, n_pool: int, lengths: np.ndarray | None = None) -> int:
        """Upper bound on the number of rows to pick from a pool of ``n_pool`` rows.

        For a token budget this is the most rows that could fit (shortest rows first).
        """
        if self.n is not None:
            return min(int(self.n), n_pool)
        if self.fraction is not None:
            return min(int(math.floor(float(self.fraction) * n_pool + 1e-9)), n_pool)
        assert lengths is not None  # internal: BaseSelector always passes lengths for token budgets
        csum = np.cumsum(np.sort(lengths))
        k = int(np.searchsorted(csum, float(self.tokens), side="right"))
        return min(k + 1, n_pool) if self.overshoot else k

    @property
    def grouped(self) -> bool:
        return self.by is not None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _SIZE_KEYS if getattr(self, k) is not None}
        if self.overshoot:
            out["overshoot"] = True
        if self.by is not None:
            out.update(self.quotas()[0].describe())
        if self.also:
            out["also"] = [q.describe() for q in self.also]
        return out


def row_tokens(table: pl.DataFrame) -> np.ndarray:
    """Token count per row for token budgets: counted tokens (``n_tokens`` or ``<step>__n_tokens``)
    when present, otherwise a whitespace word count of the prompt+response text (a documented,
    tokenizer-free estimate)."""
    return token_counts(table)[0]


