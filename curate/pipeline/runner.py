"""The local runner: ingest, run steps with per-step folders and DONE markers, write the outputs.

Run folder (docs/architecture.md)::

    <run_dir>/recipe.resolved.yaml
    <run_dir>/steps/00-ingest/{table.parquet, rejects.parquet, targets.parquet, stats.json, DONE}
    <run_dir>/steps/NN-<step>/{table.parquet, stats.json, DONE}   # table = uid + <step>__* columns
    <run_dir>/features/                                           # the run's FeatureStore
    <run_dir>/curated.parquet  rejected.parquet  manifest.json  report.html
    <run_dir>/DONE                                                # written last (pipeline/rundir.py)

Every step has a cache key: a hash of the previous key, the step's name, registered use and
parameters, and the seed; a parameter naming an existing file or folder (criteria, pairs, factors,
checkpoints, target files) enters by content, not by path (:func:`curate.io.paths.content_params`);
an output parameter enters as a path, except a path the step reuses when it exists (a saved index,
``reused_params``), which is keyed by its content as the step left it. When a selector step reports a
token count, manifest.json carries it as ``tokens`` (curated tokens, tokenizer, ``approximate``).
A step whose DONE marker carries the same key is loaded, not rerun; a folder holding a different
key is refused unless ``overwrite=True``. A run holds the folder's lock throughout, and removes the
run-level DONE and the old final outputs before it changes anything (pipeline/rundir.py).
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
from curate.io.paths import OUTPUT_PARAMS, content_params
from curate.io.plugins import code_key
from curate.io.store import FeatureStore
from curate.io.writers import write_json, write_parquet, write_text
from curate.pipeline.executors import get_executor
from curate.pipeline.outcome import count_reasons, write_outcome
from curate.pipeline.recipe import InputSpec, Recipe
from curate.pipeline.rundir import invalidate_outputs, load_finished, mark_run_done, run_lock
from curate.pipeline.step import StepContext, check_step_output, step_params
from curate.report import write_report
from curate.schema import SCHEMA

INGEST = "00-ingest"
# stats.json keys that the funnel entry already has, or that the manifest keeps elsewhere
_FUNNEL_SKIP = frozenset({"step", "use", "params", "rows_in", "rows_out", "dropped", "seconds", "peak_rss_mb",
                          "selection"})


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


def _prepare(folder: Path, key: str, overwrite: bool, before_change: Any = None) -> bool:
    """True if ``folder`` already holds the result for ``key``; clears a stale folder (calling
    ``before_change()`` first, once it is decided that the folder will change)."""
    found = _read_done(folder)
    if found == key:
        return True
    if found is not None and not overwrite:
        raise RecipeError(
            f"{folder} was made with a different recipe or input (cache key {found[:12]} != {key[:12]}). "
            "Pass --overwrite to recompute it, or choose another run folder with -o."
        )
    if before_change is not None:
        before_change()
    if found is not None and folder.exists():  # a finished result of another key: start over
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # An unfinished folder (a crash): drop its partial files but keep shards/, whose entries are
    # keyed by content and written atomically, so the rerun redoes only unfinished shards.
    for child in folder.iterdir():
        if child.name == "shards":
            for tmp in child.glob(".*.tmp"):  # a shard killed before its rename
                tmp.unlink()
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

    def _repr_html_(self) -> str:
        """Compact notebook summary: funnel, drop reasons, selector and budget, links to files."""
        from curate.pipeline.results import run_html

        return run_html(self.run_dir, self.manifest)

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
    # files, URIs, save_to_disk folders, hub datasets, in-memory data: one manifest entry each file
    from curate.io.inputs import describe_inputs

    return describe_inputs(specs)


def _extra_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    """Key parts of an input beyond its bytes (a field map, a split); empty for plain files so
    their ingest keys stay what they were."""
    return tuple((k, entry[k]) for k in ("map", "split", "config") if entry.get(k) is not None)


def _read(specs: list[InputSpec], on_error: str, progress: bool, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    from curate.io.inputs import read_input
    from curate.io.sources import unique_uids

    tables, rejects = [], []
    for spec in specs:
        res = read_input(spec, on_error=on_error, progress=progress)
        table = res.table
        if spec.sample is not None and spec.sample < table.height:
            from curate.pipeline.builtin import seeded_key

            keys = pl.Series([seeded_key(u, seed) for u in table["uid"].to_list()], dtype=pl.UInt64)
            keep = table.with_columns(keys.alias("_k")).sort(["_k", "uid"]).head(spec.sample)["uid"]
            table = table.filter(pl.col("uid").is_in(keep.implode()))
        tables.append(table)
        rejects.append(res.rejects)
    same = len({tuple(t.columns) for t in tables}) <= 1  # canonical tables may carry step columns
    table = pl.concat(tables, how="vertical" if same else "diagonal_relaxed") if tables else pl.DataFrame(schema=SCHEMA)
    if len(tables) > 1:  # uids must stay unique across inputs (readers dedupe within one call)
        records = table.to_dicts()
        unique_uids(records)  # from content hashes, so repeats renamed per input cannot collide
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
    extra: dict[str, Any] | None = None,
) -> RunResult:
    """Run ``recipe`` and write its run folder. Returns counts, the funnel and the manifest.

    Args:
        run_dir: the run folder [default: ``<recipe output>/<name>/<recipe hash[:12]>``].
        overwrite: recompute steps whose folder holds another cache key instead of refusing.
        progress: show progress bars.
        log: a callable receiving log lines (they also go to ``run_dir/run.log``).
        executor: override the recipe's executor ("local", "ray", "ray:<address>").
        extra: keys put first in manifest.json (a verb's ``command``).
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
    # The lock comes before run.log is opened: a refused run writes nothing into the folder.
    with run_lock(run_dir), open(run_dir / "run.log", "a", encoding="utf-8") as log_file:

        def say(msg: str) -> None:
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            log_file.flush()
            if log is not None:
                log(msg)

        try:
            return _run(recipe, run_dir, rhash, inputs, targets_files, overwrite, progress, executor_obj, say, started,
                        extra)
        except BaseException as exc:  # the folder's own record of why it is incomplete
            say(f"error: {type(exc).__name__}: {exc}")
            raise


def _run(recipe: Recipe, run_dir: Path, rhash: str, inputs: list[dict[str, Any]], targets_files: list[dict[str, Any]],
         overwrite: bool, progress: bool, executor: Any, say: Any, started: float,
         extra: dict[str, Any] | None = None) -> RunResult:
    for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob("features/.*")]:  # temp files of a crashed run
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    changed = False

    def before_change() -> None:
        """Once per run, before the first change: uncertify the old outputs, then record the recipe.
        A run refused for a different cache key never gets here and leaves the folder as it was."""
        nonlocal changed
        if not changed:
            invalidate_outputs(run_dir)
            write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False), run_dir / "recipe.resolved.yaml")
            changed = True

    # ---- ingest
    key = _hash("ingest", [(f["sha256"], f["format"], f["kind"], f["sample"], *_extra_key(f)) for f in inputs],
                [(f["sha256"], f["format"], f["kind"], f["sample"], *_extra_key(f)) for f in targets_files],
                recipe.on_error, recipe.seed)
    folder = run_dir / "steps" / INGEST
    t0 = time.time()
    cached = _prepare(folder, key, overwrite, before_change)
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
    step_stats: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(recipe.steps, start=1):
        prev_key = key
        # Keyed when the step starts, so a file an earlier step of this run wrote enters by its new content.
        key = _step_key(prev_key, spec, recipe.seed)
        folder = run_dir / "steps" / f"{i:02d}-{spec.name}"
        t0 = time.time()
        rows_in = int(alive.sum())
        cached = _prepare(folder, key, overwrite, before_change)
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
            if reused_params(spec.step):  # keyed by what the reused path holds now that the step wrote it
                key = _step_key(prev_key, spec, recipe.seed)
            kept = int(out[f"{spec.name}__keep"].sum())
            _mark_done(folder, key, {
                "step": spec.name, "use": spec.use, "params": step_params(spec.step), "rows_in": rows_in,
                "rows_out": kept, "dropped": count_reasons(
                    out.filter(~pl.col(f"{spec.name}__keep"))[f"{spec.name}__reason"].to_list()),
                "seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb(), **ctx.stats,
            })
        table = table.join(out, on="uid", how="left", maintain_order="left")
        alive = alive & table[f"{spec.name}__keep"].fill_null(False)
        stats = step_stats[spec.name] = json.loads((folder / "stats.json").read_text())
        funnel.append({
            "step": spec.name, "use": spec.use, "rows_in": rows_in, "rows_out": int(alive.sum()),
            "dropped": stats.get("dropped", {}), "cached": cached, "peak_rss_mb": stats.get("peak_rss_mb"),
            "seconds": stats.get("seconds", 0.0) if not cached else round(time.time() - t0, 3), "key": key,
            **{k: v for k, v in stats.items() if k not in _FUNNEL_SKIP},  # the step's own stats (pii counts ...)
        })

    # ---- outputs
    before_change()
    sel_step = _selection_step(recipe, step_stats)
    manifest = {
        **(extra or {}),
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
        "rows": {"input": funnel[0]["rows_in"]},
        **({"selection": _selection_block(sel_step, step_stats)} if sel_step else {}),
        **({"tokens": tokens} if (tokens := _tokens_block(recipe, step_stats)) else {}),
        "seconds": round(time.time() - started, 3),
    }
    manifest = write_outcome(run_dir, table, alive, ingest_rejects, manifest, selection_step=sel_step,
                             steps=[spec.step for spec in recipe.steps])
    _write_report(run_dir, say)
    mark_run_done(run_dir, rhash)
    rows = manifest["rows"]
    return RunResult(run_dir, rows["input"], rows["curated"], rows["rejected"], funnel, manifest)


def _selection_step(recipe: Recipe, step_stats: dict[str, dict[str, Any]]) -> str | None:
    """The last step that reported a selection (a selector step), or None."""
    for spec in reversed(recipe.steps):
        if "selection" in (step_stats.get(spec.name) or {}):
            return spec.name
    return None


def _selection_block(step: str, step_stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``selection``: the selector step, its method, parameters, budget, rows kept,
    feature sets and diagnostics (from its stats.json)."""
    stats = step_stats[step]
    sel = stats["selection"]
    return {"step": step, "selector": stats.get("use"), "n_rows": stats.get("rows_in"),
            "n_kept": stats.get("rows_out"), **sel}


def reused_params(step: Any) -> tuple[str, ...]:
    """Parameters of ``step`` naming a path it reads when it exists and writes otherwise (a saved
    index): the class attribute ``reused_params``, a subset of :data:`curate.io.paths.OUTPUT_PARAMS`."""
    return tuple(getattr(type(step), "reused_params", ()))


def _step_key(prev_key: str, spec: Any, seed: int) -> str:
    """The cache key of a recipe step: the previous key, name, use, parameters (files by content),
    seed and a plugin step's code hash.

    Output parameters enter as paths, except the step's :func:`reused_params`: those enter by
    content when they exist. The runner keys such a step again once it has run and records that
    key, so a rerun that finds the path as the step left it is cached, while a path that already
    existed (a prebuilt index used as input) or was changed since keys by its bytes.
    """
    skip = OUTPUT_PARAMS - frozenset(reused_params(spec.step))
    return _hash(prev_key, spec.name, spec.use, content_params(step_params(spec.step), skip=skip), seed,
                 *code_key(spec.step))  # a plugin step's file hash: edited code is recomputed


def _tokens_block(recipe: Recipe, step_stats: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The token block of the last selector step that reported one (``selection.diagnostics.tokens``
    in its stats.json): the curated token count, the column counted, whether it is the whitespace
    word estimate (``approximate``) and the tokenizer, taken from the stats of the step that wrote the
    counted column (``count_tokens``), else ``counted (<column>)``, None when approximate."""
    for spec in reversed(recipe.steps):
        stats = step_stats.get(spec.name) or {}
        tok = ((stats.get("selection") or {}).get("diagnostics") or {}).get("tokens")
        if not tok:
            continue
        block = {**tok, "step": spec.name}
        col = str(tok.get("counted_by") or "")
        producer, _, _ = col.rpartition("__")
        info = (step_stats.get(producer) or {}).get("tokens") if producer else None
        if tok.get("approximate"):
            block["tokenizer"] = None
        elif isinstance(info, dict) and info.get("tokenizer"):
            block["tokenizer"] = info["tokenizer"]
        else:
            block["tokenizer"] = f"counted ({col})"
        return block
    return None


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
    """The manifest of a finished run (for ``curate show``); RecipeError naming why for a folder
    that is incomplete, being written, or not a run folder (:func:`curate.pipeline.rundir.load_finished`)."""
    return load_finished(run_dir)
