"""Quad's reward oracle: factor cache, block filter, batching and progress (docs/methods/quad.md §3.2, §5)."""

from __future__ import annotations

import numpy as np
import pytest

from curate.errors import ParameterError
from curate.influence.quad_reward import InfluenceReward, fit_sample, last_blocks
from curate.schema import make_record, to_frame

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _rows(n: int, seed: int, kind: str = "sft") -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["cat", "dog", "sum", "add", "red", "blue", "ship", "sea", "code", "loop", "rain", "snow", "king", "tree"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
        a = " ".join(rng.choice(words, size=int(rng.integers(2, 12))))
        if kind == "sft":
            out.append(make_record("sft", messages=[{"role": "user", "content": f"{q} {i}"},
                                                     {"role": "assistant", "content": a}]))
        else:
            out.append(make_record("target", messages=[{"role": "user", "content": f"{q} {i}"}], answer=a))
    return out


@pytest.fixture(scope="module")
def world():
    from curate.features.tiny import tiny_llama, tiny_tokenizer

    pool = to_frame(_rows(24, 0)).sort("uid")
    targets = to_frame(_rows(3, 1, "target"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    yield pool, targets, tiny_llama(seed=0), tiny_tokenizer()
    torch.set_num_threads(threads)


def _reward(world, **kw) -> InfluenceReward:
    pool, targets, model, tok = world
    args = {"fit_examples": 12, "max_length": 40, "batch_size": 4, "modules": "mlp+attn"} | kw
    return InfluenceReward(kw.pop("model", model), tok, pool, targets, **{k: v for k, v in args.items() if k != "model"})


def test_influence_quad_reward_cache_gives_identical_rewards(world, tmp_path, monkeypatch) -> None:
    import curate.influence.quad_reward as qr

    monkeypatch.setattr(qr, "CACHE_KEEP", 4)
    idx = np.arange(24)
    fresh = _reward(world, cache=False)
    first = _reward(world, cache=tmp_path)
    second = _reward(world, cache=tmp_path)
    assert (fresh.factors_source, first.factors_source, second.factors_source) == ("fitted", "fitted", "cache")
    assert len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(second.rows(idx), first.rows(idx))
    np.testing.assert_array_equal(second.rows(idx), fresh.rows(idx))
    # damping is applied when preconditioning: a cache hit with another damping equals a fresh fit with it
    damped = _reward(world, cache=tmp_path, damping=0.5)
    assert damped.factors_source == "cache"
    np.testing.assert_allclose(damped.rows(idx), _reward(world, cache=False, damping=0.5).rows(idx), rtol=1e-12)
    assert not np.allclose(damped.rows(idx), fresh.rows(idx))
    # other fit rows, other tracked modules, other weights: other keys, fitted again
    assert _reward(world, cache=tmp_path, fit_examples=8).factors_source == "fitted"
    assert _reward(world, cache=tmp_path, modules="mlp").factors_source == "fitted"
    from curate.features.tiny import tiny_llama

    assert _reward(world, cache=tmp_path, model=tiny_llama(seed=1)).factors_source == "fitted"
    assert len(list(tmp_path.iterdir())) == 4
    # a fifth entry evicts the least recently used one (the first, last read before the others were written)
    assert _reward(world, cache=tmp_path, fit_examples=6).factors_source == "fitted"
    assert len(list(tmp_path.iterdir())) == 4
    assert _reward(world, cache=tmp_path).factors_source == "fitted"


def test_influence_quad_reward_batches_do_not_matter(world) -> None:
    """Length-sorted micro-batches: a row's reward is the same alone, in any batch and in any order."""
    pool, targets, model, tok = world
    r = _reward(world)
    alone = InfluenceReward(model, tok, pool, targets, factors=r.curv, max_length=40, batch_size=1)
    idx = np.random.default_rng(0).permutation(24)
    np.testing.assert_allclose(r.rows(idx), alone.rows(idx), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(r.rows(idx[::-1]), r.rows(idx)[::-1], rtol=1e-12)


def test_influence_quad_reward_last_blocks_and_sample() -> None:
    names = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("up_proj", "down_proj")]
    assert last_blocks(names, 1) == ["model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"]
    assert last_blocks(names, 10) == names and last_blocks(names, None) == names
    assert last_blocks(["transformer.h.11.mlp.c_fc", "transformer.h.2.mlp.c_fc"], 2) == ["transformer.h.11.mlp.c_fc"]
    with pytest.raises(ParameterError, match="'layers'"):
        last_blocks(["lm_proj"], 2)

    class E(dict):
        def __init__(self, uid: str, n: int, resp: int) -> None:
            super().__init__(input_ids=[0] * n, labels=[0] * n)
            self.uid, self.n_response = uid, resp

    ex = [E(f"u{i:02d}", 10 + (i * 7) % 13, i % 5) for i in range(40)]
    s = fit_sample(ex, 16, seed=3)
    assert len(s) == 16 and all(e.n_response > 0 for e in s)
    assert [len(e["input_ids"]) for e in s] == sorted(len(e["input_ids"]) for e in s)
    # the same rows Curvature's own max_examples sample takes
    live = [e for e in ex if e.n_response > 0]
    idx = torch.randperm(len(live), generator=torch.Generator().manual_seed(3))[:16].sort().values
    assert {e.uid for e in s} == {live[i].uid for i in idx.tolist()}


def test_influence_quad_reward_progress(world, tmp_path, capsys) -> None:
    _reward(world, cache=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "quad: fit EK-FAC on 12 rows" in err and "quad: gradients of 3 targets" in err
    _reward(world, cache=tmp_path, progress=True)
    assert "quad: EK-FAC factors from the cache" in capsys.readouterr().err
    _reward(world, cache=tmp_path, progress=False)
    assert capsys.readouterr().err == ""
