"""What a budget did to each group: token counts and, for every ``by:`` column of a selector's
budget, the pool vs curated composition and the selector's score distribution per group.

Read back from the run folder: the ``count_tokens`` step's ``n_tokens`` column and stats.json
(tokenizer name), and each selector step's stats.json (``selection.diagnostics.strata``: per group
the rows and units that reached the selector, the rows and units it kept, floor and cap) plus its
``<step>__score`` and ``<step>__group_<by>`` columns (each row's group, written by the budget).
The section lets a user check a fairness constraint after the fact: a group's curated share next
to its pool share, and whether the selector scored one group systematically lower than another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.report import plots
from curate.report import stats as st

TOKENS_SUFFIX = "__n_tokens"


def _step_stats(run_dir: Path, manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(step name, stats.json) of every recipe step, in order (step folders are ``NN-<name>``)."""
    out = []
    steps = [s for s in manifest.get("steps", []) if s.get("step") != "ingest"]
    for i, s in enumerate(steps, start=1):
        path = run_dir / "steps" / f"{i:02d}-{s.get('step')}" / "stats.json"
        try:
            out.append((str(s.get("step")), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def token_summary(data: st.RunData) -> dict[str, Any] | None:
    """Counted tokens of the run: the column, the tokenizer, curated / pool totals and the kept /
    dropped per-row counts (for histograms); None without a ``count_tokens`` step."""
    cols = [c for c in data.rows.columns if c.endswith(TOKENS_SUFFIX)]
    if not cols:
        return None
    col = cols[-1]
    step = col[: -len(TOKENS_SUFFIX)]
    tokenizer = None
    for name, stats in _step_stats(data.run_dir, data.manifest):
        if name == step:
            tokenizer = (stats.get("tokens") or {}).get("tokenizer")
    vals = data.rows[col].cast(pl.Float64).to_numpy()
    kept = data.rows["_kept"].to_numpy().astype(bool)
    seen = np.isfinite(vals)
    return {"column": col, "tokenizer": tokenizer, "curated": float(vals[kept & seen].sum()),
            "counted": float(vals[seen].sum()), "kept": vals[kept & seen], "dropped": vals[~kept & seen]}


def budget_groups(data: st.RunData) -> list[dict[str, Any]]:
    """One entry per (selector step, ``by`` column): ``step``, ``by``, ``unit``, ``budget``,
    ``rows`` (group, pool rows/units/share, curated rows/units/share, floor, cap, unmet) and
    ``scores`` (group -> {kept: scores, dropped: scores})."""
    out = []
    for step, stats in _step_stats(data.run_dir, data.manifest):
        sel = stats.get("selection") or {}
        strata = (sel.get("diagnostics") or {}).get("strata") or []
        budget = (sel.get("params") or {}).get("budget") or {}
        quotas = [budget.get("by"), *(q.get("by") for q in budget.get("also") or [])]
        for stratum, by in zip(strata, quotas):
            comp = stratum.get("composition") or {}
            pool_total = sum(c["pool_units"] for c in comp.values()) or 1.0
            kept_total = sum(c["kept_units"] for c in comp.values()) or 1.0
            rows = [{"group": g, "pool_rows": c["pool_rows"], "pool_units": c["pool_units"],
                     "pool_share": c["pool_units"] / pool_total, "kept_rows": c["kept_rows"],
                     "kept_units": c["kept_units"], "kept_share": c["kept_units"] / kept_total,
                     "floor": c.get("floor"), "cap": c.get("cap"), "unmet": (stratum.get("unmet") or {}).get(g)}
                    for g, c in sorted(comp.items(), key=lambda kv: -kv[1]["pool_units"])]
            scores: dict[str, dict[str, np.ndarray]] = {}
            gcol = f"{step}__group_{str(by).replace('__', '_')}"
            scol, kcol = f"{step}__score", f"{step}__keep"
            if by and {gcol, scol, kcol} <= set(data.rows.columns):
                sub = data.rows.filter(pl.col(gcol).is_not_null()).select(gcol, scol, kcol)
                for g in [r["group"] for r in rows]:
                    part = sub.filter(pl.col(gcol) == g)
                    v = part[scol].cast(pl.Float64).to_numpy()
                    k = part[kcol].fill_null(False).to_numpy().astype(bool)
                    fin = np.isfinite(v)
                    scores[g] = {"kept": v[fin & k], "dropped": v[fin & ~k]}
            out.append({"step": step, "by": stratum.get("by", by), "unit": stratum.get("unit", "rows"),
                        "budget": budget, "rows": rows, "scores": scores})
    return out


def _whole(x: Any) -> Any:
    """Integral floats as ints, so counts of rows and tokens print as 150,000 rather than 1.5e+05."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def render(data: st.RunData, esc: Any, fmt: Any, pct: Any, table: Any, img: Any) -> str:
    """The body of the report's "Budget and groups" section ("" when the run has neither token
    counts nor grouped budgets). Formatting helpers come from :mod:`curate.report.render`."""
    parts = []
    tok = token_summary(data)
    if tok is not None:
        who = f"counted with <code>{esc(tok['tokenizer'])}</code>" if tok["tokenizer"] else f"from {esc(tok['column'])}"
        parts.append(f"<h3>Tokens</h3><p>{fmt(_whole(tok['curated']))} curated tokens of {fmt(_whole(tok['counted']))} "
                     f"counted, "
                     f"{who} (chat template applied).</p>")
        parts.append(img(plots.histogram({"kept": tok["kept"], "dropped": tok["dropped"]}, title="tokens per row",
                                         xlabel="tokens", log_x=True), "tokens per row histogram"))
    for grp in budget_groups(data):
        unit = grp["unit"]
        head = ["group", "pool rows", f"pool {unit}", "pool %", "curated rows", f"curated {unit}", "curated %",
                "floor", "cap", "unmet"]
        trs = [[esc(r["group"]), fmt(r["pool_rows"]), fmt(_whole(r["pool_units"])), pct(r["pool_share"]),
                fmt(r["kept_rows"]), fmt(_whole(r["kept_units"])), pct(r["kept_share"]),
                fmt(_whole(r["floor"])) if r["floor"] is not None else "",
                fmt(_whole(r["cap"])) if r["cap"] is not None else "", fmt(_whole(r["unmet"])) if r["unmet"] else ""]
               for r in grp["rows"]]
        shown = grp["rows"][:15]
        plot = plots.composition_plot([r["group"] for r in shown],
                                      {"input": [r["pool_share"] for r in shown],
                                       "curated": [r["kept_share"] for r in shown]},
                                      title=f"{grp['step']}: by {grp['by']} (share of {unit})")
        body = (f"<h3>{esc(grp['step'])}: by {esc(grp['by'])}</h3><p>Budget <code>{esc(json.dumps(grp['budget']))}"
                f"</code>; pool = the rows that reached the selector.</p>" + img(plot, f"composition by {grp['by']}")
                + table(head, trs, "composition"))
        if grp["scores"]:
            srows = []
            for g, split in grp["scores"].items():
                for side in ("kept", "dropped"):
                    d = st.describe(split[side])
                    srows.append([esc(g), side, fmt(d["count"]), fmt(d.get("mean")), fmt(d.get("median")),
                                  fmt(d.get("min")), fmt(d.get("max"))])
            kept_by_group = {g: s["kept"] for g, s in list(grp["scores"].items())[:6] if s["kept"].size}
            if kept_by_group:
                body += img(plots.histogram(kept_by_group, title=f"{grp['step']} score of kept rows by {grp['by']}",
                                            xlabel="score"), f"score by {grp['by']}")
            body += "<p>The selector's score per group.</p>" + table(
                ["group", "rows", "count", "mean", "median", "min", "max"], srows)
        parts.append(body)
    return "".join(parts)
