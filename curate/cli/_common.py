"""What every verb module shares: the ``--json`` / ``--quiet`` / ``--plugin`` options, the one way
to print a summary, and the one loader of a verb's IN table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import click
import polars as pl

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines.")
plugin_option = click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE",
                             help="Import user steps from a Python file or module first (repeatable).")


def emit(as_json: bool, summary: dict[str, Any], human: Callable[[], None] | Sequence[str] | None = None) -> None:
    """Print ``summary`` as one JSON line (``--json``), else the human form: ``human()``, its lines,
    or ``key: value`` per entry."""
    if as_json:
        click.echo(json.dumps(summary, default=str))
    elif callable(human):
        human()
    elif human is not None:
        for line in human:
            click.echo(line)
    else:
        for k, v in summary.items():
            click.echo(f"{k}: {v}")


def read_table(path: str | os.PathLike[str], what: str = "input") -> pl.DataFrame:
    """A verb's IN: a canonical parquet (validated) or any source file the readers understand
    (:func:`curate.io.tables.read_table`); errors name the file."""
    from curate.io.tables import read_table as _read

    return _read(path, what=what)
