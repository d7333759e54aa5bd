"""The report's budget section: pool vs curated composition and scores per group of a by: column."""

from __future__ import annotations

import json

import numpy as np
import yaml

from curate import load_recipe, run_recipe
from curate.report import build_report
from curate.report import stats as st
from curate.report.groups import budget_groups, token_summary


def _write(path, n: int, tag: str) -> None:
    rows = [{"instruction": f"{tag} task number {i}: describe item {i} briefly.", "input": "",
             "output": f"Item {i} of {tag} is a plain example answer with several words."} for i in range(n)]
    path.write_text(json.dumps(rows))


def test_report_shows_pool_vs_curated_per_group(tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "code").mkdir()
    _write(tmp_path / "gen" / "a.json", 40, "general")
    _write(tmp_path / "code" / "b.json", 20, "code")
    recipe = {"name": "groups", "seed": 0, "inputs": ["gen/a.json", "code/b.json"], "output": "runs",
              "steps": [{"use": "random", "budget": {"n": 10, "by": "source", "ratios": {"gen": 0.7, "code": 0.3}}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = run_recipe(load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    data = st.load_run_data(run.run_dir)
    (grp,) = budget_groups(data)
    rows = {r["group"]: r for r in grp["rows"]}
    assert grp["by"] == "source" and grp["unit"] == "rows"
    assert (rows["gen"]["pool_rows"], rows["gen"]["kept_rows"]) == (40, 7)
    assert (rows["code"]["pool_rows"], rows["code"]["kept_rows"]) == (20, 3)
    assert abs(rows["gen"]["pool_share"] - 2 / 3) < 1e-12 and rows["code"]["kept_share"] == 0.3
    # the selector's scores per group: every row of the group once, split by the step's keep
    assert {g: (s["kept"].size, s["dropped"].size) for g, s in grp["scores"].items()} == {"gen": (7, 33),
                                                                                        "code": (3, 17)}
    assert np.all(grp["scores"]["gen"]["kept"] >= 0)
    assert token_summary(data) is None
    report = build_report(run.run_dir)
    assert "budget" in report.sections and "random: by source" in report.html
