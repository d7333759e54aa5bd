"""Exact and semantic dedup: planted duplicates, keep rule, invariances, brute-force cosine reference."""

from __future__ import annotations

import itertools
import json

import numpy as np
import polars as pl
import pytest

from curate.curation import ExactDedup, SemanticDedup, exact_duplicates, semantic_duplicates
from curate.curation.semantic import HashingEncoder, radius_pairs
from curate.errors import ParameterError
from curate.pipeline.step import StepContext
from curate.schema import make_record, message, to_frame


def _sft(prompt: str, response: str, line: int | None = None) -> dict:
    return make_record("sft", messages=[message("user", prompt), message("assistant", response)],
                       source=None if line is None else "f.jsonl", source_line=line)


def _pool() -> pl.DataFrame:
    return to_frame([
        _sft("What is 2+2?", "4", 5),
        _sft("what is  2+2?", "Four.", 2),      # same prompt up to case/whitespace
        _sft("What is 2+2?", "4 ", 9),           # same pair up to whitespace
        _sft("Name a colour.", "4", 1),          # same response as row 0
        _sft("Unique prompt", "Unique answer", 3),
        make_record("preference", prompt=[message("user", "Pick one")], chosen=[message("assistant", "A")],
                    rejected=[message("assistant", "B")], source="f.jsonl", source_line=4),
    ])


@pytest.mark.parametrize(("level", "lowercase", "n_dups"), [
    ("pair", False, 1), ("prompt", False, 1), ("prompt", True, 2), ("response", False, 2)])
def test_exact_levels(level, lowercase, n_dups):
    out = exact_duplicates(_pool(), level, lowercase=lowercase)
    assert int((~out["keep"]).sum()) == n_dups
    for row in out.filter(~pl.col("keep")).iter_rows(named=True):
        assert row["dup_of"] in row["reason"] and row["dup_of"] == row["cluster_id"]


def test_exact_keeps_earliest_source_line_for_any_row_order():
    t = _pool()
    ref = exact_duplicates(t, "prompt", lowercase=True).sort("uid")
    kept_lines = t.join(ref.filter(pl.col("keep") & (pl.col("cluster_size") > 1)), on="uid")["source_line"].to_list()
    assert kept_lines == [2]  # line 2 beats lines 5 and 9
    for seed in range(3):
        shuffled = t.sample(fraction=1.0, shuffle=True, seed=seed)
        assert exact_duplicates(shuffled, "prompt", lowercase=True).sort("uid").equals(ref)


def test_exact_step_params():
    with pytest.raises(ParameterError, match="'level' parameter of ExactDedup"):
        ExactDedup(level="turn")
    out = ExactDedup(level="response").apply(_pool(), StepContext())
    assert out.height == 6


def _grid_embeddings(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n // 2, 16))
    near = base + rng.normal(scale=0.05, size=base.shape)
    x = np.concatenate([base, near]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_radius_pairs_equal_brute_force():
    x = _grid_embeddings(40)
    sims = x @ x.T
    for thr in (0.9, 0.99):
        src, dst, _ = radius_pairs(x, thr)
        brute = {(i, j) for i, j in itertools.combinations(range(40), 2) if sims[i, j] >= thr}
        assert set(zip(src.tolist(), dst.tolist())) == brute


def test_semantic_dedup_planted_and_invariant():
    x = _grid_embeddings(40)
    t = to_frame([_sft(f"p{i}", f"r{i}", i + 1) for i in range(40)])
    out = semantic_duplicates(t, embeddings=x, eps=0.02)
    sims = x @ x.T
    truth = {(i, i + 20) for i in range(20) if sims[i, i + 20] >= 0.98}
    assert len(truth) > 5  # the planted near pairs
    assert int((~out["keep"]).sum()) == len(truth)
    assert out["keep"].to_list()[:20] == [True] * 20  # earlier source lines kept
    perm = np.random.default_rng(1).permutation(40)
    out2 = semantic_duplicates(t[perm.tolist()], embeddings=x[perm], eps=0.02)
    assert out2.sort("uid").equals(out.sort("uid"))


def test_semantic_turn_aware_with_encoder():
    t = to_frame([_sft("How do I bake bread at home?", "Use flour.", 1),
                  _sft("how do I bake bread at home", "Knead the dough for ten minutes.", 2),
                  _sft("Completely different topic about ships", "Boats float.", 3)])
    enc = HashingEncoder()
    prompt_only = semantic_duplicates(t, model=enc, field="prompt", eps=0.01)
    whole = semantic_duplicates(t, model=enc, field="prompt+response", eps=0.01)
    assert prompt_only["keep"].to_list() == [True, False, True]
    assert whole["keep"].to_list() == [True, True, True]


def test_semantic_step_hashing_model(tmp_path):
    t = to_frame([_sft("a b c d", "e f", 1), _sft("a b c d", "f e", 2), _sft("x y z", "w", 3)])
    ctx = StepContext(step_dir=tmp_path)
    out = SemanticDedup(model="hashing", eps=0.01).apply(t, ctx)
    assert out["keep"].to_list() == [True, False, True]
    assert pl.read_parquet(tmp_path / "clusters.parquet").height == 2
    with pytest.raises(ParameterError, match="'eps' parameter of SemanticDedup"):
        SemanticDedup(eps=0)


def test_dedup_cli_cluster_table_and_report_merged_pairs(tmp_path):
    """`curate dedup --minhash` on short rows with one-word edits: each dropped row names the row it
    matched with the exact Jaccard of that link, and the report samples the merged pairs by band."""
    from click.testing import CliRunner

    from curate.cli.curation import dedup
    from curate.curation._common import jaccard, shingle_strings
    from curate.report.render import build_report
    from curate.report.stats import merged_pairs
    from curate.schema import dedupe_uids, texts

    base = ["Please write a short poem about the river and the quiet evening sky over town",
            "Explain why the quiet ocean looks blue on a clear summer day to a child",
            "List three quiet hobbies that help people relax after a long working week",
            "Describe how a quiet desert changes between the cold night and the hot noon"]
    edits = [b.replace("quiet", "calm") for b in base] + [b.replace("quiet ", "") for b in base]
    rows = [_sft("", t, k) for k, t in enumerate(base + edits)]
    dedupe_uids(rows)
    src = tmp_path / "in.parquet"
    table = to_frame(rows)
    table.write_parquet(src)
    out_dir = tmp_path / "d"
    res = CliRunner().invoke(dedup, [str(src), "-o", str(out_dir), "--minhash", "--field", "response", "--json"])
    assert res.exit_code == 0, res.output
    clusters = pl.read_parquet(out_dir / "clusters.parquet")
    dropped = clusters.filter(~pl.col("kept"))
    assert dropped.height == 8  # every edited copy; the four distinct base rows are kept
    text = dict(zip(table["uid"].to_list(), texts(table, "response")))
    for row in dropped.iter_rows(named=True):
        want = jaccard(shingle_strings(text[row["uid"]], ngram=2), shingle_strings(text[row["matched"]], ngram=2))
        assert row["similarity"] == pytest.approx(want)  # exact Jaccard of the link, not an estimate
        assert "2-grams" in row["measure"]
    # --short-words 0 is the one-pass word-5-gram rule: these rows are too short for it.
    res = CliRunner().invoke(dedup, [str(src), "-o", str(tmp_path / "d0"), "--minhash", "--field", "response",
                                     "--short-words", "0", "--json"])
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["rows"]["rejected"] == 0
    from curate.report.stats import load_run_data

    bands = merged_pairs(load_run_data(out_dir).rows, "minhash_dedup", per_band=2)
    shown = dict(zip(table["uid"].to_list(), texts(table, "prompt+response")))
    assert sum(b["count"] for b in bands) == 8
    for b in bands:
        assert 1 <= len(b["pairs"]) <= 2
        for p in b["pairs"]:
            assert p["matched_text"] == shown[p["matched"]] and p["text"] == shown[p["uid"]]
    html = build_report(out_dir).html
    assert "Merged pairs by similarity" in html
