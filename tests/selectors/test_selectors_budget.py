"""Budgets in the shared selector path: exact token fills, stratified quotas for every selector,
infeasible quotas named, and the CLI forms."""

from __future__ import annotations

import json
import warnings

import numpy as np
import polars as pl
import pytest

from curate.cli import main
from curate.errors import ParameterError
from curate.selectors import SELECTORS, Budget
from curate.selectors.baselines import TopKSelector
from curate.selectors.quotas import QuotaError, group_labels, largest_remainder
from curate.testing import resolve_contract_params, toy_inputs, toy_table

GROUPS = ["a"] * 40 + ["b"] * 15 + ["c"] * 5
RATIOS = {"a": 0.5, "b": 0.35, "c": 0.15}
# selectors whose pick order covers the pool (fills_budget); quad's bandit may change picks with k
FILLING = ["random", "topk", "kcenter", "dsir", "less", "bids", "tarot", "rds"]


def _select(name: str, budget, table=None, tmp_path=None):
    cls = SELECTORS[name]
    sel = cls(**resolve_contract_params(cls, tmp_path))
    pool, feats, targets = toy_inputs(sel, n=60)
    pool = pool.with_columns(pl.Series("grp", GROUPS)) if table is None else table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sel.select(pool, feats, budget, targets=targets)
    return res, res.frame.join(pool.select("uid", "grp", "score", "n_tokens"), on="uid", maintain_order="left")


def _kept_by_group(frame: pl.DataFrame) -> dict[str, int]:
    return dict(frame.filter(pl.col("keep"))["grp"].value_counts().rows())


def test_largest_remainder_reference():
    assert largest_remainder(10, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 4, "b": 3, "c": 3}
    assert largest_remainder(7, {"x": 0.6, "y": 0.4}) == {"x": 4, "y": 3}  # 4.2, 2.8: the .8 gets the unit
    assert largest_remainder(20, RATIOS) == {"a": 10, "b": 7, "c": 3}
    assert sum(largest_remainder(997, {"p": 0.123, "q": 0.456, "r": 0.421}).values()) == 997


@pytest.mark.parametrize("name", FILLING)
def test_ratios_met_exactly_by_every_selector(name: str, tmp_path):
    res, frame = _select(name, {"n": 20, "by": "grp", "ratios": RATIOS}, tmp_path=tmp_path)
    assert _kept_by_group(frame) == {"a": 10, "b": 7, "c": 3}
    reasons = set(frame.filter(~pl.col("keep"))["reason"].to_list())
    assert "over_quota: a" in reasons  # 'a' dominates the pool: its surplus is cut by its quota
    comp = res.diagnostics["groups"]["composition"]
    assert comp["a"]["kept_rows"] == 10 and comp["c"]["pool_rows"] == 5 and not res.diagnostics["groups"]["unmet"]
    ranks = sorted(frame.filter(pl.col("keep"))["rank"].to_list())
    assert ranks == list(range(1, 21))


def test_ratios_keep_the_selector_ranking_inside_each_group():
    # top-k by score: inside every group the kept rows are exactly that group's best-scored rows
    _, frame = _select("topk", {"n": 20, "by": "grp", "ratios": RATIOS})
    for g, q in {"a": 10, "b": 7, "c": 3}.items():
        grp = frame.filter(pl.col("grp") == g).sort(["score", "uid"], descending=[True, False])
        assert grp.head(q)["keep"].all() and not grp.tail(grp.height - q)["keep"].any()


def test_stratified_selection_is_row_order_invariant():
    _, a = _select("random", {"n": 20, "by": "grp", "ratios": RATIOS})
    pool, feats, _ = toy_inputs(SELECTORS["random"](), n=60)
    pool = pool.with_columns(pl.Series("grp", GROUPS))[np.random.default_rng(3).permutation(60).tolist()]
    b = SELECTORS["random"]().select(pool, feats, {"n": 20, "by": "grp", "ratios": RATIOS}).frame
    assert set(a.filter(pl.col("keep"))["uid"]) == set(b.filter(pl.col("keep"))["uid"])


def _planted_token_pool() -> pl.DataFrame:
    """Score order: a 10-token row, a 1000-token row, then 40 rows of 7..46 tokens."""
    t = toy_table(42)
    scores = np.arange(42, 0, -1, dtype=np.float64)
    tokens = np.array([10, 1000] + [7 + i for i in range(40)])
    return t.with_columns(pl.Series("score", scores), pl.Series("n_tokens", tokens))


def test_tokens_budget_fills_to_within_one_row():
    pool = _planted_token_pool()
    res = TopKSelector(column="score").select(pool, {}, {"tokens": 300})
    kept = res.frame.join(pool.select("uid", "n_tokens"), on="uid").filter(pl.col("keep"))
    total = int(kept["n_tokens"].sum())
    left = res.frame.join(pool.select("uid", "n_tokens"), on="uid").filter(~pl.col("keep"))["n_tokens"]
    assert total <= 300 and 300 - total < int(left.min())  # no unpicked row would still fit
    long_row = res.frame.filter(pl.col("uid") == pool["uid"][1])
    assert long_row["reason"][0] == "over_token_budget" and not long_row["keep"][0]
    # the old prefix cut stopped at the 1000-token row (10 tokens); first-fit goes on past it
    assert total > 250
    assert res.diagnostics["tokens"] == {"curated": float(total), "counted_by": "n_tokens", "approximate": False}


def test_tokens_budget_overshoot_keeps_the_crossing_row():
    pool = _planted_token_pool()
    res = TopKSelector(column="score").select(pool, {}, {"tokens": 300, "overshoot": True})
    kept = res.frame.join(pool.select("uid", "n_tokens"), on="uid").filter(pl.col("keep")).sort("rank")
    total = int(kept["n_tokens"].sum())
    assert total >= 300 and total - int(kept["n_tokens"][-1]) < 300


def test_token_budget_without_counts_is_marked_approximate():
    pool = toy_table(30).drop("n_tokens")
    res = SELECTORS["random"]().select(pool, {}, "tokens:50")
    assert res.diagnostics["tokens"]["approximate"] is True


@pytest.mark.parametrize("name", ["random", "tarot", "rds"])
def test_token_ratios_meet_each_quota_within_one_row(name: str, tmp_path):
    cls = SELECTORS[name]
    sel = cls(**resolve_contract_params(cls, tmp_path))
    pool, feats, targets = toy_inputs(sel, n=60)
    pool = pool.with_columns(pl.Series("grp", ["a"] * 30 + ["b"] * 30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sel.select(pool, feats, {"tokens": 400, "by": "grp", "ratios": {"a": 0.6, "b": 0.4}}, targets=targets)
    frame = res.frame.join(pool.select("uid", "grp", "n_tokens"), on="uid")
    for g, quota in (("a", 240), ("b", 160)):
        rows = frame.filter(pl.col("grp") == g)
        used = int(rows.filter(pl.col("keep"))["n_tokens"].sum())
        left = rows.filter(~pl.col("keep"))["n_tokens"]
        assert used <= quota and (left.is_empty() or quota - used < int(left.min())), (g, used, quota)


def test_min_and_max_quotas():
    # top-k by score with the best scores planted in 'a': floors pull in b and c, the cap holds a
    pool, feats, _ = toy_inputs(TopKSelector(), n=60)
    pool = pool.with_columns(pl.Series("grp", GROUPS), pl.Series("score", np.r_[np.arange(100, 60, -1), np.arange(20)]))
    res = TopKSelector().select(pool, {}, {"n": 20, "by": "grp", "min": {"*": 0.2}})
    kept = res.frame.join(pool.select("uid", "grp"), on="uid").filter(pl.col("keep"))
    assert dict(kept["grp"].value_counts().rows()) == {"a": 12, "b": 4, "c": 4}
    res = TopKSelector().select(pool, {}, {"n": 20, "by": "grp", "max": {"a": 0.25}})
    frame = res.frame.join(pool.select("uid", "grp"), on="uid")
    assert frame.filter(pl.col("keep") & (pl.col("grp") == "a")).height == 5
    assert frame.filter(pl.col("keep")).height == 20
    assert frame.filter(pl.col("grp") == "a").sort("score", descending=True)["reason"][5] == "over_quota: a"


def test_infeasible_quota_names_groups_and_shortfalls():
    with pytest.raises(QuotaError, match=r"'c' needs 10 rows, the pool has 5 \(short by 5\)") as err:
        _select("random", {"n": 20, "by": "grp", "ratios": {"a": 0.3, "b": 0.2, "c": 0.5}})
    assert err.value.shortfalls == {"c": 5.0}
    with pytest.raises(QuotaError, match="'zz' needs 4 rows, the pool has 0"):
        _select("random", {"n": 20, "by": "grp", "min": {"zz": 0.2}})
    with pytest.raises(QuotaError, match="minimums add up to 24 rows"):
        _select("random", {"n": 20, "by": "grp", "min": {"a": 0.6, "b": 0.6}})


def test_budget_forms_and_validation():
    b = Budget.parse({"tokens": "2e6", "by": "source", "ratios": {"alpaca": 0.6, "code_alpaca": 0.4}})
    assert b.tokens == 2e6 and b.describe()["ratios"] == {"alpaca": 0.6, "code_alpaca": 0.4}
    assert Budget.parse(b.describe()) == b and hash(b)
    assert Budget.parse("tokens:2e6") == Budget(tokens=2e6) and Budget.parse(500) == Budget(n=500)
    with pytest.raises(ParameterError, match="'ratios' parameter of Budget"):
        Budget.parse({"n": 10, "by": "g", "ratios": {"a": 0.5, "b": 0.4}})
    with pytest.raises(ParameterError, match="'by' parameter of Budget"):
        Budget.parse({"n": 10, "ratios": {"a": 1.0}})
    with pytest.raises(ParameterError, match="'budget' parameter"):
        Budget.parse({"n": 10, "per": "g"})


def test_group_labels_take_path_aliases():
    vals = ["../d/alpaca/alpaca_5000.json", "../d/codealpaca/code_alpaca_2k.json", None]
    assert group_labels(vals, ["alpaca", "code_alpaca_2k"]).tolist() == ["alpaca", "code_alpaca_2k", "(none)"]


def test_by_resolves_step_columns():
    pool = toy_table(40).with_columns(pl.Series("lang_id__language", ["en"] * 30 + ["de"] * 10))
    res = SELECTORS["random"]().select(pool, {}, {"n": 10, "by": "language", "ratios": {"en": 0.5, "de": 0.5}})
    kept = res.frame.join(pool.select("uid", "lang_id__language"), on="uid").filter(pl.col("keep"))
    assert kept["lang_id__language"].value_counts().sort("lang_id__language").rows() == [("de", 5), ("en", 5)]


def test_cli_stratified_budget_and_infeasible_exit_2(tmp_path, capsys):
    pool = toy_table(60).with_columns(pl.Series("grp", GROUPS))
    src = tmp_path / "pool.parquet"
    pool.write_parquet(src)
    out = tmp_path / "out"
    rc = main(["select", "random", str(src), "-o", str(out), "--budget", "20", "--by", "grp",
               "--ratio", "a=0.5", "--ratio", "b=0.35,c=0.15", "--json"])
    assert rc == 0
    cur = pl.read_parquet(out / "curated.parquet")
    assert dict(cur["grp"].value_counts().rows()) == {"a": 10, "b": 7, "c": 3}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"]["budget"]["ratios"] == RATIOS and manifest["tokens"]["curated"] == cur["n_tokens"].sum()
    bad = tmp_path / "bad"
    rc = main(["select", "random", str(src), "-o", str(bad), "--budget", "20", "--by", "grp",
               "--ratio", "a=0.3,b=0.2,c=0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "'c' needs 10 rows" in err and "short by 5" in err and not bad.exists()
    rc = main(["select", "random", str(src), "-o", str(bad), "--budget", "{n: 20, by: grp, min: {c: 0.1}}"])
    assert rc == 0 and pl.read_parquet(bad / "curated.parquet").filter(pl.col("grp") == "c").height >= 2


def test_quotas_over_two_columns_are_met_together():
    # sources a/b at 50/50 and a language floor; 'zh' rows exist only in 'b' and score lowest
    pool = toy_table(60)
    src = ["a"] * 30 + ["b"] * 30
    lang = ["en"] * 50 + ["zh"] * 10
    pool = pool.with_columns(pl.Series("src", src), pl.Series("lang", lang),
                             pl.Series("score", np.arange(60, 0, -1, dtype=np.float64)))
    budget = {"n": 20, "by": "src", "ratios": {"a": 0.5, "b": 0.5}, "also": [{"by": "lang", "min": {"zh": 0.2}}]}
    res = TopKSelector().select(pool, {}, budget)
    kept = res.frame.join(pool.select("uid", "src", "lang", "score"), on="uid").filter(pl.col("keep"))
    assert dict(kept["src"].value_counts().rows()) == {"a": 10, "b": 10}
    assert dict(kept["lang"].value_counts().rows()) == {"en": 16, "zh": 4}
    # inside the constraints the ranking decides: b's en rows are its best-scored ones
    b_en = pool.filter((pl.col("src") == "b") & (pl.col("lang") == "en")).sort("score", descending=True)
    assert set(kept.filter((pl.col("src") == "b") & (pl.col("lang") == "en"))["uid"]) == set(b_en.head(6)["uid"])
    assert [s["by"] for s in res.diagnostics["strata"]] == ["src", "lang"]
    assert Budget.parse(Budget.parse(budget).describe()) == Budget.parse(budget)
    with pytest.raises(ParameterError, match="'also' parameter of Budget"):
        Budget.parse({**budget, "also": [{"by": "src", "min": {"a": 0.1}}]})


def test_stratified_ranks_follow_the_selector_order():
    # the floor of 'c' is served first, but ranks still say where each kept row sits in the ranking
    _, frame = _select("topk", {"n": 20, "by": "grp", "ratios": RATIOS})
    kept = frame.filter(pl.col("keep")).sort("rank")
    assert kept["score"].to_list() == sorted(kept["score"].to_list(), reverse=True)
