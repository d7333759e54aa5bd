"""Verbs as small in-memory recipes: ``curate dedup | filter | decontam | pii | select | ches`` and
the notebook functions (``curate.dedup``, ``curate.select`` ...) build a recipe of one to three
registered steps and run it with the recipe runner, so a verb and the recipe with the same steps
write the same run folder layout through the same writer (:func:`curate.pipeline.outcome.write_outcome`)
and give byte-identical ``curated.parquet``.

The verb's output folder is the run folder. A rerun with the same input and parameters finds every
step's ``DONE`` marker and recomputes nothing; a rerun with other parameters recomputes the steps
whose cache key changed (the folder is the user's explicit choice, so it is overwritten). A verb
that fails removes the folder when it created it; a folder that existed keeps its ``run.log``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import ParameterError, RecipeError
from curate.pipeline.recipe import parse_recipe
from curate.pipeline.runner import RunResult, run_recipe

Source = str | os.PathLike[str] | pl.DataFrame


def _input(source: Any) -> Any:
    return str(source) if isinstance(source, (str, os.PathLike)) else source


def run_verb(command: str, source: Source, steps: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str], *,
             targets: Source | Sequence[Source] | None = None, seed: int = 0, progress: bool = False,
             log: Any = None) -> RunResult:
    """Run ``steps`` (``{"use": step, **params}`` mappings, as in a recipe) on ``source`` into ``out_dir``.

    Args:
        command: the verb (recorded as ``command`` in manifest.json and as the recipe name).
        source: the pool: a canonical parquet (taken as it is, with its step columns), any source
            file the readers understand, or an in-memory DataFrame.
        targets: target files/folders/tables, as a recipe's ``targets:``.
    """
    if targets is None:
        target_list: list[Any] = []
    elif isinstance(targets, (str, os.PathLike, pl.DataFrame)):
        target_list = [_input(targets)]
    else:
        target_list = [_input(t) for t in targets]
    out = Path(out_dir).resolve()
    raw = {"name": command, "seed": seed, "inputs": [_input(source)], "targets": target_list,
           "output": str(out.parent), "steps": [dict(s) for s in steps]}
    try:
        recipe = parse_recipe(raw, source=f"curate {command}")
    except RecipeError as exc:  # a bad option is the user's parameter, not a recipe they wrote
        if isinstance(exc.__cause__, ParameterError):
            raise exc.__cause__ from None
        raise
    fresh = not out.exists()
    try:
        return run_recipe(recipe, run_dir=out, overwrite=True, progress=progress, log=log, extra={"command": command})
    except BaseException:
        if fresh:  # a verb that fails leaves nothing behind in a folder it created
            shutil.rmtree(out, ignore_errors=True)
        raise


@dataclass
class Outcome:
    """What a notebook call returns: the curated and rejected rows, the selector's view (None when
    no selector ran), the manifest, and the run folder (None when the call wrote to a temporary one)."""

    curated: pl.DataFrame
    rejected: pl.DataFrame
    selection: pl.DataFrame | None
    manifest: dict[str, Any]
    run_dir: Path | None

    def _repr_html_(self) -> str:
        from curate.pipeline.results import run_html

        return run_html(self.run_dir or Path("."), self.manifest)

    def __repr__(self) -> str:
        rows = self.manifest.get("rows", {})
        return (f"Outcome({self.manifest.get('command', '')}: {rows.get('input')} rows -> {rows.get('curated')} curated, "
                f"{rows.get('rejected')} rejected{', run_dir=' + str(self.run_dir) if self.run_dir else ''})")


def run_in_memory(command: str, source: Source, steps: Sequence[Mapping[str, Any]], *,
                  out_dir: str | os.PathLike[str] | None = None, **kw: Any) -> Outcome:
    """:func:`run_verb`, with the outputs read back into an :class:`Outcome`. Without ``out_dir``
    the run goes to a temporary folder that is removed afterwards."""
    tmp = None if out_dir is not None else tempfile.mkdtemp(prefix=f"curate-{command}-")
    folder = Path(out_dir if out_dir is not None else tmp)  # type: ignore[arg-type]
    try:
        res = run_verb(command, source, steps, folder, **kw)
        sel = folder / "selection.parquet"
        return Outcome(pl.read_parquet(folder / "curated.parquet"), pl.read_parquet(folder / "rejected.parquet"),
                       pl.read_parquet(sel) if sel.exists() else None, res.manifest,
                       None if tmp else res.run_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
