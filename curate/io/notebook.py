"""Small HTML building blocks for the ``_repr_html_`` of the objects a notebook user holds (a run,
a ``Selection``, a feature set): a titled box, a compact table and links to files.

Everything is escaped; links are relative to the current directory when the file lies below it
(Jupyter serves files by their path relative to the notebook), absolute otherwise.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_STYLE = ("font-family:sans-serif;font-size:13px;border:1px solid #ccc;border-radius:4px;padding:6px 10px;"
          "display:inline-block;max-width:100%")
_CELL = "padding:1px 8px;text-align:left;border-bottom:1px solid #eee"


def esc(value: Any) -> str:
    """HTML-escaped text of ``value``."""
    return html.escape(str(value), quote=True)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, raw_cols: Sequence[int] = ()) -> str:
    """A compact HTML table; cells are escaped except the columns in ``raw_cols`` (already HTML)."""
    head = "".join(f"<th style='{_CELL}'>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td style='{_CELL}'>{c if i in raw_cols else esc(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table style='border-collapse:collapse'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def link(path: str | os.PathLike[str], text: str | None = None) -> str:
    """``<a>`` to a local file, relative to the working directory when below it."""
    p = Path(path)
    try:
        href = p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        href = p.resolve().as_posix()
    return f"<a href='{esc(href)}' target='_blank'>{esc(text or p.name)}</a>"


def links(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Links to the files of ``paths`` that exist, separated by middots."""
    return " · ".join(link(p) for p in paths if Path(p).exists())


def box(title: str, lines: Sequence[str]) -> str:
    """A titled box holding ``lines`` (HTML fragments, one per line)."""
    inner = "".join(f"<div style='margin:3px 0'>{line}</div>" for line in lines if line)
    return f"<div style='{_STYLE}'><b>{esc(title)}</b>{inner}</div>"


def reasons(dropped: Mapping[str, int], top: int = 3) -> str:
    """The ``top`` drop reasons as escaped ``n × reason`` text (and how many more)."""
    items = sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    text = "; ".join(f"{n} × {esc(r[:80])}" for r, n in items[:top])
    if len(items) > top:
        text += f"; +{len(items) - top} more"
    return text
