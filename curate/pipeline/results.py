"""A finished run folder as an object: its manifest, tables, a Hugging Face ``DatasetDict`` and a
compact notebook summary.

``curate.load_run(RUN_DIR)`` returns a :class:`Run`; ``Run.to_hf()`` gives
``DatasetDict(curated=..., rejected=...)`` built from the parquet files through Arrow, so the rows
(messages structs, step columns, reasons) come back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curate._lazy import require
from curate.errors import RecipeError
from curate.io import notebook as nb

#: Files of a run folder shown as links, in this order.
RUN_FILES = ("curated.parquet", "rejected.parquet", "report.html", "manifest.json", "recipe.resolved.yaml")


def selector_steps(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe steps that select under a budget (their parameters hold ``budget``)."""
    steps = manifest.get("recipe", {}).get("steps", [])
    return [s for s in steps if isinstance(s, dict) and "budget" in s]


def funnel_html(manifest: dict[str, Any]) -> str:
    """Funnel table (step, in, out, top drop reasons) of a manifest."""
    rows = [(s["step"], s["rows_in"], s["rows_out"], nb.reasons(s.get("dropped") or {}))
            for s in manifest.get("steps", [])]
    return nb.table(["step", "in", "out", "dropped (top reasons)"], rows, raw_cols=(3,))


def run_html(run_dir: Path, manifest: dict[str, Any]) -> str:
    """The compact HTML summary of a run: counts, funnel, selector and budget, links to files."""
    rows = manifest.get("rows", {})
    recipe = manifest.get("recipe", {})
    sel = "; ".join(f"{nb.esc(s.get('name'))} ({nb.esc(s.get('use'))}, budget {nb.esc(s.get('budget'))})"
                    for s in selector_steps(manifest))
    lines = [
        f"curated <b>{rows.get('curated', '?')}</b> of {rows.get('input', '?')} rows; "
        f"rejected {rows.get('rejected', '?')}; seed {nb.esc(manifest.get('seed', recipe.get('seed')))}",
        f"selection: {sel}" if sel else "",
        funnel_html(manifest),
        "files: " + nb.links(run_dir / f for f in RUN_FILES),
    ]
    return nb.box(f"curate run {recipe.get('name', '')} · {run_dir}", lines)


@dataclass
class Run:
    """A finished run folder.

    Attributes:
        run_dir: the folder.
        manifest: ``manifest.json`` (recipe, inputs, funnel, counts).
    """

    run_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def curated_path(self) -> Path:
        return self.run_dir / "curated.parquet"

    @property
    def rejected_path(self) -> Path:
        return self.run_dir / "rejected.parquet"

    def curated(self) -> pl.DataFrame:
        """The curated rows (canonical columns and every step's columns)."""
        return pl.read_parquet(self.curated_path)

    def rejected(self) -> pl.DataFrame:
        """The rejected rows with the ``step`` and ``reason`` that dropped each."""
        return pl.read_parquet(self.rejected_path)

    def to_hf(self) -> Any:
        """``datasets.DatasetDict`` with splits ``curated`` and ``rejected`` (read through Arrow)."""
        datasets = require("datasets", "Run.to_hf()")
        import pyarrow.parquet as pq

        return datasets.DatasetDict({
            "curated": datasets.Dataset(pq.read_table(self.curated_path)),
            "rejected": datasets.Dataset(pq.read_table(self.rejected_path)),
        })

    def _repr_html_(self) -> str:
        return run_html(self.run_dir, self.manifest)


def load_run(run_dir: str | Path) -> Run:
    """The :class:`Run` in ``run_dir``.

    Raises:
        RecipeError: the folder holds no finished run (no ``manifest.json`` or no curated table), or a
            recipe run that is incomplete (no run-level DONE, or a run is writing it now).
    """
    run_dir = Path(run_dir)
    path = run_dir / "manifest.json"
    if (run_dir / "steps").is_dir() or (run_dir / "recipe.resolved.yaml").is_file():
        from curate.pipeline.rundir import load_finished

        return Run(run_dir, load_finished(run_dir))  # a recipe run: complete for its recipe, or refused
    if not path.is_file() or not (run_dir / "curated.parquet").is_file():
        raise RecipeError(f"{run_dir} is not a finished run folder (no manifest.json / curated.parquet).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: not valid JSON ({exc}).") from None
    return Run(run_dir, manifest)
