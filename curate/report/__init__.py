"""The HTML report of a run folder: ``write_report(run_dir, out_path)``.

The runner calls :func:`write_report` at the end of every run (``<run_dir>/report.html``); the CLI
verb is ``curate report RUN_DIR -o report.html``. Modules: :mod:`curate.report.stats` (numbers),
:mod:`curate.report.plots` (matplotlib, Agg, base64 PNG), :mod:`curate.report.render` (the HTML;
not named ``html.py`` so it never shadows the standard library's ``html``).
"""

from __future__ import annotations

from curate.report.render import Report, build_report, save_report, write_report

__all__ = ["Report", "build_report", "save_report", "write_report"]
