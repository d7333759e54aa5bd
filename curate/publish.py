"""``curate push RUN_DIR ORG/NAME`` and ``curate card RUN_DIR``: publish a run as a Hub dataset.

``push`` stages the upload in a temporary folder and sends it in one commit
(``HfApi.create_repo`` then ``HfApi.upload_folder``)::

    README.md                  the dataset card (curate.report.card)
    data/curated.parquet       canonical rows, or rows in a trainer format (--format trl|messages|sharegpt|alpaca)
    data/rejected.parquet      with --include-rejected: the rejected rows with step and reason
    recipe.resolved.yaml  manifest.json  report.html

The token comes from huggingface_hub's usual places (``HF_TOKEN``, ``huggingface-cli login``) and
is never written anywhere by curate.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click
import polars as pl

from curate._lazy import require
from curate.errors import ParameterError
from curate.io.writers import write_parquet
from curate.pipeline.results import Run, load_run
from curate.preference.export import FORMATS, export_records
from curate.report.card import card_text, write_card

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
SIDE_FILES = ("recipe.resolved.yaml", "manifest.json", "report.html")


def _data(run: Run, fmt: str | None) -> pl.DataFrame:
    curated = run.curated()
    if fmt is None:
        return curated
    recs = export_records(curated, fmt)
    for rec, u in zip(recs, curated["uid"].to_list()):
        rec["uid"] = u  # provenance: every exported row keeps its curate uid
    return pl.DataFrame(recs, infer_schema_length=None) if recs else pl.DataFrame({"uid": []}, schema={"uid": pl.Utf8})


def stage(run: Run, folder: Path, *, repo_id: str | None = None, fmt: str | None = None,
          include_rejected: bool = False) -> list[str]:
    """Write the files of a push into ``folder``; returns their repo paths (sorted)."""
    if fmt is not None and fmt not in FORMATS:
        raise ParameterError(f"--format must be one of {list(FORMATS)}. Got {fmt!r}.")
    splits: dict[str, tuple[str, int, int]] = {}
    curated = write_parquet(_data(run, fmt), folder / "data" / "curated.parquet")
    splits["curated"] = ("data/curated.parquet", pl.scan_parquet(curated).select(pl.len()).collect().item(),
                         curated.stat().st_size)
    if include_rejected:
        rej = shutil.copyfile(run.rejected_path, folder / "data" / "rejected.parquet")
        splits["rejected"] = ("data/rejected.parquet", pl.scan_parquet(rej).select(pl.len()).collect().item(),
                              Path(rej).stat().st_size)
    for name in SIDE_FILES:
        if (run.run_dir / name).is_file():
            shutil.copyfile(run.run_dir / name, folder / name)
    (folder / "README.md").write_text(card_text(run, repo_id=repo_id, splits=splits, fmt=fmt), encoding="utf-8")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push_run(run_dir: str | Path, repo_id: str, *, fmt: str | None = None, private: bool = False,
             include_rejected: bool = False, api: Any = None) -> dict[str, Any]:
    """Upload a finished run to the dataset repo ``repo_id`` in one commit.

    Args:
        api: a ``huggingface_hub.HfApi`` (default: a new one with the ambient token).

    Returns:
        ``{"repo", "files", "commit"}``.
    """
    if not _REPO.match(repo_id):
        raise ParameterError(f"the repo must be ORG/NAME (letters, digits, '-', '_', '.'). Got {repo_id!r}.")
    run = load_run(run_dir)
    if api is None:
        api = require("huggingface_hub", "curate push").HfApi()
    with tempfile.TemporaryDirectory(prefix="curate-push-") as tmp:
        files = stage(run, Path(tmp), repo_id=repo_id, fmt=fmt, include_rejected=include_rejected)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="dataset",
                                   commit_message=f"curate push: {run.manifest.get('recipe', {}).get('name', '')} "
                                                  f"({run.manifest.get('recipe_hash', '')[:12]})")
    return {"repo": repo_id, "files": files, "commit": str(getattr(commit, "commit_url", commit))}


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None,
              help="Write the curated rows in a trainer format [default: canonical columns].")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--include-rejected", is_flag=True, help="Upload rejected.parquet as a 'rejected' split.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def push(run_dir: str, repo_id: str, fmt: str | None, private: bool, include_rejected: bool, as_json: bool) -> None:
    """Upload RUN_DIR to the Hub dataset repo ORG/NAME with a dataset card."""
    out = push_run(run_dir, repo_id, fmt=fmt, private=private, include_rejected=include_rejected)
    if as_json:
        click.echo(json.dumps({"command": "push", **out}))
    else:
        click.echo(f"pushed {len(out['files'])} files to https://huggingface.co/datasets/{repo_id}")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Where the card goes [default: RUN_DIR/README.md].")
@click.option("--repo", "repo_id", default=None, metavar="ORG/NAME", help="The repo named in the loading snippet.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def card(run_dir: str, output: str | None, repo_id: str | None, as_json: bool) -> None:
    """Write the dataset card (README.md) of RUN_DIR locally."""
    run = load_run(run_dir)
    curated = run.curated_path
    n = pl.scan_parquet(curated).select(pl.len()).collect().item()
    path = write_card(run, output or Path(run_dir) / "README.md", repo_id=repo_id,
                      splits={"curated": ("data/curated.parquet", n, curated.stat().st_size)})
    if as_json:
        click.echo(json.dumps({"command": "card", "output": str(path)}))
    else:
        click.echo(f"wrote {path}")


COMMANDS = (push, card)
