"""The static HTML report of a run folder: one file, plots embedded as base64 PNG, no scripts.

Sections (each omitted when the run has nothing for it): overview, funnel with drops by reason,
length histograms (kept vs dropped), score histograms (one per ``__score`` column), dedup clusters
(one per ``__cluster_id`` column, with examples), composition by source / kind / task against the
targets, budget and groups (token counts; pool vs curated share and scores per group of every ``by:``
column, :mod:`curate.report.groups`), a 2-D embedding map (PCA, or UMAP when ``umap-learn`` is installed) and sample rows per
drop reason. Every text that comes from data is HTML-escaped.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curate.io.writers import write_text
from curate.report import plots
from curate.report import stats as st

SECTION_TITLES = {
    "overview": "Overview",
    "funnel": "Funnel",
    "lengths": "Lengths",
    "scores": "Scores",
    "clusters": "Dedup clusters",
    "composition": "Composition",
    "budget": "Budget and groups",
    "embedding": "Embedding map",
    "samples": "Dropped rows by reason",
}


@dataclass
class Report:
    """A rendered report: the HTML text, the sections it holds and a JSON-able summary."""

    html: str
    sections: list[str]
    summary: dict[str, Any] = field(default_factory=dict)


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(x: float | int | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if not np.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    thead = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _section(key: str, body: str, title: str | None = None) -> str:
    return f'<section id="sec-{key}"><h2>{esc(title or SECTION_TITLES[key])}</h2>{body}</section>'


# ---------------------------------------------------------------------------------- sections
def _overview(data: st.RunData) -> str:
    m = data.manifest
    recipe = m.get("recipe") or {}
    rows = m.get("rows") or {}
    items = [
        ("run folder", esc(data.run_dir)),
        ("recipe", esc(recipe.get("name", ""))),
        ("created", esc(m.get("created", ""))),
        ("curate", esc(m.get("curate_version", ""))),
        ("seed", esc(m.get("seed", ""))),
        ("rows in", _fmt(int(rows.get("input", 0)))),
        ("curated", _fmt(int(rows.get("curated", 0)))),
        ("rejected", _fmt(int(rows.get("rejected", 0)))),
        ("seconds", _fmt(m.get("seconds"))),
    ]
    body = _table(["", ""], [[k, v] for k, v in items], "kv")
    inputs = m.get("inputs") or []
    if inputs:
        body += "<h3>Inputs</h3>" + _table(
            ["path", "format", "bytes", "sha256"],
            [[esc(i.get("path")), esc(i.get("format")), _fmt(i.get("size")), f"<code>{esc(str(i.get('sha256', ''))[:16])}</code>"]
             for i in inputs])
    return _section("overview", body)


def _funnel(data: st.RunData) -> str:
    fun = st.funnel(data.manifest)
    if not fun:
        return ""
    rows = []
    for s in fun:
        reasons = "<br>".join(f"{_fmt(n)} &times; {esc(r)}" for r, n in s["reasons"].items())
        rows.append([f'<span class="step">{esc(s["step"])}</span>' + (" <em>(cached)</em>" if s["cached"] else ""),
                     esc(s["use"]), f'<span class="n-in">{s["rows_in"]}</span>',
                     f'<span class="n-out">{s["rows_out"]}</span>', f'<span class="n-drop">{s["dropped"]}</span>',
                     _fmt(s["seconds"]), reasons])
    body = _img(plots.funnel_plot([s["step"] for s in fun], [s["rows_out"] for s in fun], [s["dropped"] for s in fun]),
                "rows left after each step")
    body += _table(["step", "use", "rows in", "rows out", "dropped", "seconds", "dropped by reason"], rows, "funnel")
    return _section("funnel", body)


def _lengths(data: st.RunData) -> str:
    lens = st.length_stats(data.rows)
    if not lens:
        return ""
    imgs, rows = [], []
    for fname, groups in lens.items():
        imgs.append(_img(plots.histogram(groups, title=f"{fname} length", xlabel="characters", log_x=True),
                         f"{fname} length histogram"))
        for g, v in groups.items():
            d = st.describe(v)
            rows.append([esc(fname), esc(g), _fmt(d["count"]), _fmt(d.get("mean")), _fmt(d.get("median")),
                         _fmt(d.get("min")), _fmt(d.get("max"))])
    body = '<div class="grid">' + "".join(imgs) + "</div>"
    body += _table(["text", "rows", "count", "mean chars", "median", "min", "max"], rows)
    return _section("lengths", body)


def _scores(data: st.RunData) -> str:
    cols = st.score_columns(data.rows)
    imgs, rows = [], []
    for col in cols:
        split = st.score_split(data.rows, col)
        if not any(v.size for v in split.values()):
            continue
        imgs.append(_img(plots.histogram(split, title=col, xlabel="score"), f"{col} histogram"))
        for g, v in split.items():
            d = st.describe(v)
            rows.append([esc(col), esc(g), _fmt(d["count"]), _fmt(d.get("mean")), _fmt(d.get("median")),
                         _fmt(d.get("min")), _fmt(d.get("max"))])
    if not imgs:
        return ""
    body = "<p>Kept / dropped by the step that wrote the score.</p>"
    body += '<div class="grid">' + "".join(imgs) + "</div>"
    body += _table(["column", "rows", "count", "mean", "median", "min", "max"], rows)
    return _section("scores", body)


def _clusters(data: st.RunData) -> str:
    parts = []
    for col in st.cluster_columns(data.rows):
        cs = st.cluster_summary(data.rows, col)
        if not cs["n_rows"]:
            continue
        head = (f'<h3>{esc(cs["step"])}</h3><p><span class="n-clusters">{cs["n_clusters"]}</span> clusters over '
                f'{cs["n_rows"]} rows; <span class="n-multi">{cs["n_multi"]}</span> hold more than one row.</p>')
        img = _img(plots.cluster_size_plot(cs["size_counts"], title=f"{cs['step']}: cluster sizes"),
                   f"{cs['step']} cluster sizes") if cs["n_multi"] else ""
        ex = []
        for c in cs["largest"]:
            members = "".join(
                f'<li class="{"kept" if m["kept"] else "dropped"}"><code>{esc(m["uid"][:12])}</code> '
                f'{"kept" if m["kept"] else "dropped"}: <span class="txt">{esc(st._cut(m["text"], 300))}</span></li>'
                for m in c["members"])
            ex.append(f'<div class="cluster"><b>size {c["size"]}</b> (cluster <code>{esc(c["cluster_id"][:12])}</code>)'
                      f"<ul>{members}</ul></div>")
        parts.append(head + img + "".join(ex) + _merged_pairs(data, cs["step"]))
    if not parts:
        return ""
    return _section("clusters", "".join(parts))


def _merged_pairs(data: st.RunData, step: str) -> str:
    """Sampled merged pairs of one dedup step, per similarity band (dropped row, then its match)."""
    bands = st.merged_pairs(data.rows, step)
    if not bands:
        return ""
    rows = []
    for b in bands:
        for k, p in enumerate(b["pairs"]):
            rows.append([esc(b["band"]) if k == 0 else "", _fmt(b["count"]) if k == 0 else "", f"{p['similarity']:.3f}",
                         f'<code>{esc(p["uid"][:12])}</code> {esc(st._cut(p["text"], 200))}',
                         f'<code>{esc(str(p["matched"])[:12])}</code> {esc(st._cut(p["matched_text"], 200))}'])
    return ('<h4 class="merged-pairs">Merged pairs by similarity</h4>'
            + _table(["band", "pairs", "similarity", "dropped row", "matched row"], rows))


def _composition(data: st.RunData, max_values: int = 15) -> str:
    comp = st.composition(data.rows, data.targets)
    parts = []
    for c in comp:
        rows_ = c["rows"]
        shown = rows_[:max_values]
        series: dict[str, list[float]] = {"input": [r["input_share"] for r in shown],
                                          "curated": [r["curated_share"] for r in shown]}
        if c["has_targets"]:
            series["target"] = [r["target_share"] for r in shown]
        header = ["value", "input", "input %", "curated", "curated %"] + (["target", "target %"] if c["has_targets"] else [])
        trs = []
        for r in rows_:
            tr = [esc(r["value"]), _fmt(r["input"]), _pct(r["input_share"]), _fmt(r["curated"]), _pct(r["curated_share"])]
            if c["has_targets"]:
                tr += [_fmt(r["target"]), _pct(r["target_share"])]
            trs.append(tr)
        more = f"<p>{len(rows_) - max_values} more values in the table only.</p>" if len(rows_) > max_values else ""
        parts.append(f"<h3>by {esc(c['column'])}</h3>"
                     + _img(plots.composition_plot([r["value"] for r in shown], series, title=f"by {c['column']}"),
                            f"composition by {c['column']}") + more + _table(header, trs, "composition"))
    if not parts:
        return ""
    note = "<p>Shares of the input pool, the curated subset" + (" and the targets" if data.targets is not None else "") + ".</p>"
    return _section("composition", note + "".join(parts))


def _budget(data: st.RunData) -> str:
    from curate.report import groups

    body = groups.render(data, esc, _fmt, _pct, _table, _img)
    return _section("budget", body) if body else ""


def _embedding(data: st.RunData) -> str:
    parts = []
    for name in st.embedding_features(data.store):
        fs = data.store.get(name)
        if fs is None or data.rows.height == 0:
            continue
        emap = st.embedding_map(data.rows, fs)
        if len(emap["uids"]) < 2:
            continue
        if emap["method"] == "pca":
            ev = emap["explained"]
            xl, yl = f"PC1 ({_pct(ev[0])} var)", f"PC2 ({_pct(ev[1])} var)"
        else:
            xl, yl = "UMAP 1", "UMAP 2"
        shown = len(emap["uids"])
        sampled = f" (a deterministic sample of {shown} of {emap['n_total']} rows)" if shown < emap["n_total"] else ""
        parts.append(f"<h3>{esc(name)}</h3><p>{esc(emap['method'].upper())} of {shown} rows{esc(sampled)}.</p>"
                     + _img(plots.scatter_map(emap["coords"], emap["kept"], title=f"{name} ({emap['method']})",
                                              xlabel=xl, ylabel=yl), f"{name} map"))
    if not parts:
        return ""
    return _section("embedding", "".join(parts))


def _samples(data: st.RunData) -> str:
    groups = st.samples_per_reason(data.rows, data.ingest_rejects, step_order=["ingest", *data.step_names])
    if not groups:
        return ""
    parts = []
    for g in groups:
        ex = "".join(
            f'<div class="row"><div class="meta"><code>{esc((e["uid"] or "")[:12])}</code> {esc(e["where"])} '
            f'&mdash; <span class="reason">{esc(e["reason"])}</span></div>'
            f'<pre class="prompt">{esc(e["prompt"])}</pre>'
            + (f'<pre class="response">{esc(e["response"])}</pre>' if e["response"] else "") + "</div>"
            for e in g["examples"])
        parts.append(f'<div class="reason-group"><h3>{esc(g["step"])}: {esc(g["reason"])} '
                     f'<small>({g["count"]} rows)</small></h3>{ex}</div>')
    return _section("samples", "".join(parts))


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1150px;padding:16px;color:#222;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{border-bottom:2px solid #2b7bba;padding-bottom:2px;margin-top:1.6em}
h3{font-size:1.05em;margin:1em 0 .3em}table{border-collapse:collapse;margin:.5em 0;font-size:.88em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}th{background:#eef3f8}
table.kv td:first-child{font-weight:bold}img{max-width:100%;margin:4px}.grid{display:flex;flex-wrap:wrap}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;padding:6px;margin:3px 0;max-height:14em;overflow:auto;font-size:.85em}
pre.response{background:#eef6ee}.row{border-left:3px solid #d95f02;padding-left:8px;margin:8px 0}
.meta{font-size:.85em;color:#555}li.kept{color:#1a5e8f}li.dropped{color:#a04000}.cluster{margin:6px 0}
nav a{margin-right:12px}
"""


def build_report(run_dir: str | Path) -> Report:
    """Render the report of a finished run folder (see the module docstring for its sections)."""
    data = st.load_run_data(run_dir)
    builders = {"overview": _overview, "funnel": _funnel, "lengths": _lengths, "scores": _scores,
                "clusters": _clusters, "composition": _composition, "budget": _budget, "embedding": _embedding, "samples": _samples}
    bodies: dict[str, str] = {}
    for key, fn in builders.items():
        text = fn(data)
        if text:
            bodies[key] = text
    name = (data.manifest.get("recipe") or {}).get("name") or Path(run_dir).name
    nav = "<nav>" + "".join(f'<a href="#sec-{k}">{esc(SECTION_TITLES[k])}</a>' for k in bodies) + "</nav>"
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>curate report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<h1>curate report: {esc(name)}</h1>"
        f'<p class="meta">run created {esc(data.manifest.get("created", "?"))}</p>{nav}'
        + "".join(bodies.values()) + "</body></html>\n"
    )
    rows = data.manifest.get("rows") or {}
    summary = {"run_dir": str(run_dir), "sections": list(bodies), "plots": doc.count("data:image/png;base64,"),
               "rows": rows, "steps": len(data.manifest.get("steps") or [])}
    return Report(doc, list(bodies), summary)


def write_report(run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the HTML report of ``run_dir`` to ``out_path`` atomically and return the path.

    Raises:
        RecipeError: ``run_dir`` is not a finished run folder (no manifest.json).
    """
    return save_report(build_report(run_dir), out_path)


def save_report(report: Report, out_path: str | os.PathLike[str]) -> Path:
    """Write a rendered report atomically (temp file, then rename), readable by everyone."""
    out = write_text(report.html, Path(out_path))
    os.chmod(out, 0o644)  # mkstemp makes 0600; a report is meant to be shared
    return out
