"""The local runner: ingest, run steps with per-step folders and DONE markers, write the outputs.

Run folder (docs/architecture.md)::

    <run_dir>/recipe.resolved.yaml
    <run_dir>/steps/00-ingest/{table.parquet, rejects.parquet, targets.parquet, stats.json, DONE}
    <run_dir>/steps/NN-<step>/{table.parquet, stats.json, DONE}   # table = uid + <step>__* columns
    <run_dir>/features/                                           # the run's FeatureStore
    <run_dir>/curated.parquet  rejected.parquet  manifest.json

Every step has a cache key: a hash of the previous key, the step's name, registered use and
parameters, and the seed. A step whose DONE marker carries the same key is loaded, not rerun; a
folder holding a different key is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from curate.errors import RecipeError
from curate.io.store import FeatureStore
from curate.io.writers import sha256_file, write_json, write_parquet, write_text
from curate.pipeline.executors import get_executor
from curate.pipeline.outcome import count_reasons, rejected_rows
from curate.pipeline.recipe import InputSpec, Recipe
from curate.pipeline.step import StepContext, check_step_output, step_params
from curate.report import write_report
from curate.schema import SCHEMA

INGEST = "00-ingest"


def curate_version() -> str:
    try:
        from importlib.metadata import version

        return version("curate")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. a source tree)
        return "0+unknown"


def git_commit() -> str | None:
    """The commit of the curate source tree, when it is a git checkout."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _read_done(folder: Path) -> str | None:
    done = folder / "DONE"
    if not done.exists():
        return None
    try:
        return json.loads(done.read_text()).get("key")
    except (OSError, json.JSONDecodeError):
        return None


def _prepare(folder: Path, key: str, overwrite: bool) -> bool:
    """True if ``folder`` already holds the result for ``key``; clears a stale folder."""
    found = _read_done(folder)
    if found == key:
        return True
    if found is not None and not overwrite:
        raise RecipeError(
            f"{folder} was made with a different recipe or input (cache key {found[:12]} != {key[:12]}). "
            "Pass --overwrite to recompute it, or choose another run folder with -o."
        )
    if found is not None and folder.exists():  # a finished result of another key: start over
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # An unfinished folder (a crash): drop its partial files but keep shards/, whose entries are
    # keyed by content and written atomically, so the rerun redoes only unfinished shards.
    for child in folder.iterdir():
        if child.name == "shards":
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return False


def _mark_done(folder: Path, key: str, stats: dict[str, Any]) -> None:
    write_json(stats, folder / "stats.json")
    write_json({"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, folder / "DONE")


@dataclass
class RunResult:
    run_dir: Path
    n_input: int
    n_curated: int
    n_rejected: int
    funnel: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "rows_in": self.n_input,
            "curated": self.n_curated,
            "rejected": self.n_rejected,
            "curated_path": str(self.run_dir / "curated.parquet"),
            "rejected_path": str(self.run_dir / "rejected.parquet"),
            "manifest_path": str(self.run_dir / "manifest.json"),
            "steps": [
                {k: s[k] for k in ("step", "rows_in", "rows_out", "cached", "seconds")} for s in self.funnel
            ],
        }


def _input_files(specs: list[InputSpec]) -> list[dict[str, Any]]:
    from curate.io import expand_inputs

    out = []
    for spec in specs:
        for f in expand_inputs([spec.path]):
            out.append({"path": str(f), "size": f.stat().st_size, "sha256": sha256_file(f), "format": spec.format,
                        "kind": spec.kind, "sample": spec.sample})
    return out


def _read(specs: list[InputSpec], on_error: str, progress: bool, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    from curate.io import read_sources
    from curate.schema import dedupe_uids

    tables, rejects = [], []
    for spec in specs:
        res = read_sources([spec.path], format=spec.format, kind=spec.kind, on_error=on_error, progress=progress)
        table = res.table
        if spec.sample is not None and spec.sample < table.height:
            from curate.pipeline.builtin import seeded_key

            keys = pl.Series([seeded_key(u, seed) for u in table["uid"].to_list()], dtype=pl.UInt64)
            keep = table.with_columns(keys.alias("_k")).sort(["_k", "uid"]).head(spec.sample)["uid"]
            table = table.filter(pl.col("uid").is_in(keep.implode()))
        tables.append(table)
        rejects.append(res.rejects)
    table = pl.concat(tables, how="vertical") if tables else pl.DataFrame(schema=SCHEMA)
    if len(tables) > 1:  # uids must stay unique across inputs (readers dedupe within one call)
        records = table.to_dicts()
        dedupe_uids(records)
        table = table.with_columns(pl.Series("uid", [r["uid"] for r in records], dtype=pl.Utf8))
    rej = pl.concat(rejects, how="diagonal_relaxed") if rejects else pl.DataFrame()
    return table, rej


def run_recipe(
    recipe: Recipe,
    *,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Any = None,
    executor: str | None = None,
) -> RunResult:
    """Run ``recipe`` and write its run folder. Returns counts, the funnel and the manifest.

    Args:
        run_dir: the run folder [default: ``<recipe output>/<name>/<recipe hash[:12]>``].
        overwrite: recompute steps whose folder holds another cache key instead of refusing.
        progress: show progress bars.
        log: a callable receiving log lines (they also go to ``run_dir/run.log``).
        executor: override the recipe's executor ("local", "ray", "ray:<address>").
    """
    started = time.time()
    try:
        executor_obj = get_executor(executor or recipe.executor, progress=progress)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    inputs = _input_files(recipe.inputs)
    targets_files = _input_files(recipe.targets)
    rhash = recipe.hash()
    run_dir = Path(run_dir) if run_dir is not None else Path(recipe.output) / recipe.name / rhash[:12]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(run_dir / "run.log", "a", encoding="utf-8")  # noqa: SIM115 - closed at the end

    def say(msg: str) -> None:
        log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        log_file.flush()
        if log is not None:
            log(msg)

    try:
        return _run(recipe, run_dir, rhash, inputs, targets_files, overwrite, progress, executor_obj, say, started)
    finally:
        log_file.close()


def _run(recipe: Recipe, run_dir: Path, rhash: str, inputs: list[dict[str, Any]], targets_files: list[dict[str, Any]],
         overwrite: bool, progress: bool, executor: Any, say: Any, started: float) -> RunResult:
    for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob("features/.*")]:  # temp files of a crashed run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False), run_dir / "recipe.resolved.yaml")

    # ---- ingest
    key = _hash("ingest", [(f["sha256"], f["format"], f["kind"], f["sample"]) for f in inputs],
                [(f["sha256"], f["format"], f["kind"], f["sample"]) for f in targets_files], recipe.on_error, recipe.seed)
    folder = run_dir / "steps" / INGEST
    t0 = time.time()
    cached = _prepare(folder, key, overwrite)
    if cached:
        table = pl.read_parquet(folder / "table.parquet")
        ingest_rejects = pl.read_parquet(folder / "rejects.parquet")
        targets = pl.read_parquet(folder / "targets.parquet") if (folder / "targets.parquet").exists() else None
        say(f"[00] ingest: cached ({table.height} rows)")
    else:
        say(f"[00] ingest: reading {len(inputs)} file(s)")
        table, ingest_rejects = _read(recipe.inputs, recipe.on_error, progress, recipe.seed)
        targets = None
        if recipe.targets:
            targets, _ = _read(recipe.targets, recipe.on_error, progress, recipe.seed)
            write_parquet(targets, folder / "targets.parquet")
        write_parquet(table, folder / "table.parquet")
        write_parquet(ingest_rejects, folder / "rejects.parquet")
        _mark_done(folder, key, {"step": "ingest", "rows_out": table.height, "rejected": ingest_rejects.height,
                                 "targets": 0 if targets is None else targets.height})
    funnel: list[dict[str, Any]] = [{
        "step": "ingest", "use": "ingest", "rows_in": table.height + ingest_rejects.height, "rows_out": table.height,
        "dropped": count_reasons(ingest_rejects["reason"].to_list() if ingest_rejects.height else []),
        "cached": cached, "seconds": round(time.time() - t0, 3), "key": key,
    }]

    # ---- steps
    store = FeatureStore(run_dir / "features")
    alive = pl.Series("alive", [True] * table.height)
    for i, spec in enumerate(recipe.steps, start=1):
        key = _hash(key, spec.name, spec.use, step_params(spec.step), recipe.seed)
        folder = run_dir / "steps" / f"{i:02d}-{spec.name}"
        t0 = time.time()
        rows_in = int(alive.sum())
        cached = _prepare(folder, key, overwrite)
        if cached:
            out = pl.read_parquet(folder / "table.parquet")
            say(f"[{i:02d}] {spec.name}: cached")
        else:
            say(f"[{i:02d}] {spec.name} ({spec.use}) on {rows_in} rows")
            ctx = StepContext(
                seed=recipe.seed, features=store, targets=targets, step_dir=folder,
                device=recipe.device, progress=progress, executor=executor,
            )
            current = table.filter(alive)
            result = check_step_output(spec.name, current, spec.step.apply(current, ctx))
            out = result.rename({c: f"{spec.name}__{c}" for c in result.columns if c != "uid"})
            write_parquet(out, folder / "table.parquet")
            kept = int(out[f"{spec.name}__keep"].sum())
            _mark_done(folder, key, {
                "step": spec.name, "use": spec.use, "params": step_params(spec.step), "rows_in": rows_in,
                "rows_out": kept, "dropped": count_reasons(
                    out.filter(~pl.col(f"{spec.name}__keep"))[f"{spec.name}__reason"].to_list()),
                "seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb(), **ctx.stats,
            })
        table = table.join(out, on="uid", how="left", maintain_order="left")
        alive = alive & table[f"{spec.name}__keep"].fill_null(False)
        stats = json.loads((folder / "stats.json").read_text())
        funnel.append({
            "step": spec.name, "use": spec.use, "rows_in": rows_in, "rows_out": int(alive.sum()),
            "dropped": stats.get("dropped", {}), "cached": cached, "peak_rss_mb": stats.get("peak_rss_mb"),
            "seconds": stats.get("seconds", 0.0) if not cached else round(time.time() - t0, 3), "key": key,
        })

    # ---- outputs
    curated = table.filter(alive)
    rejected = rejected_rows(table, alive, ingest_rejects)
    write_parquet(curated, run_dir / "curated.parquet")
    write_parquet(rejected, run_dir / "rejected.parquet")
    selected_hash = hashlib.blake2b("\n".join(sorted(curated["uid"].to_list())).encode(), digest_size=16).hexdigest()
    manifest = {
        "curate_version": curate_version(),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe.resolved(),
        "recipe_source": recipe.source,
        "recipe_hash": rhash,
        "seed": recipe.seed,
        "inputs": inputs,
        "targets": targets_files,
        "steps": funnel,
        "rows": {"input": funnel[0]["rows_in"], "curated": curated.height, "rejected": rejected.height},
        "selected_uids_hash": selected_hash,
        "seconds": round(time.time() - started, 3),
    }
    write_json(manifest, run_dir / "manifest.json")
    _write_report(run_dir, say)
    return RunResult(run_dir, funnel[0]["rows_in"], curated.height, rejected.height, funnel, manifest)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_report(run_dir: Path, say: Any) -> None:
    """Write ``report.html``; a report that fails is logged and never fails the finished run."""
    try:
        write_report(run_dir, run_dir / "report.html")
    except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
        say(f"report: not written ({type(exc).__name__}: {exc})")


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished run (for ``curate show``)."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        raise RecipeError(f"{run_dir} is not a finished run folder (no manifest.json).")
    return json.loads(path.read_text())
