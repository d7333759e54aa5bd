"""Matplotlib figures of the report, rendered off-screen (Agg) to PNG data URIs.

Each function takes plain numbers (see :mod:`curate.report.stats`) and returns
``data:image/png;base64,...`` so the HTML file needs nothing beside itself.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from curate._lazy import require

KEPT_COLOR = "#2b7bba"
DROPPED_COLOR = "#d95f02"
DPI = 80


def _plt() -> Any:
    mpl = require("matplotlib", "the HTML report's plots")
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, *, left: float = 0.13, bottom: float = 0.16) -> str:
    """Fixed margins instead of ``tight_layout`` (which costs ~40% of a small figure's time)."""
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.subplots_adjust(left=left, right=0.97, bottom=bottom, top=0.9)
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _left_margin(labels: Sequence[str], width_in: float) -> float:
    """Figure fraction for y tick labels of at most ``max(len)`` characters (about 0.075 in each)."""
    longest = max((len(s) for s in labels), default=1)
    return min(0.5, (0.35 + 0.075 * longest) / width_in)


def funnel_plot(steps: Sequence[str], rows_out: Sequence[int], dropped: Sequence[int]) -> str:
    """Horizontal bars: rows left after each step (and the rows it dropped, stacked)."""
    plt = _plt()
    n = len(steps)
    fig, ax = plt.subplots(figsize=(8, 0.45 * n + 1.2))
    y = np.arange(n)[::-1]
    ax.barh(y, rows_out, color=KEPT_COLOR, label="rows left")
    ax.barh(y, dropped, left=rows_out, color=DROPPED_COLOR, label="dropped here")
    labels = [s[:30] for s in steps]
    ax.set_yticks(y, labels=labels)
    ax.set_xlabel("rows")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, left=_left_margin(labels, 8), bottom=min(0.4, 0.5 / (0.45 * n + 1.2)))


def _bins(arrays: Sequence[np.ndarray], n_bins: int, log: bool) -> np.ndarray:
    allv = np.concatenate([a for a in arrays if a.size]) if any(a.size for a in arrays) else np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    if log:
        lo, hi = max(lo, 0.0) + 1.0, max(hi, 0.0) + 1.0
        if hi <= lo:
            hi = lo * 10
        return np.geomspace(lo, hi, n_bins + 1)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def histogram(groups: Mapping[str, np.ndarray], *, title: str, xlabel: str, log_x: bool = False,
              n_bins: int = 40) -> str:
    """Overlaid histograms of ``{"kept": values, "dropped": values}``: each bar is the share of
    its group's rows (so groups of different sizes compare).

    With ``log_x`` values are shifted by one (``x + 1``) so zero-length texts show.
    """
    plt = _plt()
    arrays = [np.asarray(v, dtype=np.float64) for v in groups.values()]
    bins = _bins(arrays, n_bins, log_x)
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    colors = {"kept": KEPT_COLOR, "dropped": DROPPED_COLOR}
    for label, arr in zip(groups, arrays, strict=True):
        if arr.size == 0:
            continue
        x = arr + 1.0 if log_x else arr
        ax.hist(x, bins=bins, weights=np.full(arr.size, 1.0 / arr.size), alpha=0.55, color=colors.get(label),
                label=f"{label} ({arr.size})")
    if log_x:
        ax.set_xscale("log")
    else:
        ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel + (" + 1 (log)" if log_x else ""))
    ax.set_ylabel("share of rows")
    ax.legend(fontsize=8)
    return _png(fig)


def cluster_size_plot(size_counts: Mapping[int, int], *, title: str) -> str:
    """Bars: number of clusters of each size (log y)."""
    plt = _plt()
    sizes = sorted(size_counts)
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    ax.bar([str(s) for s in sizes], [size_counts[s] for s in sizes], color=KEPT_COLOR)
    ax.set_yscale("log")
    ax.set_xlabel("cluster size (rows)")
    ax.set_ylabel("clusters")
    ax.set_title(title, fontsize=10)
    if len(sizes) > 20:
        ax.set_xticks(range(0, len(sizes), max(1, len(sizes) // 10)))
    return _png(fig)


def composition_plot(labels: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str) -> str:
    """Grouped horizontal bars of shares (input, curated, target) per value."""
    plt = _plt()
    n = len(labels)
    k = max(1, len(series))
    fig, ax = plt.subplots(figsize=(8, 0.35 * n * k + 1.3))
    y = np.arange(n)[::-1]
    h = 0.8 / k
    colors = {"input": "#999999", "curated": KEPT_COLOR, "target": "#1b9e77"}
    for i, (name, vals) in enumerate(series.items()):
        ax.barh(y + (k - 1 - i) * h - 0.4 + h / 2, vals, height=h, color=colors.get(name), label=name)
    ticks = [str(v)[:40] for v in labels]
    ax.set_yticks(y, labels=ticks)
    ax.set_xlabel("share of rows")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    height = 0.35 * n * k + 1.3
    return _png(fig, left=_left_margin(ticks, 8), bottom=min(0.4, 0.5 / height))


def scatter_map(coords: np.ndarray, kept: np.ndarray, *, title: str, xlabel: str, ylabel: str) -> str:
    """2-D scatter of rows, dropped under kept."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.2))
    kept = np.asarray(kept, dtype=bool)
    size = 6 if len(coords) > 2000 else 14
    if (~kept).any():
        ax.scatter(coords[~kept, 0], coords[~kept, 1], s=size, c=DROPPED_COLOR, alpha=0.5, label=f"dropped ({int((~kept).sum())})",
                   linewidths=0)
    if kept.any():
        ax.scatter(coords[kept, 0], coords[kept, 1], s=size, c=KEPT_COLOR, alpha=0.6, label=f"kept ({int(kept.sum())})",
                   linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, markerscale=2)
    return _png(fig, left=0.12, bottom=0.1)
