"""CHES / LN-CHES (docs/methods/ches.md §6): identities, positions, padding, planted pairs, modes, contract."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from curate.features.ches_states import (  # noqa: E402
    SideIds,
    ches_from_states,
    ches_from_sums,
    ches_table,
    encode_pairs,
    pair_states,
    response_states,
    response_stats,
)
from curate.features.store import FeatureSet  # noqa: E402
from curate.features.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer  # noqa: E402
from curate.selectors.ches import ChesSelector  # noqa: E402
from curate.testing import check_selector  # noqa: E402

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ 1-2 pure identities
def test_identities_and_mean_form():
    hp = RNG.normal(size=(7, 5))
    hn = RNG.normal(size=(4, 5))
    assert ches_from_states(hp, hp) == (0.0, 0.0)
    c, lc = ches_from_states(hp, hn)
    sp, sn = hp.sum(0), hn.sum(0)
    assert c == pytest.approx(sp @ sn - sp @ sp, rel=1e-12)
    mp, mn = hp.mean(0), hn.mean(0)
    assert lc == pytest.approx(mp @ mn - mp @ mp, rel=1e-12)
    assert lc == pytest.approx(sp @ sn / (7 * 4) - sp @ sp / 49, rel=1e-12)
    cv, lv = ches_from_sums(sp[None], sn[None], np.array([7]), np.array([4]))
    assert cv[0] == pytest.approx(c, rel=1e-12) and lv[0] == pytest.approx(lc, rel=1e-12)
    cv, lv = ches_from_sums(sp[None], sn[None], np.array([0]), np.array([4]))
    assert np.isnan(cv[0]) and np.isnan(lv[0])


def test_raw_ches_grows_with_length_ln_ches_does_not():
    hp = RNG.normal(size=(6, 8))
    s = hp.sum(0)
    prev = None
    for k in range(2, 6):
        c, lc = ches_from_states(hp, np.concatenate([hp] * k))
        assert lc == pytest.approx(0.0, abs=1e-12)
        assert c == pytest.approx((k - 1) * (s @ s), rel=1e-12)  # linear in the number of copies
        if prev is not None:
            assert c - prev == pytest.approx(s @ s, rel=1e-12)
        prev = c


def test_float64_accumulation_stays_finite_where_float16_overflows():
    h = np.full((300, 16), 1e3)
    c, lc = ches_from_states(h, h[:150])
    assert np.isfinite(c) and np.isfinite(lc)
    s16 = torch.tensor(h, dtype=torch.float16).sum(0)
    assert not torch.isfinite(s16 @ s16)  # why sums and products are float64


# ------------------------------------------------------------------ 5 positions
def _seq(rng, n, vocab=100):
    return [int(x) for x in rng.integers(0, vocab - 2, size=n)]


# sdpa: Llama's eager attention runs its softmax in float32 (a ~1e-7 difference between padded and
# unpadded rows); sdpa stays in float64, so the 1e-10 batching tolerance is meaningful.
@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(vocab_size=100, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=48, seed=1)
    m.set_attn_implementation("sdpa")
    return m


@pytest.fixture(scope="module")
def gpt2():
    m = tiny_gpt2(vocab_size=100, hidden=32, layers=2, heads=2, seed=2)
    m.set_attn_implementation("sdpa")
    return m


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_captured_states_are_lm_head_inputs_and_give_the_response_logprob(which, request):
    model = request.getfixturevalue(which)
    rng = np.random.default_rng(3)
    p, r = _seq(rng, 6), _seq(rng, 9)
    h, logits = response_states(model, p, r)
    assert h.dtype == torch.float64 and h.shape == (9, 32)
    head = model.get_output_embeddings()
    assert torch.allclose(head(h.to(head.weight.dtype)), logits, atol=1e-12)
    # independent: hidden_states[-1] (post-norm for both families) and a loop over positions of full logits
    with torch.no_grad():
        out = model(input_ids=torch.tensor([p + r]), output_hidden_states=True)
    assert torch.allclose(out.hidden_states[-1][0, 5:14].double(), h, atol=1e-12)
    ref = 0.0
    for t in range(len(r)):
        row = out.logits[0, len(p) - 1 + t].double()
        ref += float(row[r[t]] - torch.logsumexp(row, 0))
    st = response_stats(model, [SideIds(p, r)], padding="none")
    assert st.logps[0] == pytest.approx(ref, abs=1e-10)
    assert st.counts[0] == 9
    np.testing.assert_allclose(st.sums[0], h.sum(0).numpy(), atol=1e-12)


def test_append_eos_counts_eos_and_empty_response_has_no_tokens():
    tok = tiny_tokenizer()
    table = pl.DataFrame({
        "uid": ["a", "b"], "kind": ["preference"] * 2,
        "prompt": [[{"role": "user", "content": "hi"}]] * 2,
        "chosen": [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": " "}]],
        "rejected": [[{"role": "assistant", "content": "de"}]] * 2,
    })
    (c, r), (c2, _) = encode_pairs(table, tok)
    assert c.response[-1] == tok.eos_token_id and len(c.response) == 4 and len(r.response) == 3
    assert tok.decode(c.prompt).endswith("<|im_start|>assistant\n")
    assert c2.response == []
    (c, r), _ = encode_pairs(table, tok, append_eos=False)
    assert len(c.response) == 3
    (c, _), _ = encode_pairs(table, tok, max_length=10)
    assert len(c.prompt) + len(c.response) <= 10 and c.truncated and len(c.response) == 4


# ------------------------------------------------------------------ 4 padding
def _pool(rng, n=7):
    return [SideIds(_seq(rng, int(rng.integers(2, 9))), _seq(rng, int(rng.integers(1, 12)))) for _ in range(n)]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_batched_equals_unbatched(which, request):
    model = request.getfixturevalue(which)
    seqs = _pool(np.random.default_rng(4))
    ref = response_stats(model, seqs, padding="none", pad_token_id=99)
    for padding in ("left", "right"):
        got = response_stats(model, seqs, padding=padding, batch_size=4, pad_token_id=99)
        np.testing.assert_allclose(got.sums, ref.sums, atol=1e-10, rtol=0)
        np.testing.assert_allclose(got.logps, ref.logps, atol=1e-10, rtol=0)
        assert (got.counts == ref.counts).all()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_shared_prompt_prefix_equals_unbatched(which, request):
    """padding="prefix": one prompt pass per pair and both responses on its KV cache give the values
    of one-at-a-time full forwards; identical responses stay exactly equal; pairs with different
    prompts or an empty side fall back and still match."""
    model = request.getfixturevalue(which)
    rng = np.random.default_rng(7)
    pairs = []
    for k in range(9):
        prompt = _seq(rng, int(rng.integers(2, 12)))
        a, b = _seq(rng, int(rng.integers(1, 9))), _seq(rng, int(rng.integers(1, 9)))
        if k == 1:
            b = list(a)  # identical responses
        if k == 2:
            a, b = [a[0]], [b[0]]  # one-token responses: no continuation pass
        if k == 3:
            a = [a[0]]  # one side one token, the other longer
        pairs.append((SideIds(prompt, a), SideIds(prompt if k != 4 else prompt[1:], b)))  # k=4: prompts differ
    pairs.append((SideIds(_seq(rng, 4), []), SideIds(_seq(rng, 4), _seq(rng, 3))))  # an empty side
    ref = pair_states(model, pairs, padding="none", pad_token_id=99)
    got = pair_states(model, pairs, padding="prefix", pad_token_id=99)
    np.testing.assert_allclose(got, ref, atol=1e-10, rtol=0)
    assert (got[1, 0] == got[1, 1]).all()
    with pytest.raises(Exception, match="padding"):
        pair_states(model, pairs, padding="middle")


def test_left_padding_without_position_ids_changes_gpt2(gpt2):
    """Why the position-id rule exists: GPT-2's absolute positions shift under left padding."""
    p, r = [5, 6, 7], [8, 9, 10, 11]
    ids = torch.tensor([[99, 99, 99] + p + r])
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        bad = gpt2(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1][0, 5:9]
    good, _ = response_states(gpt2, p, r)
    assert (bad.double() - good).abs().max() > 1e-6


def test_reference_end_indexing_on_right_padding_differs(llama):
    """Indexing response states from the sequence end (the reference's rule for left padding) on a
    right-padded batch sums pad-token states: the code must not do that, and does not."""
    seqs = [SideIds([1, 2, 3], [4, 5, 6, 7, 8, 9]), SideIds([1, 2], [3, 4])]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 99, 99, 99, 99, 99]])
    mask = (ids != 99).long()
    with torch.no_grad():
        h = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    wrong = h[1, -3:-1].double().sum(0).numpy()  # last R+1 positions minus the final one
    ref = response_stats(llama, seqs, padding="none", pad_token_id=99)
    right = response_stats(llama, seqs, padding="right", batch_size=2, pad_token_id=99)
    assert np.abs(wrong - ref.sums[1]).max() > 1e-6
    np.testing.assert_allclose(right.sums, ref.sums, atol=1e-10)


# ------------------------------------------------------------------ 3 planted near-duplicates
def _planted(model, n=200, seed=5):
    rng = np.random.default_rng(seed)
    near, unrel = [], []
    for _ in range(n):
        x, yp = _seq(rng, 6), _seq(rng, 8)
        ye = list(yp)
        k = int(rng.integers(0, 7))  # an edit of the last token changes no state (it is never an input)
        ye[k] = (ye[k] + 1 + int(rng.integers(0, 90))) % 98
        near.append((SideIds(x, yp), SideIds(x, ye)))
        unrel.append((SideIds(x, yp), SideIds(x, _seq(rng, 8))))
    vn = pair_states(model, near, batch_size=64, pad_token_id=99)
    vu = pair_states(model, unrel, batch_size=64, pad_token_id=99)
    return vn, vu


def test_near_duplicates_score_higher_and_the_filter_keeps_unrelated(llama):
    vn, vu = _planted(llama)
    ln_n, ln_u = ches_table(vn)["ln_ches"], ches_table(vu)["ln_ches"]
    assert (ln_n > ln_u).mean() >= 0.9
    pool = np.concatenate([vn[:100], vu[:100]])
    uids = np.array([f"n{i:03d}" for i in range(100)] + [f"u{i:03d}" for i in range(100)], dtype=object)
    table = pl.DataFrame({"uid": uids.tolist()})
    res = ChesSelector(keep_bottom_fraction=0.05).select(table, {"ches": FeatureSet("ches/states", uids, pool)}, 1.0)
    kept = res.kept_uids
    assert len(kept) == 10 and all(u.startswith("u") for u in kept)
    f = res.frame
    assert set(f.columns) >= {"ches__ches", "ches__ln_ches", "ches__len_chosen", "ches__len_rejected"}
    np.testing.assert_allclose(f["score"].to_numpy(), -f["ches__ln_ches"].to_numpy())
    assert set(f.filter(~pl.col("keep"))["reason"]) == {"dropped_high_ches"}
    # raw CHES is available as the measure too
    raw = ChesSelector(measure="ches", keep_bottom_fraction=0.05).select(
        table, {"ches": FeatureSet("ches/states", uids, pool)}, 1.0)
    np.testing.assert_allclose(raw.frame["score"].to_numpy(), -f["ches__ches"].to_numpy())


def test_identical_responses_score_zero(llama):
    x, y = [1, 2, 3], [4, 5, 6, 7]
    v = pair_states(llama, [(SideIds(x, y), SideIds(x, list(y)))], pad_token_id=99)
    cols = ches_table(v)
    assert cols["ches"][0] == 0.0 and cols["ln_ches"][0] == 0.0


# ------------------------------------------------------------------ 7 modes
def _synthetic(n, seed=0):
    """Feature values whose LN-CHES is exactly -a_i (chosen sum = e1, rejected = (1 - a_i) e1, R = 1)."""
    rng = np.random.default_rng(seed)
    a = rng.permutation(n).astype(float) + 1.0
    v = np.zeros((n, 2, 4))
    v[:, :, 0] = 1
    v[:, 0, 2] = 1.0
    v[:, 1, 2] = 1.0 - a
    uids = np.array([f"{i:04x}" for i in rng.permutation(10 * n)[:n]], dtype=object)
    return pl.DataFrame({"uid": uids.tolist()}), {"ches": FeatureSet("ches/states", uids, v)}, -a


def test_modes_keep_exactly_the_documented_rows():
    table, feats, m = _synthetic(370)
    res = ChesSelector(keep_bottom_fraction=0.05).select(table, feats, 1.0)
    assert res.n_kept == 19
    assert set(res.kept_uids) == set(np.asarray(table["uid"])[np.argsort(m)[:19]])
    table, feats, m = _synthetic(100, seed=1)
    res = ChesSelector(drop_top_fraction=0.1).select(table, feats, 1.0)
    dropped = set(res.frame.filter(~pl.col("keep"))["uid"])
    assert dropped == set(np.asarray(table["uid"])[np.argsort(-m)[:10]])
    res = ChesSelector(keep_window=(0.5, 20)).select(table, feats, 1.0)
    order = np.asarray(table["uid"])[np.argsort(m)]
    assert set(res.kept_uids) == set(order[40:60])
    res = ChesSelector(threshold=-50.5).select(table, feats, 1.0)
    assert res.n_kept == 50
    # the budget caps the kept count, lowest measure first
    res = ChesSelector(drop_top_fraction=0.1).select(table, feats, 5)
    assert res.kept_uids == order[:5].tolist()
    assert res.frame.filter(pl.col("reason") == "over_budget_cap").height == 85


def test_ties_go_to_the_smaller_uid_and_shuffle_is_invariant():
    uids = np.array(["b", "a", "d", "c"], dtype=object)
    v = np.zeros((4, 2, 4))
    v[:, :, 0] = 1
    v[:, 0, 2] = 1.0
    v[:, 1, 2] = [0.0, 0.0, 1.0, 1.0]  # a, b tie low; c, d tie at 0 (identical)
    table = pl.DataFrame({"uid": uids.tolist()})
    res = ChesSelector(keep_bottom_fraction=0.25).select(table, {"ches": FeatureSet("x", uids, v)}, 1.0)
    assert res.kept_uids == ["a"]
    shuffled = table[[2, 0, 3, 1]]
    res2 = ChesSelector(keep_bottom_fraction=0.25).select(shuffled, {"ches": FeatureSet("x", uids, v)}, 1.0)
    assert res2.kept_uids == ["a"]
    reasons = dict(zip(res.frame["uid"], res.frame["reason"], strict=True))
    assert reasons["c"] == "dropped_high_ches:identical_responses"


def test_no_response_rows_get_minus_inf_and_a_reason():
    table, feats, _ = _synthetic(10)
    v = np.array(feats["ches"].values)
    v[3, 1, :] = 0.0
    res = ChesSelector(keep_bottom_fraction=1.0).select(table, {"ches": FeatureSet("c", feats["ches"].uids, v)}, 1.0)
    row = res.frame.row(3, named=True)
    assert row["reason"] == "no_response_tokens" and row["score"] == -np.inf and not row["keep"]
    assert res.n_kept == 9


def test_contract_and_parameter_errors():
    check_selector(ChesSelector)
    check_selector(ChesSelector, {"drop_top_fraction": 0.2})
    check_selector(ChesSelector, {"measure": "ches", "keep_window": (0.5, 5)})
    from curate.errors import ParameterError

    with pytest.raises(ParameterError, match="'drop_top_fraction' parameter of CHES"):
        ChesSelector(keep_bottom_fraction=0.1, drop_top_fraction=0.1)


def test_ches_states_step_padding_choice():
    from curate.errors import ParameterError
    from curate.selectors.ches import ChesStates

    assert ChesStates().padding == "auto" and ChesStates(padding="prefix").padding == "prefix"
    with pytest.raises(ParameterError, match="padding"):
        ChesStates(padding="middle")
