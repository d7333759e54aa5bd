"""``curate report RUN_DIR -o report.html``: write the HTML report of a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Where the HTML goes [default: RUN_DIR/report.html].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def report(run_dir: str, output: str | None, as_json: bool) -> None:
    """Write a static HTML report (funnel, histograms, clusters, map, dropped rows) of RUN_DIR."""
    from curate.report.render import build_report, save_report

    out = Path(output) if output else Path(run_dir) / "report.html"
    rep = build_report(run_dir)
    save_report(rep, out)
    summary = {"command": "report", "output": str(out), "bytes": out.stat().st_size, **rep.summary}
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        click.echo(f"wrote {out} ({summary['bytes']:,} bytes; sections: {', '.join(rep.sections)})")


COMMANDS = (report,)
