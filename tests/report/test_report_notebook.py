"""Notebook summaries (_repr_html_) of a run, a Selection and a feature set."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl

import curate
from curate.io.store import FeatureSet
from curate.selectors import Budget, RandomSelector

ROWS = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(20)]
ROWS.append(dict(ROWS[0]))


class _Strict(HTMLParser):
    """Collects text and checks every opened tag is closed in order."""

    VOID = {"br", "img", "meta"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag not in self.VOID:
            self.stack.append(tag)
        self.hrefs += [v for k, v in attrs if k == "href"]

    def handle_endtag(self, tag):  # noqa: ANN001
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):  # noqa: ANN001
        self.text.append(data)


def _parse(html: str) -> _Strict:
    p = _Strict()
    p.feed(html)
    p.close()
    assert p.stack == []
    return p


def test_run_result_and_loaded_run_show_funnel_budget_and_links(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rec = curate.parse_recipe({"name": "nb", "seed": 5, "inputs": ["pool.jsonl"], "output": str(tmp_path / "runs"),
                               "steps": [{"use": "exact_dedup"}, {"use": "random", "name": "pick", "budget": 7}]},
                              base=tmp_path)
    res = curate.run_recipe(rec)
    monkeypatch.chdir(tmp_path)
    for obj in (res, curate.load_run(res.run_dir)):
        p = _parse(obj._repr_html_())
        text = "".join(p.text)
        assert "curated 7 of 21 rows" in text and "seed 5" in text
        assert "pick (random, budget 7)" in text
        assert "1 × exact_dedup: exact pair duplicate of <uid>" in text  # the reason, escaped back by the parser
        assert "13 × below_budget_cutoff" in text
        run_rel = res.run_dir.relative_to(tmp_path).as_posix()
        assert f"{run_rel}/curated.parquet" in p.hrefs and f"{run_rel}/report.html" in p.hrefs


def test_selection_and_feature_set_summaries() -> None:
    table = curate.read_sources(ROWS[:20]).table
    sel = RandomSelector().select(table, {}, Budget.parse("5"), seed=1)
    p = _parse(sel._repr_html_())
    text = "".join(p.text)
    assert "kept 5 of 20" in text and "seed 1" in text and "15 × below_budget_cutoff" in text
    fs = FeatureSet("embed/<prompt>", np.array(["a", "b"]), np.zeros((2, 3), dtype=np.float32),
                    {"model": "mini<lm>", "dim": 3})
    html = fs._repr_html_()
    assert "<prompt>" not in html and "&lt;prompt&gt;" in html  # escaped
    text = "".join(_parse(html).text)
    assert "2 rows × 3 (float32)" in text and "mini<lm>" in text


def test_reasons_are_escaped_in_the_run_summary(tmp_path: Path) -> None:
    from curate.pipeline.results import run_html

    manifest = {"rows": {"input": 2, "curated": 1, "rejected": 1}, "recipe": {"name": "x<y>", "steps": []},
                "steps": [{"step": "s", "rows_in": 2, "rows_out": 1, "dropped": {"<script>alert(1)</script>": 1}}]}
    html = run_html(tmp_path, manifest)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert pl.DataFrame().height == 0  # polars imported for the fixtures above
