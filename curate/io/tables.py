"""Reading a canonical table back: the one loader every CLI verb uses for its IN file."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from curate.errors import SchemaError
from curate.schema import validate_table


def read_table(path: str | os.PathLike[str], *, what: str = "input") -> pl.DataFrame:
    """A canonical table from ``path``: a parquet written by curate (validated), or any source file
    the readers understand (ingested on the fly with format auto-detection).

    Raises:
        FileNotFoundError: no such file.
        SchemaError: unreadable parquet, or a table that lacks canonical columns (names the column).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {path}.")
    if p.suffix != ".parquet":
        from curate.io import read_sources

        return read_sources([p]).table
    try:
        table = pl.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for bad files
        raise SchemaError(f"cannot read parquet: {exc}", file=str(path)) from None
    return validate_table(table, name=str(path))
