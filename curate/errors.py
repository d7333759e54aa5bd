"""Error types of curate.

Every error subclasses a built-in type so callers can catch ``ValueError`` / ``KeyError`` /
``ImportError`` without importing curate, and every message names *where* (file, line or row,
field), *what was expected* and *what was found*.
"""

from __future__ import annotations

from typing import Any


def _where(file: str | None, line: int | None, field: str | None) -> str:
    parts = []
    if file is not None:
        parts.append(f"{file}:{line}" if line is not None else str(file))
    elif line is not None:
        parts.append(f"row {line}")
    if field is not None:
        parts.append(f"field '{field}'")
    return ", ".join(parts)


class SchemaError(ValueError):
    """A source record or a table does not have the expected shape.

    Attributes:
        file: the source file (or None for in-memory tables).
        line: 1-based line (JSONL/CSV), element index + 1 (JSON arrays) or row number.
        field: the offending field, when one is to blame.
        expected: what was expected, in words.
        found: what was found, in words.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        expected: str | None = None,
        found: Any = None,
    ) -> None:
        self.file, self.line, self.field = file, line, field
        self.expected, self.found = expected, found
        where = _where(file, line, field)
        text = f"{where}: {message}" if where else message
        if expected is not None:
            text += f" Expected {expected}"
            text += f", found {_short(found)}." if found is not None else "."
        super().__init__(text)


class RecipeError(ValueError):
    """A recipe (YAML) is invalid: unknown keys, bad values, unknown steps."""


class ParameterError(ValueError):
    """A hyperparameter is out of range. Use :func:`param_error` for the one template."""


class MissingFeatureError(KeyError):
    """A feature set, or some uids inside it, is missing."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(ImportError):
    """An optional heavy dependency is not installed."""


def param_error(owner: str, name: str, rule: str, got: Any) -> ParameterError:
    """The one parameter-error template: "The 'alpha' parameter of Quad must be >= 0. Got -1."."""
    return ParameterError(f"The '{name}' parameter of {owner} must be {rule}. Got {got!r}.")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
