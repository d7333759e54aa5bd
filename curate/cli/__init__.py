"""The ``curate`` command line.

Every verb takes ``--json`` and then prints one JSON object summarising what it did as the last
line of stdout. Exit codes: 0 success, 2 bad input or usage, 1 internal error.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from curate.cli._common import emit, json_option, plugin_option, quiet_option
from curate.errors import MissingDependencyError, MissingFeatureError, ParameterError, RecipeError, SchemaError

USER_ERRORS = (SchemaError, RecipeError, ParameterError, MissingFeatureError, MissingDependencyError,
               FileNotFoundError, NotADirectoryError, IsADirectoryError)


# errno values that are the user's or the machine's doing (permissions, a full disk, a file where a
# folder should be), never a bug: exit 2 with what to fix, not "internal error".
_OS_USER_ERRNOS = {
    errno.EACCES: "permission denied; choose a writable place or fix its permissions",
    errno.EPERM: "operation not permitted; choose a writable place or fix its permissions",
    errno.EROFS: "read-only file system; choose a writable place",
    errno.ENOSPC: "no space left on the device; free space and rerun (no output was left half-written)",
    errno.EDQUOT: "disk quota exceeded; free space and rerun (no output was left half-written)",
    errno.EFBIG: "file too large for this file system",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "a folder is where a file should be",
    errno.EEXIST: "a file is in the way (a folder was expected there)",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
}


def os_error_message(exc: BaseException) -> str | None:
    """A clear message for an OS-level failure that the user or the machine caused (see
    ``_OS_USER_ERRNOS``), or None when ``exc`` is not one. Polars reports write failures as its
    own exception types carrying ``(os error N)``; those are recognised too."""
    code: int | None = None
    where: str | None = None
    if isinstance(exc, OSError) and exc.errno in _OS_USER_ERRNOS:
        code, where = exc.errno, exc.filename
    elif type(exc).__module__.split(".")[0] == "polars":
        m = re.search(r"\(os error (\d+)\)", str(exc))
        if m and int(m.group(1)) in _OS_USER_ERRNOS:
            code = int(m.group(1))
    if code is None:
        return None
    place = f"'{where}'" if where is not None else "an output file"
    return f"{os.strerror(code)}: {place}: {_OS_USER_ERRNOS[code]}."


def _progress_on(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


_emit = emit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="curate", message="curate %(version)s")
def cli() -> None:
    """curate: turn a pool of instruction data or preference pairs into a smaller, better subset,
    and know why each row was kept or dropped."""


# --------------------------------------------------------------------------- ingest
@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output parquet file.")
@click.option("--format", "fmt", default="auto", show_default=True, help="Source format (see `curate list`).")
@click.option("--kind", type=click.Choice(["sft", "preference", "target"]), default=None, help="Force the row kind.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at the first malformed record; skip: write it to the rejected file and go on.")
@click.option("--rejected", "rejected_path", type=click.Path(dir_okay=False), default=None,
              help="Where rejected/reported records go [default: OUTPUT with .rejected.parquet].")
@click.option("--map", "field_map", multiple=True, metavar="TARGET=SOURCE",
              help="Read source field SOURCE as TARGET, e.g. --map prompt=question --map response=answer (repeatable).")
@json_option
@quiet_option
def ingest(inputs: tuple[str, ...], output: str, fmt: str, kind: str | None, on_error: str,
           rejected_path: str | None, field_map: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Read INPUT files, folders or globs into one canonical parquet table."""
    from curate.io import read_sources
    from curate.io.writers import write_parquet
    from curate.pipeline.outcome import reason_category

    res = read_sources(list(inputs), format=fmt, kind=kind, on_error=on_error, progress=_progress_on(quiet),
                       map=list(field_map) or None)
    out = Path(output)
    write_parquet(res.table, out)
    rej_path = Path(rejected_path) if rejected_path else out.with_name(out.name.removesuffix(".parquet") + ".rejected.parquet")
    if res.rejects.height:
        write_parquet(res.rejects, rej_path)
    elif rej_path.is_file():  # a rejected file from an earlier read would be taken for this one's
        rej_path.unlink()
    kinds = res.table["kind"].value_counts(sort=True).rows() if res.table.height else []
    kind_counts = {k: int(n) for k, n in kinds}
    reasons: dict[str, int] = {}
    for r in res.rejects["reason"].to_list() if res.rejects.height else []:
        c = reason_category(r)
        reasons[c] = reasons.get(c, 0) + 1
    summary = {
        "command": "ingest",
        "output": str(out),
        "rows": res.table.height,
        "kind": next(iter(kind_counts)) if len(kind_counts) == 1 else ("mixed" if kind_counts else None),
        "kinds": kind_counts,
        "rejected": res.rejects.height,
        "rejected_reasons": reasons,
        "rejected_path": str(rej_path) if res.rejects.height else None,
        "formats": res.formats,
        "files": len(res.files),
    }

    def human() -> None:
        click.echo(f"wrote {res.table.height} rows to {out} ({', '.join(f'{k}: {n}' for k, n in kind_counts.items())})")
        for f, name in res.formats.items():
            click.echo(f"  {f}: {name}")
        if res.rejects.height:
            click.echo(f"{res.rejects.height} records rejected or reported -> {rej_path}")
            for r, n in reasons.items():
                click.echo(f"  {n:6d}  {r}")

    _emit(as_json, summary, human)


# --------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("-n", "n_rows", default=3, show_default=True, help="How many rows to show.")
@json_option
def inspect(file: str, n_rows: int, as_json: bool) -> None:
    """Show the schema, kinds, counts and a few rows of a parquet table."""
    import polars as pl

    try:
        table = pl.read_parquet(file)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for bad files
        raise SchemaError(f"cannot read parquet: {exc}", file=file) from None
    kinds = dict(table["kind"].value_counts().rows()) if "kind" in table.columns else {}
    steps = [c[:-6] for c in table.columns if c.endswith("__keep")]
    summary = {
        "command": "inspect", "file": file, "rows": table.height,
        "columns": {c: str(t) for c, t in table.schema.items()}, "kinds": {k: int(v) for k, v in kinds.items()},
        "steps": steps,
    }

    def human() -> None:
        click.echo(f"{file}: {table.height} rows, {table.width} columns")
        for c, t in table.schema.items():
            click.echo(f"  {c:24s} {t}")
        if kinds:
            click.echo("kinds: " + ", ".join(f"{k}={v}" for k, v in kinds.items()))
        with pl.Config(fmt_str_lengths=60, tbl_width_chars=140, tbl_cols=8):
            click.echo(table.head(n_rows))

    _emit(as_json, summary, human)


# --------------------------------------------------------------------------- run / validate / show
@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: <recipe output>/<name>/<recipe hash>].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set steps.select.budget=0.1 (repeatable).")
@click.option("--overwrite", is_flag=True, help="Recompute steps whose folder holds another cache key.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="Where parallel work runs [default: the recipe's executor].")
@click.option("--ray-address", default=None, metavar="ADDR", help="Address of a running Ray cluster (implies --executor ray).")
@plugin_option
@json_option
@quiet_option
def run(recipe: str, run_dir: str | None, overrides: tuple[str, ...], overwrite: bool, executor: str | None,
        ray_address: str | None, plugins: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Run a YAML RECIPE and write its run folder."""
    from curate.pipeline.recipe import load_recipe
    from curate.pipeline.runner import run_recipe

    rec = load_recipe(recipe, list(overrides), plugins=list(plugins))
    log = None if quiet or as_json else (lambda m: click.echo(m, err=True))
    if ray_address:
        if executor == "local":
            raise RecipeError("--ray-address needs --executor ray (or no --executor).")
        executor = f"ray:{ray_address}"
    res = run_recipe(rec, run_dir=run_dir, overwrite=overwrite, progress=_progress_on(quiet), log=log, executor=executor)
    summary = {"command": "run", **res.summary()}

    def human() -> None:
        _print_funnel(res.manifest)
        click.echo(f"run folder: {res.run_dir}")

    _emit(as_json, summary, human)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@plugin_option
@json_option
def validate(recipe: str, overrides: tuple[str, ...], plugins: tuple[str, ...], as_json: bool) -> None:
    """Check a RECIPE (keys, steps, parameters, inputs) without running it."""
    from curate.io.inputs import count_files
    from curate.pipeline.recipe import load_recipe

    rec = load_recipe(recipe, list(overrides), plugins=list(plugins))
    files = range(sum(count_files(spec) for spec in rec.inputs + rec.targets))  # local files only: no download
    summary = {"command": "validate", "recipe": recipe, "valid": True, "name": rec.name, "hash": rec.hash(),
               "steps": [s.name for s in rec.steps], "files": len(files)}

    def human() -> None:
        click.echo(f"{recipe}: valid ({len(rec.steps)} steps: {', '.join(s.name for s in rec.steps)}; {len(files)} input files)")

    _emit(as_json, summary, human)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@json_option
def show(run_dir: str, as_json: bool) -> None:
    """Print the per-step funnel of a finished RUN_DIR."""
    from curate.pipeline.runner import load_run

    manifest = load_run(run_dir)
    summary = {"command": "show", "run_dir": run_dir, "rows": manifest["rows"],
               "steps": [{k: s[k] for k in ("step", "rows_in", "rows_out", "dropped")} for s in manifest["steps"]]}
    _emit(as_json, summary, lambda: _print_funnel(manifest))


def _print_funnel(manifest: dict[str, Any]) -> None:
    click.echo(f"{'step':28s} {'in':>8s} {'out':>8s} {'dropped':>8s}  seconds")
    for s in manifest["steps"]:
        dropped = s["rows_in"] - s["rows_out"]
        tag = " (cached)" if s.get("cached") else ""
        click.echo(f"{s['step']:28s} {s['rows_in']:8d} {s['rows_out']:8d} {dropped:8d}  {s.get('seconds', 0):.2f}{tag}")
        for reason, n in list(s.get("dropped", {}).items())[:5]:
            click.echo(f"{'':30s}{n:6d}  {reason[:90]}")
    rows = manifest["rows"]
    click.echo(f"curated {rows['curated']} of {rows['input']} rows; rejected {rows['rejected']}")


# --------------------------------------------------------------------------- select
@cli.command()
@click.argument("name")
@click.argument("input_path", metavar="IN.parquet", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--budget", required=True, help="0.1 (fraction), 500 (rows) or tokens:2e6.")
@click.option("--by", default=None, help="Stratify the budget by this column (source, task, language, ...).")
@click.option("--ratio", "ratios", multiple=True, metavar="GROUP=SHARE", help="Exact share of a --by group (repeatable).")
@click.option("--min", "mins", multiple=True, metavar="GROUP=SHARE", help="Floor of a --by group; * = every group.")
@click.option("--max", "maxs", multiple=True, metavar="GROUP=SHARE", help="Cap of a --by group; * = every group.")
@click.option("--overshoot", is_flag=True, help="A tokens budget keeps the row that crosses it.")
@click.option("--tokenizer", default=None, help="Count tokens with this tokenizer folder ('default': packaged SmolLM2).")
@click.option("--features", type=click.Path(exists=True, file_okay=False), default=None,
              help="A feature-set folder (or a feature store) for the pool roles.")
@click.option("--target-features", type=click.Path(exists=True, file_okay=False), default=None,
              help="A feature-set folder (or store) for the target roles.")
@click.option("--target", type=click.Path(exists=True, dir_okay=False), default=None, help="Target table (parquet).")
@click.option("--scores", type=click.Path(exists=True, file_okay=False), default=None,
              help="An influence score matrix folder (curate influence score).")
@click.option("--factors", type=click.Path(exists=True, file_okay=False), default=None,
              help="EK-FAC factors folder (curate influence fit), for selectors with a 'factors' parameter (quad).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A selector parameter (repeatable).")
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
def select(name: str, input_path: str, out_dir: str, budget: str, by: str | None, ratios: tuple[str, ...],
           mins: tuple[str, ...], maxs: tuple[str, ...], overshoot: bool, tokenizer: str | None, features: str | None,
           target_features: str | None, target: str | None, scores: str | None, factors: str | None,
           params: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Run selector NAME on IN.parquet: curated, rejected and selection parquet plus a manifest in OUT_DIR."""
    import dataclasses

    from curate.selectors import get_selector
    from curate.selectors.run import parse_budget, parse_params, select_files

    n_pool = _check_parquet(input_path, "the pool")
    if n_pool == 0:
        raise SchemaError("the pool is empty.", file=input_path, expected="at least one row", found="0 rows")
    if target is not None:
        _check_parquet(target, "the target table")
    _check_budget(budget, n_pool)
    values = parse_params(list(params))
    if factors is not None:
        cls = get_selector(name)
        if "factors" not in {f.name for f in dataclasses.fields(cls)}:
            raise RecipeError(f"--factors: selector '{name}' takes no EK-FAC factors.")
        values.setdefault("factors", factors)
    bud = parse_budget(budget, by=by, ratios=ratios, mins=mins, maxs=maxs, overshoot=overshoot)
    manifest = select_files(name, input_path, out_dir, budget=bud, features=features, target_features=target_features,
                            target=target, scores=scores, params=values, seed=seed, tokenizer=tokenizer)
    sel = manifest["selection"]
    summary = {"command": "select", "selector": name, "output": out_dir, "rows": sel["n_rows"],
               "kept": sel["n_kept"], "budget": sel["budget"]}

    def human() -> None:
        click.echo(f"{name}: kept {sel['n_kept']} of {sel['n_rows']} rows -> {out_dir}")

    _emit(as_json, summary, human)


def _check_parquet(path: str, what: str) -> int:
    """Rows of the parquet file ``path``; a file that is not parquet is a :class:`SchemaError`."""
    import polars as pl

    try:
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())
    except Exception as exc:  # noqa: BLE001 - polars raises several types for a file that is not parquet
        if os_error_message(exc) is not None:
            raise
        raise SchemaError(f"{what} is not a readable parquet file.", file=path,
                          expected="a parquet table (as `curate ingest` writes)",
                          found=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from None


def _check_budget(budget: str, n_pool: int) -> None:
    """Refuse a budget that is not finite or that selects no row of an ``n_pool``-row pool."""
    from curate.selectors.base import Budget

    try:
        bud = Budget.parse(budget)
    except (ValueError, OverflowError) as exc:
        raise ParameterError(f"--budget {budget!r}: {exc}") from None
    if bud.tokens is None and bud.rows(n_pool) == 0:
        raise ParameterError(f"--budget {budget} selects 0 of the pool's {n_pool} rows. Give a fraction of at "
                             f"least {1 / n_pool:.3g} or a row count >= 1.")


# --------------------------------------------------------------------------- list
@cli.command(name="list")
@click.argument("what", required=False, type=click.Choice(["steps", "formats", "selectors"]))
@plugin_option
@json_option
def list_(what: str | None, plugins: tuple[str, ...], as_json: bool) -> None:
    """List registered steps, input formats and selectors (or only WHAT) with their parameters."""
    import dataclasses

    from curate.io import FORMATS
    from curate.io.plugins import load_format_plugins
    from curate.pipeline.plugins import load_plugins
    from curate.pipeline.registry import describe_steps
    from curate.selectors import SELECTORS

    load_plugins(list(plugins), Path.cwd(), where="--plugin")
    load_format_plugins()

    steps = describe_steps()
    formats = {name: _describe_format(info) for name, info in FORMATS.items()}
    selectors: dict[str, Any] = {}
    for name, cls in sorted(SELECTORS.items()):
        params = {}
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else "<required>"
                params[f.name] = default
        doc = (cls.__doc__ or "").strip().splitlines()
        selectors[name] = {"doc": doc[0] if doc else "", "params": params, "requires": list(getattr(cls, "requires", ()))}
    summary = {"command": "list", "steps": steps, "formats": formats, "selectors": selectors}
    if what:
        summary = {"command": "list", what: summary[what]}
        steps = steps if what == "steps" else {}
        formats = formats if what == "formats" else {}
        selectors = selectors if what == "selectors" else {}

    def human() -> None:
        if steps:
            click.echo("steps:")
        for name, d in steps.items():
            tag = f" [plugin {d['plugin']}]" if d.get("plugin") else ""
            click.echo(f"  {name:22s} {d['doc']}{tag}")
            if d["params"]:
                click.echo(f"  {'':22s} params: {', '.join(f'{k}={v!r}' for k, v in d['params'].items())}")
        if formats:
            click.echo("formats:")
        for name, d in formats.items():
            click.echo(f"  {name:22s} {d.get('description', '')}")
        if selectors:
            click.echo("selectors:")
            for name, d in selectors.items():
                click.echo(f"  {name:22s} {d['doc']}")
                click.echo(f"  {'':22s} requires: {d['requires']}; params: {', '.join(f'{k}={v!r}' for k, v in d['params'].items())}")

    _emit(as_json, summary, human)


def _describe_format(info: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(info):
        return {k: v for k, v in dataclasses.asdict(info).items() if not callable(v)}
    if isinstance(info, dict):
        return {k: v for k, v in info.items() if not callable(v)}
    return {"description": str(info)}


# The verbs that live with their stage. Each module exports COMMANDS; its verbs are listed here as
# well so that a verb whose optional extra is not installed still shows in --help and, when run,
# says which extra to install.
VERB_MODULES: dict[str, tuple[str, ...]] = {
    "curate.cli.curation": ("dedup", "decontam", "filter", "pii"),
    "curate.cli.features": ("embed", "gradients", "warmup", "whiten"),
    "curate.cli.influence": ("influence",),
    "curate.cli.preference": ("ches", "diagnose", "curriculum", "export"),
    "curate.cli.critiq": ("judge", "critiq"),
    "curate.cli.report": ("report",),
    "curate.selectors.mix": ("mix",),
    "curate.publish": ("push", "card"),
}


def _missing_extra(exc: ImportError) -> str | None:
    """The extra of curate whose absence ``exc`` reports: a ``MissingDependencyError``, or a
    ``ModuleNotFoundError`` for a package that an extra brings and that is not installed (a missing
    submodule of an installed package is a bug, not a missing extra). None for anything else."""
    import importlib.util

    from curate._lazy import extra_for

    if not isinstance(exc, (MissingDependencyError, ModuleNotFoundError)) or not exc.name:
        return None
    if isinstance(exc, ModuleNotFoundError):
        top = exc.name.split(".")[0]
        try:
            if importlib.util.find_spec(top) is not None:
                return None
        except (ImportError, ValueError):  # ValueError: a module that is None in sys.modules
            pass
    return extra_for(exc.name)


def _needs_extra(verb: str, extra: str, exc: ImportError) -> click.Command:
    """A stand-in for ``verb`` that fails with the install hint instead of running."""
    hint = f"pip install 'curate[{extra}]'"

    def callback() -> None:
        raise MissingDependencyError(f"`curate {verb}` needs the '{extra}' extra ({exc}): {hint}.")

    return click.Command(verb, callback=callback, help=f"Needs the '{extra}' extra: {hint}.",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


def attach_verbs(group: click.Group, modules: dict[str, tuple[str, ...]]) -> None:
    """Add the verbs of each module to ``group``.

    A module that fails to import raises here, naming it, so a broken import cannot silently remove
    verbs; the one exception is a missing optional extra (``curate[judge]``, ``curate[ml]``), whose
    verbs are replaced by stand-ins that name the extra to install.
    """
    import importlib

    for module, verbs in modules.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            extra = _missing_extra(exc)
            if extra is None:
                raise ImportError(f"curate: cannot load the verbs {', '.join(verbs)} from {module}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            for verb in verbs:
                group.add_command(_needs_extra(verb, extra, exc))
            continue
        for cmd in mod.COMMANDS:
            group.add_command(cmd)


attach_verbs(cli, VERB_MODULES)


def main(argv: list[str] | None = None) -> int:
    """Console entry point with the exit-code contract: 0 ok, 2 bad input/usage, 1 internal error."""
    try:
        cli.main(args=argv, prog_name="curate", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return 2
    except USER_ERRORS as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: report, exit 1
        message = os_error_message(exc) or _external_error(exc)
        if message is not None:
            click.echo(f"error: {message}", err=True)
            return 2
        if os.environ.get("CURATE_DEBUG"):
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (set CURATE_DEBUG=1 for a traceback)", err=True)
        return 1


def _external_error(exc: BaseException) -> str | None:
    """The message of a failure outside curate that the user must fix (a judge endpoint that is
    down or refuses the request), or None."""
    judge = sys.modules.get("curate.selectors.critiq.judge")  # only loaded when a judge verb ran
    if judge is not None and isinstance(exc, (judge.JudgeError, judge.CacheMiss)):
        return str(exc)
    return None


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
