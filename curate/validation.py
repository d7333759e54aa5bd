"""Parameter checks shared by every step, selector and function: one error template.

Each check raises :func:`curate.errors.param_error` ("The 'alpha' parameter of Quad must be >= 0.
Got -1.") so recipes fail at load time with the parameter, the rule and the value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from curate.errors import param_error


def check_int(owner: str, name: str, value: Any, lo: int | None = None, hi: int | None = None,
              allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        rule = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")
        raise param_error(owner, name, rule + (" or None" if allow_none else ""), value)


def check_float(owner: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi}")
        rule = "a finite number" + (" " + " and ".join(parts) if parts else "")
        raise param_error(owner, name, rule + (" or None" if allow_none else ""), value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if not isinstance(value, (str, bool)) or value not in choices:
        raise param_error(owner, name, f"one of {list(choices)}", value)


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise param_error(owner, name, "True or False", value)


def check_str(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise param_error(owner, name, "a non-empty string" + (" or None" if allow_none else ""), value)
