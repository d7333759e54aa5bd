"""Regenerate ``benchmarks/RESULTS.md`` from ``benchmarks/results.jsonl`` (+ ``RESULTS_NOTES.md``).

One section per benchmark family (the part of ``bench`` before ``/``), one table per family with
the latest result of every (bench, params) pair and the exact command that made it. Lines come in
two shapes: the current one written by ``_common.record`` (``params`` and ``metrics`` mappings)
and an older flat one (all numbers at the top level); flat lines are grouped by (bench, command).
Malformed lines are skipped and counted, never fatal.

    python benchmarks/make_results.py [--results PATH] [--notes PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
META_KEYS = ("bench", "command", "time", "machine", "versions", "notes", "params", "metrics")
MAX_CELL = 80


def load_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parsed result lines in file order, and the number of lines that were skipped."""
    rows, bad = [], 0
    if not path.exists():
        return rows, bad
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(d, dict) or not isinstance(d.get("bench"), str):
            bad += 1
            continue
        rows.append(d)
    return rows, bad


def normalise(d: Mapping[str, Any]) -> dict[str, Any]:
    """Bring either line shape to ``{bench, command, time, params, metrics, notes, machine}``."""
    if isinstance(d.get("metrics"), Mapping):
        params = dict(d.get("params") or {})
        metrics = dict(d["metrics"])
    else:
        params = {}
        metrics = {k: v for k, v in d.items() if k not in META_KEYS}
    machine = d.get("machine")
    if isinstance(machine, Mapping):
        machine = f"{machine.get('processor', '?')}, {machine.get('cpus', '?')} cpus"
    command = d.get("command") or ""
    if command and not command.startswith("python"):
        command = "python benchmarks/" + command if not command.startswith("benchmarks/") else "python " + command
    return {"bench": d["bench"], "command": command, "time": str(d.get("time") or ""), "params": params,
            "metrics": metrics, "notes": d.get("notes") or "", "machine": machine or ""}


def latest(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The last line of each (bench, params) pair — (bench, command) for flat lines — in first-seen order."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        n = normalise(r)
        key = json.dumps([n["bench"], n["params"] or n["command"]], sort_keys=True, default=str)
        if key in out:
            del out[key]  # re-insert so the order follows the latest time
        out[key] = n
    return list(out.values())


def fmt(v: Any) -> str:
    """One table cell: short floats, compact JSON for nested values, pipes escaped."""
    if isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, float):
        s = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    elif isinstance(v, (dict, list, tuple)):
        s = json.dumps(_round(v), separators=(",", ":"), default=str)
    elif v is None:
        s = ""
    else:
        s = str(v)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= MAX_CELL else s[: MAX_CELL - 1] + "…"


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, Mapping):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_round(x) for x in v]
    return v


def flatten(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings of scalars become ``key.sub`` columns; ``x`` and ``x_std`` merge into ``x ± std``."""
    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping) and 0 < len(v) <= 8 and all(not isinstance(x, (Mapping, list)) for x in v.values()):
            for sk, sv in v.items():
                flat[f"{k}.{sk}"] = sv
        else:
            flat[k] = v
    out: dict[str, Any] = {}
    for k, v in flat.items():
        std_key = k.replace(".", "_std.", 1) if "." in k else f"{k}_std"
        if k.endswith("_std") or "_std." in k:
            base = k.replace("_std.", ".", 1) if "_std." in k else k[:-4]
            if base in flat:
                continue
        if std_key in flat and isinstance(v, (int, float)) and isinstance(flat[std_key], (int, float)):
            out[k] = f"{fmt(v)} ± {fmt(flat[std_key])}"
        else:
            out[k] = v
    return out


def table(rows: list[dict[str, Any]], keep: Iterable[str] = ()) -> list[str]:
    """Markdown table: bench, varying params (and those in ``keep``), metrics, command."""
    keep = set(keep)
    rows = [{**r, "metrics": flatten(r["metrics"])} for r in rows]
    pkeys: list[str] = []
    for r in rows:
        for k in r["params"]:
            if k not in pkeys:
                pkeys.append(k)
    # keep only parameters that differ between rows (the rest go into a line above the table)
    varying = [k for k in pkeys
               if k in keep or len({json.dumps(r["params"].get(k), default=str) for r in rows}) > 1]
    mkeys: list[str] = []
    for r in rows:
        for k in r["metrics"]:
            if k not in mkeys:
                mkeys.append(k)
    head = ["bench", *varying, *(f"{k} (result)" if k in varying else k for k in mkeys), "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bench"], *(fmt(r["params"].get(k)) for k in varying), *(fmt(r["metrics"].get(k)) for k in mkeys),
                 f"`{r['command']}`" if r["command"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    fixed = {k: rows[0]["params"].get(k) for k in pkeys if k not in varying and k in rows[0]["params"]}
    pre = [f"Fixed parameters: `{json.dumps(_round(fixed), default=str)}`", ""] if fixed else []
    return pre + lines


def render(rows: list[dict[str, Any]], notes: str = "", skipped: int = 0, source: str = "results.jsonl") -> str:
    """The whole RESULTS.md text."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in latest(rows):
        groups.setdefault(r["bench"].split("/")[0], []).append(r)
    out = [
        "# Benchmark results",
        "",
        f"Generated by `python benchmarks/make_results.py` from `benchmarks/{source}` "
        "(do not edit by hand; the discussion lives in `benchmarks/RESULTS_NOTES.md`). "
        "Each table holds the latest result per (benchmark, parameters) and the exact command that made it. "
        "`python benchmarks/run.py --quick` reruns every benchmark and regenerates this file.",
        "",
    ]
    if skipped:
        out += [f"({skipped} malformed line(s) in {source} were skipped.)", ""]
    out += ["## Contents", ""] + [f"- [{g}](#{g.replace('_', '-').lower()})" for g in sorted(groups)] + [""]
    for g in sorted(groups):
        rs = groups[g]
        out += [f"## {g}", ""]
        machines = sorted({r["machine"] for r in rs if r["machine"]})
        times = sorted(r["time"] for r in rs if r["time"])
        if machines or times:
            out += [f"Machine: {', '.join(machines) or '?'}; latest run: {times[-1] if times else '?'}.", ""]
        by_bench: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            by_bench.setdefault(r["bench"], []).append(r)
        for b, brs in by_bench.items():
            if len(by_bench) > 1:
                out += [f"### {b}", ""]
            shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for r in brs:  # rows with other columns (another mode of the script) get their own table
                shapes.setdefault(tuple(sorted(r["params"])) + ("|",) + tuple(sorted(r["metrics"])), []).append(r)
            # a parameter that varies across the bench stays a column in each of its tables, so a table
            # of one mode (e.g. only the BIDS rows, which carry extra metrics) still names its rows
            keep = [k for k in dict.fromkeys(k for r in brs for k in r["params"])
                    if len({json.dumps(r["params"].get(k), default=str) for r in brs}) > 1]
            for srs in shapes.values():
                out += table(srs, keep) + [""]
            for n in dict.fromkeys(r["notes"] for r in brs if r["notes"]):
                out += [f"Note: {n}", ""]
    if notes.strip():
        out += ["---", "", notes.strip(), ""]
    return "\n".join(out)


def write_atomic(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    p.add_argument("--notes", default=str(HERE / "RESULTS_NOTES.md"))
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    a = p.parse_args(argv)
    rows, bad = load_lines(Path(a.results))
    notes_path = Path(a.notes)
    notes = notes_path.read_text(encoding="utf-8") if notes_path.exists() else ""
    out = Path(a.out)
    write_atomic(render(rows, notes, bad, Path(a.results).name), out)
    print(f"wrote {out} ({len(rows)} result lines, {bad} skipped)")
    return out


if __name__ == "__main__":
    main()
