"""Quad's influence reward on a tiny LM built in code (docs/methods/quad.md §7 d, f)."""

from __future__ import annotations

import numpy as np
import pytest

from curate.features.store import FeatureSet
from curate.schema import make_record, to_frame
from curate.selectors.quad import InfluenceReward, QuadSelector

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOPICS = [
    ("cat dog pet fur paw", "meow bark purr"), ("sum add plus two four", "six eight ten"),
    ("red blue green hue", "paint color ink"), ("ship sea sail wave", "port boat dock"),
    ("code loop func var", "return print def"), ("rain snow cloud wind", "storm cold wet"),
    ("king queen crown", "throne royal court"), ("tree leaf root bark", "forest oak pine"),
]

PER = 24  # rows per topic


def _rows(topic: int, n: int, rng: np.random.Generator, kind: str = "sft") -> list[dict]:
    q_words, a_words = TOPICS[topic][0].split(), TOPICS[topic][1].split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(q_words, size=4))
        a = " ".join(rng.choice(a_words, size=5))
        if kind == "sft":
            out.append(make_record("sft", messages=[{"role": "user", "content": f"{q} {i}"},
                                                     {"role": "assistant", "content": a}]))
        else:
            out.append(make_record("target", task=f"topic{topic}", messages=[{"role": "user", "content": f"{q} {i}"}],
                                   answer=a))
    return out


@pytest.fixture(scope="module")
def world():
    from curate.features.tiny import tiny_llama, tiny_tokenizer

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    recs, topic = [], []
    for t in range(len(TOPICS)):
        recs += _rows(t, PER, rng)
        topic += [t] * PER
    pool = to_frame(recs)
    order = np.argsort(pool["uid"].to_numpy())
    pool, topic = pool[order.tolist()], np.asarray(topic)[order]
    targets = to_frame(_rows(0, 6, rng, "target") + _rows(1, 6, rng, "target"))
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    return pool, topic, targets, model, tok


def test_selectors_quad_reward_matches_pairwise_scores(world) -> None:
    """Spec §7(d): raw reward = Σ_q EK-FAC scores of the queries; cosine = raw / (‖P(V)‖·‖G_z‖)."""
    from curate.features.lm import encode_examples
    from curate.influence.scores import example_gradients, pairwise_scores

    pool, _, targets, model, tok = world
    sub = pool[:16]
    raw = InfluenceReward(model, tok, sub, targets[:4], reward="influence", fit_examples=16, max_length=48)
    cos = InfluenceReward(model, tok, sub, targets[:4], reward="cosine", factors=raw.curv, max_length=48)
    idx = np.arange(16)
    q = encode_examples(targets[:4], tok, max_length=48)
    z = encode_examples(sub, tok, max_length=48)
    ref = pairwise_scores(raw.curv, model, raw.task, q, z).values.sum(0)
    got = raw.rows(idx)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)
    g = example_gradients(raw.curv, model, raw.task, z)
    gnorm = np.sqrt(sum((v**2).sum((1, 2)).numpy() for v in g.values()))
    np.testing.assert_allclose(cos.rows(idx), ref / (gnorm * raw.pv_norm), rtol=1e-8, atol=1e-12)
    # the uid interface gives the same numbers in any order
    uids = sub["uid"].to_list()[::-1]
    np.testing.assert_allclose(cos(uids), cos.rows(idx)[::-1], rtol=1e-12)


@pytest.mark.slow
def test_selectors_quad_probe_estimates_rank_clusters(world) -> None:
    """Spec §7(f): Spearman(probe means at m = 10, exact damped-GGN cluster-mean influence) > 0.7, and
    Quad at a 25% budget takes most rows from the two reference topics."""
    from scipy.stats import spearmanr

    from curate.features.lm import encode_examples
    from curate.influence.exact import exact_scores, fisher_blocks, per_example_grads

    pool, topic, targets, model, tok = world
    oracle = InfluenceReward(model, tok, pool, targets, fit_examples=8 * PER, max_length=64)
    names = oracle.curv.names
    z = encode_examples(pool, tok, max_length=64)
    q = encode_examples(targets, tok, max_length=64)
    gen = torch.Generator().manual_seed(0)
    fis = fisher_blocks(per_example_grads(model, oracle.task, z, names, sampled=True, generator=gen))
    damp = {n: 0.1 * float(torch.linalg.eigvalsh(f).mean()) for n, f in fis.items()}
    gz = per_example_grads(model, oracle.task, z, names)
    gq = per_example_grads(model, oracle.task, q, names)
    true = exact_scores(fis, {n: v.sum(0, keepdim=True) for n, v in gq.items()}, gz, damp).numpy()[0]
    true_mean = np.array([true[topic == t].mean() for t in range(len(TOPICS))])
    rng = np.random.default_rng(0)
    probe = np.array([oracle.rows(rng.choice(np.flatnonzero(topic == t), 10, replace=False)).mean()
                      for t in range(len(TOPICS))])
    rho = spearmanr(probe, true_mean).statistic
    assert rho > 0.7, (rho, probe, true_mean)
    assert set(np.argsort(-true_mean)[:2].tolist()) == {0, 1}  # the planted answer holds for the reference too
    emb = np.eye(len(TOPICS))[topic] + 0.05 * rng.normal(size=(len(topic), len(TOPICS)))
    feats = {"embed": FeatureSet("e", np.asarray(pool["uid"].to_list(), dtype=object), emb)}
    sel = QuadSelector(n_clusters=8, reward_fn=oracle, chunk_size=10, probe_size=3, arms_per_round=2)
    res = sel.select(pool, feats, 0.25)
    kept_topic = topic[np.searchsorted(pool["uid"].to_numpy(), np.asarray(res.kept_uids))]
    assert np.isin(kept_topic, [0, 1]).mean() >= 0.6, np.bincount(kept_topic, minlength=8)
    assert res.diagnostics["n_evaluations"] < 0.5 * pool.height


def test_selectors_quad_default_reward_reuses_cached_factors(world, tmp_path, monkeypatch) -> None:
    """The selector's own influence reward: the second run loads the factors the first one fitted
    (``$CURATE_CACHE``) and selects exactly the same rows; without the cache it fits again."""
    from curate.features.tiny import tiny_llama

    pool, topic, targets, _, tok = world
    folder = tmp_path / "tiny"
    tiny_llama(vocab_size=len(tok), dtype="float32", seed=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    emb = np.eye(len(TOPICS))[topic] + 0.05 * rng.normal(size=(len(topic), len(TOPICS)))
    feats = {"embed": FeatureSet("e", np.asarray(pool["uid"].to_list(), dtype=object), emb)}
    sel = QuadSelector(model=str(folder), n_clusters=8, fit_examples=16, max_length=48, max_targets=4)
    first = sel.select(pool, feats, 0.2, targets=targets)
    second = sel.select(pool, feats, 0.2, targets=targets)
    assert (first.diagnostics["factors"], second.diagnostics["factors"]) == ("fitted", "cache")
    assert first.diagnostics["n_fit"] == 16 and first.diagnostics["n_targets"] == 4
    assert first.frame.equals(second.frame)
    assert len(list((tmp_path / "cache" / "quad" / "factors").iterdir())) == 1
    off = QuadSelector(model=str(folder), n_clusters=8, fit_examples=16, max_length=48, max_targets=4,
                       cache_factors=False).select(pool, feats, 0.2, targets=targets)
    assert off.diagnostics["factors"] == "fitted" and off.frame.equals(first.frame)
