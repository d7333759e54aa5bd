"""TF-IDF prefilter: planted rare bigrams are found; filtering only subsets the scores."""

from __future__ import annotations

import numpy as np
import torch
from _influence_models import DT, RegressionTask

from curate.influence import Curvature, pairwise_scores, tfidf_topk
from curate.influence.scores import restrict


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choice(words, size=20)) for _ in range(n)]


def test_influence_tfidf_finds_planted_bigrams():
    train = _corpus(200, 0)
    planted = [17, 88, 150]
    for i in planted:
        train[i] += " zanzibar quokka marmalade tuba"
    query = "how does the zanzibar quokka eat marmalade tuba w3 w5"
    top = tfidf_topk([query, "w1 w2 w3"], train, k=10)
    assert set(planted) <= set(top[0].tolist())
    assert all(len(t) == 10 for t in top)


def test_influence_tfidf_ties_broken_by_uid():
    train = ["same text"] * 5
    uids = ["e", "d", "c", "b", "a"]
    assert tfidf_topk(["same text"], train, k=2, train_uids=uids)[0].tolist() == [3, 4]


def test_influence_tfidf_filtered_scores_are_a_subset():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(DT)
    ex = [(torch.randn(4, dtype=DT), torch.randn((), dtype=DT)) for _ in range(30)]
    task = RegressionTask()
    curv = Curvature(strategy="ekfac", modules="all", fisher="empirical", dtype=DT).fit(model, task, ex)
    texts = _corpus(30, 1)
    qtexts = [texts[2] + " " + texts[9], texts[20]]
    cand = tfidf_topk(qtexts, texts, k=6)
    uids = [f"u{i:02d}" for i in range(30)]
    full = pairwise_scores(curv, model, task, ex[:2], ex, train_uids=uids)
    filt = pairwise_scores(curv, model, task, ex[:2], ex, train_uids=uids, candidates=cand, batch_size=4)
    for i, c in enumerate(cand):
        np.testing.assert_allclose(filt.values[i, c], full.values[i, c], rtol=1e-12)
        other = np.setdiff1d(np.arange(30), c)
        assert np.isnan(filt.values[i, other]).all()
        assert set(filt.reasons[i, other]) == {"not_in_tfidf_topk"} and set(filt.reasons[i, c]) == {""}
    kept = sorted({uids[j] for c in cand for j in c})
    sub = restrict(full, kept)
    assert sub.values.shape == (2, len(kept))
    fs = full.to_feature_set()
    assert fs.values.shape == (30, 2) and fs.meta["target_uids"] == ["q0", "q1"]
