"""Pair diagnostics (docs/methods/preference-diagnostics.md §1, §2, §4, §6) on hand-computed cases and planted pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.preference.diagnostics import (
    IFD,
    annotator_agreement,
    diagnose_pairs,
    length_bias,
    length_flags,
    ranking_accuracy,
    ref_margin,
    rm_votes,
)
from curate.schema import make_record, to_frame


# ------------------------------------------------------------------ margins and ranking accuracy
def test_ref_margin_and_ranking_accuracy_by_hand():
    m = ref_margin([-3.0, -5.0, -2.0], [-4.0, -5.0, -1.0], [3, 5, 1], [2, 5, 4])
    np.testing.assert_allclose(m["margin"], [1.0, 0.0, -1.0])
    np.testing.assert_allclose(m["margin_per_token"], [-1.0 + 2.0, 0.0, -2.0 + 0.25])
    np.testing.assert_allclose(m["difficulty"], [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(m["ref_ranks_correctly"], [1.0, 0.5, 0.0])
    ra = ranking_accuracy([-3.0, -5.0, -2.0], [-4.0, -5.0, -1.0], [3, 5, 1], [2, 5, 4])
    assert ra["sum"] == pytest.approx(1.5 / 3)  # tie counts 1/2
    assert ra["per_token"] == pytest.approx(1.5 / 3)  # (1 vs -2: wins), (-1 vs -1: tie), (-2 vs -0.25: loses)


# ------------------------------------------------------------------ length bias
def test_length_bias_always_longer_chosen():
    lb = length_bias([10, 20, 30, 5], [5, 10, 3, 4], sources=["a", "a", "b", "b"])
    assert lb["p_longer"] == 1.0 and lb["baseline_accuracy"] == 1.0 and lb["logistic_slope"] == math.inf
    assert lb["per_source"]["b"]["n_pairs"] == 2
    mixed = length_bias([10, 5, 8, 8], [5, 10, 4, 8])
    assert mixed["p_longer"] == pytest.approx(2 / 3) and mixed["n_ties"] == 1
    # slope: the maximum-likelihood b solves sum x (1 - 2 sigma(b x)) = 0; check the score equation
    b = mixed["logistic_slope"]
    x = np.log(np.array([10, 5, 8]) / np.array([5, 10, 4]))
    xs, ys = np.concatenate([x, -x]), np.concatenate([np.ones(3), np.zeros(3)])
    assert abs(np.sum((ys - 1 / (1 + np.exp(-b * xs))) * xs)) < 1e-9 and b > 0


def test_length_flags():
    flags = length_flags(["Sure. Here are details and more details.", "short", "a b c d"],
                         ["Sure.", "a much longer rejected reply", "x"], [8, 1, 4], [2, 5, 1])
    assert flags == ["chosen_extends_rejected", "", ""]
    flags = length_flags(["long answer"], ["other"], [10], [3], rm_margin=[1.0], relevance_chosen=[0.1],
                         relevance_rejected=[0.5])
    assert flags == ["length_exploitable"]


# ------------------------------------------------------------------ annotators
@pytest.mark.parametrize("votes,label,frac", [
    ([1, 1, 1], "unanimous", 1.0), ([-1, -1, -1], "unanimous", 0.0), ([1, 1, -1], "majority", 2 / 3),
    ([1, 1, 0], "majority", 5 / 6), ([1, -1, 0], "split", 0.5), ([1, 0, 0], "split", 2 / 3)])
def test_annotator_agreement(votes, label, frac):
    got, f = annotator_agreement(votes)
    assert got == label and f == pytest.approx(frac)


def test_annotator_agreement_on_pandalm(data_dir):
    from curate.io import read_sources

    t = read_sources([data_dir / "pandalm" / "testset-v1.json"], on_error="skip").table
    labels = [annotator_agreement(v)[0] for v in t["annotators"].to_list()]
    assert t.height > 800 and set(labels) <= {"unanimous", "majority"}  # the reader keeps majority pairs only
    assert 0 < labels.count("majority") < t.height


# ------------------------------------------------------------------ RM votes
def test_rm_votes_find_planted_flips():
    rng = np.random.default_rng(0)
    n, k = 1000, 5
    gap = rng.uniform(0.5, 2.0, size=n)
    flip = rng.random(n) < 0.1
    better = rng.normal(size=n)
    worse = better - gap
    q_c = np.where(flip, worse, better)  # a flipped label calls the worse response "chosen"
    q_r = np.where(flip, better, worse)
    d = (q_c[:, None] + rng.normal(0, 0.2, (n, k))) - (q_r[:, None] + rng.normal(0, 0.2, (n, k)))
    v = rm_votes(d)
    inc = v["flag"] == "incorrect"
    assert inc[flip].mean() >= 0.9 and inc[~flip].mean() <= 0.02
    # positive rescaling of one RM changes nothing
    d2 = d.copy()
    d2[:, 2] *= 7.5
    v2 = rm_votes(d2)
    assert (v2["flag"] == v["flag"]).all()
    np.testing.assert_allclose(v2["mean"], v["mean"], rtol=1e-12)
    # K = 1 reduces to sign(d)
    one = rm_votes(np.array([0.5, -0.3, 0.0, 2.0]))
    assert one["flag"].tolist() == ["clear", "incorrect", "ambiguous", "clear"]
    np.testing.assert_allclose(one["std"], 0.0)


# ------------------------------------------------------------------ table level
def _pairs():
    recs = [make_record("preference", prompt=[{"role": "user", "content": f"q{i}"}],
                        chosen=[{"role": "assistant", "content": c}], rejected=[{"role": "assistant", "content": r}],
                        annotators=a)
            for i, (c, r, a) in enumerate([("good answer here", "good", [1, 1, 1]), ("yes", "no", [1, -1, 0]),
                                           ("a b", "c d", None)])]
    return to_frame(recs)


def test_diagnose_pairs_from_states_by_hand():
    t = _pairs()
    v = np.zeros((3, 2, 4))
    v[:, 0, 0], v[:, 1, 0] = [4, 1, 2], [1, 1, 2]
    v[:, 0, 1], v[:, 1, 1] = [-2.0, -1.0, -6.0], [-3.0, -0.5, -1.0]
    d = diagnose_pairs(t, v, hard_quantile=0.3, rm_margins=np.array([[1.0], [-1.0], [0.0]]))
    f = d.frame
    np.testing.assert_allclose(f["margin"].to_numpy(), [1.0, -0.5, -5.0])
    assert f["hard_to_learn"].to_list() == [False, False, True]
    assert f["agreement"].to_list() == ["unanimous", "split", None]
    assert f["length_flag"].to_list() == ["chosen_extends_rejected", "", ""]
    assert f["rm_flag"].to_list() == ["clear", "incorrect", "ambiguous"]
    assert d.summary["ranking_accuracy"]["sum"] == pytest.approx(1 / 3)
    assert d.summary["agreement"] == {"unanimous": 1, "majority": 0, "split": 1}


def test_ifd_decisions():
    step = IFD(keep_top_fraction=0.5)
    keep, reason = step.decide(["a", "b", "c", "d", "e"], np.array([0.5, 0.9, 1.2, np.nan, 0.7]))
    assert keep.tolist() == [False, True, False, False, True]
    assert reason == ["below_ifd_cutoff", "", "ifd_ge_1", "no_response_tokens", ""]
    from curate.errors import ParameterError

    with pytest.raises(ParameterError, match="'keep_top_fraction' parameter of step 'ifd'"):
        IFD(keep_top_fraction=0)


def test_ifd_identical_tokens_and_batching():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from curate.features.tiny import tiny_llama, tiny_tokenizer
    from curate.preference.diagnostics import ifd_scores

    tok = tiny_tokenizer()
    model = tiny_llama(seed=3)
    model.set_attn_implementation("sdpa")
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "sky", "tree", "rock"]
    rows = []
    for i in range(6):
        q = " ".join(rng.choice(words, 3))
        rows.append(make_record("sft", messages=[{"role": "user", "content": q},
                                                 {"role": "assistant", "content": q.upper() + f" {i}"}]))
    t = to_frame(rows)
    a = ifd_scores(t, model, tok, batch_size=4)
    b = ifd_scores(t, model, tok, padding="none")
    np.testing.assert_allclose(a["ifd"], b["ifd"], atol=1e-10)
    np.testing.assert_allclose(a["loss_cond"] / a["loss_uncond"], a["ifd"])
    # identical answer tokens in both conditions: the counts match the answer (+EOS) token count
    n_ans = [len(tok(r["messages"][1]["content"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    assert a["n_answer"].tolist() == n_ans
