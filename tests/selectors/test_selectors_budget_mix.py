"""curate mix: curated subsets of several runs in exact proportions, cross-run dedup, realised ratios."""

from __future__ import annotations

import json

import polars as pl

from curate.cli import main
from curate.testing import toy_table


def _run(tmp_path, name: str, table: pl.DataFrame, budget: str) -> str:
    src = tmp_path / f"{name}.parquet"
    table.write_parquet(src)
    out = tmp_path / name
    assert main(["select", "topk", str(src), "-o", str(out), "--budget", budget]) == 0
    return str(out)


def test_mix_ratios_dedup_and_order(tmp_path):
    a = toy_table(40, seed=1, prefix="a")
    b = toy_table(30, seed=2, prefix="b")
    shared = a.head(5)  # the same 5 rows (uids) curated by both runs
    b = pl.concat([b, shared.with_columns(pl.lit(99.0).alias("score"))])
    run_a = _run(tmp_path, "run_a", a, "30")
    run_b = _run(tmp_path, "run_b", b, "20")
    out = tmp_path / "mix"
    rc = main(["mix", run_a, run_b, "--ratio", "0.7,0.3", "--budget", "20", "--name", "A", "--name", "B",
               "-o", str(out), "--json"])
    assert rc == 0
    cur = pl.read_parquet(out / "curated.parquet")
    assert dict(cur["mix_input"].value_counts().rows()) == {"A": 14, "B": 6}
    assert cur["uid"].n_unique() == 20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["realised"]["A"]["share"] == 0.7 and manifest["realised"]["B"]["rows"] == 6
    rej = pl.read_parquet(out / "rejected.parquet")
    dup = rej.filter(pl.col("reason").str.starts_with("duplicate_of: A"))
    kept_a = pl.read_parquet(tmp_path / "run_a" / "curated.parquet")
    assert dup.height == len(set(shared["uid"]) & set(kept_a["uid"])) > 0
    # inside B's quota the run's own order decides: B's 6 are its best-ranked rows that are not A's
    sel_b = pl.read_parquet(tmp_path / "run_b" / "selection.parquet").filter(pl.col("keep")).sort("rank")
    best_b = [u for u in sel_b["uid"].to_list() if u not in set(kept_a["uid"])][:6]
    assert set(cur.filter(pl.col("mix_input") == "B")["uid"]) == set(best_b)
    reasons = set(rej.filter(pl.col("mix_input") == "A")["reason"])
    assert "over_quota: A" in reasons and reasons <= {"over_quota: A", "below_budget_cutoff"}


def test_mix_infeasible_exits_2_and_writes_nothing(tmp_path, capsys):
    run_a = _run(tmp_path, "run_a", toy_table(40, seed=1, prefix="a"), "30")
    run_b = _run(tmp_path, "run_b", toy_table(30, seed=2, prefix="b"), "5")
    out = tmp_path / "mix"
    rc = main(["mix", run_a, run_b, "--ratio", "0.5,0.5", "--budget", "20", "--name", "A", "--name", "B",
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "'B' needs 10 rows, the pool has 5 (short by 5)" in err and not out.exists()
    assert main(["mix", run_a, run_b, "--ratio", "0.5,0.4", "--budget", "20", "-o", str(out)]) == 2
    assert not out.exists()


def test_mix_token_budget(tmp_path):
    run_a = _run(tmp_path, "run_a", toy_table(40, seed=1, prefix="a"), "30")
    run_b = _run(tmp_path, "run_b", toy_table(30, seed=2, prefix="b"), "20")
    out = tmp_path / "mix"
    assert main(["mix", run_a, run_b, "--ratio", "0.6,0.4", "--budget", "tokens:400", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    units = {n: r["units"] for n, r in manifest["realised"].items()}
    assert manifest["unit"] == "tokens" and sum(units.values()) <= 400
    assert units[run_a] <= 240 and units[run_b] <= 160 and manifest["tokens"]["approximate"] is False
