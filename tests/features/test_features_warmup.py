"""Warm-up training (LESS §4.1, docs/methods/gradient-features.md §7): loss, checkpoint layout, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
torch.set_num_threads(2)

from curate.errors import ParameterError, SchemaError  # noqa: E402
from curate.features.checkpoints import lr_weights, read_checkpoint, resolve_checkpoints  # noqa: E402
from curate.features.gradients import (  # noqa: E402
    GradFeaturesStep,
    adam_precondition,
    compute_grad_features,
    load_adam_state,
    per_example_grads,
    select_parameters,
)
from curate.features.lm import encode_examples, load_causal_lm  # noqa: E402
from curate.features.lm_batches import row_losses  # noqa: E402
from curate.features.projection import Projector  # noqa: E402
from curate.features.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from curate.features.warmup import (  # noqa: E402
    WarmupConfig,
    WarmupStep,
    lr_at,
    run_warmup,
    sample_rows,
)
from curate.schema import make_record, to_frame  # noqa: E402


def _pool(n: int = 24, offset: int = 0):
    recs = []
    for i in range(offset, offset + n):
        recs.append(make_record("sft", messages=[{"role": "user", "content": f"q{i}: say abc"},
                                                 {"role": "assistant", "content": "abc abc abc."}]))
    return to_frame(recs)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tinylm_warmup")
    tiny_llama(vocab_size=len(tok), hidden=16, layers=3, intermediate=24, dtype="float32", seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


CFG = dict(fraction=0.5, min_rows=0, epochs=3, lr=2e-2, warmup_ratio=0.1, batch_size=4, micro_batch_size=2,
           max_length=48, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_layers=2, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("warm") / "ckpts"
    table = _pool()
    return table, run_warmup(table, out, model=str(tiny_folder), config=WarmupConfig(**CFG), device="cpu")


def _mean_loss(model, examples):
    ids = [e for e in examples if e.n_response]
    from curate.features.lm_batches import collate

    with torch.no_grad():
        x, y = collate(ids, 0)
        return float(row_losses(model(input_ids=x, use_cache=False).logits, y, "mean").mean())


def test_sample_is_seeded_order_invariant_and_sized():
    uids = [f"u{i:03d}" for i in range(100)]
    a = sample_rows(uids, 0.05, 20, seed=1)
    assert len(a) == 20 and len(set(a.tolist())) == 20
    perm = np.random.default_rng(0).permutation(100)
    b = sample_rows([uids[i] for i in perm], 0.05, 20, seed=1)
    assert {uids[i] for i in a} == {uids[perm[i]] for i in b}  # same rows whatever the order
    assert set(sample_rows(uids, 0.05, 20, seed=2).tolist()) != set(a.tolist())
    assert len(sample_rows(uids, 0.3, 5, seed=0)) == 30 and len(sample_rows(uids, 0.05, 500, seed=0)) == 100


def test_lr_schedule_matches_hand_values():
    # total 10 steps, warm-up ceil(0.2*10) = 2: 0, p/2, then linear decay over 8 steps
    got = [lr_at(s, 10, 1.0, 0.2) for s in range(10)]
    np.testing.assert_allclose(got, [0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert lr_at(2, 10, 1.0, 0.2, "cosine") == pytest.approx(1.0)
    assert lr_at(6, 10, 1.0, 0.2, "cosine") == pytest.approx(0.5)
    assert lr_at(9, 10, 1.0, 0.2, "constant") == 1.0


def test_loss_decreases_and_layout(trained, tiny_folder, tok):
    table, res = trained
    assert [p.name for p in res.checkpoints] == ["ckpt1", "ckpt2", "ckpt3"]
    assert res.summary["n_train"] == 12 and res.n_steps == 9
    assert res.epoch_losses[-1] < res.epoch_losses[0]
    # the per-epoch mean lr is the mean of the hand schedule (9 steps, 1 warm-up step)
    sched = [lr_at(s, 9, CFG["lr"], CFG["warmup_ratio"]) for s in range(9)]
    np.testing.assert_allclose(res.mean_lrs, [np.mean(sched[0:3]), np.mean(sched[3:6]), np.mean(sched[6:9])])
    for c in res.checkpoints:
        assert {"adapter_config.json", "adapter_model.safetensors", "adam_state.pt", "checkpoint.json"} <= {
            f.name for f in c.iterdir()}
    # the last checkpoint loaded into a fresh base model lowers the loss on the training rows
    sample = table.filter(table["uid"].is_in(res.summary["sample_uids"]))
    base, tk = load_causal_lm(str(tiny_folder), device="cpu")
    enc = encode_examples(sample, tk, max_length=48)
    before = _mean_loss(base, enc)
    model, meta, opt = read_checkpoint(load_causal_lm(str(tiny_folder), device="cpu")[0], res.checkpoints[-1])
    assert meta["mean_lr"] == res.mean_lrs[-1] and opt.name == "adam_state.pt"
    assert _mean_loss(model, enc) < before - 0.1
    # LoRA only on the top 2 of 3 blocks: no adapter (and no moment) for block 0
    layout = select_parameters(model, "lora")
    assert layout.names and not any(".layers.0." in n for n in layout.names)
    assert all(".layers.1." in n or ".layers.2." in n for n in layout.names)


def test_checkpoint_round_trip_into_adam_features(trained, tiny_folder, tok):
    _, res = trained
    ckpt = res.checkpoints[1]
    model, _, opt = read_checkpoint(load_causal_lm(str(tiny_folder), device="cpu")[0], ckpt)
    layout = select_parameters(model, "lora")
    m, v = load_adam_state(opt, layout)
    raw = torch.load(str(opt), weights_only=True)
    assert set(raw["exp_avg"]) == set(layout.names)  # saved by the names the gradient code selects
    np.testing.assert_array_equal(m.numpy(), torch.cat([raw["exp_avg"][n].reshape(-1) for n in layout.names]).numpy())
    assert float(v.min()) >= 0 and float(v.max()) > 0 and float(m.abs().max()) > 0
    # the optimizer state is the one Adam built: v_c equals the second moment of the last step recomputed
    # by the name-keyed path as well as the int-keyed (HF optimizer.pt) path
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    int_state = {"state": {i: {"exp_avg": raw["exp_avg"][n], "exp_avg_sq": raw["exp_avg_sq"][n]}
                           for i, n in enumerate(trainable)}, "param_groups": [{"params": list(range(len(trainable)))}]}
    m2, v2 = load_adam_state(int_state, layout, trainable_names=trainable)
    assert torch.equal(m, m2) and torch.equal(v, v2)
    # the adam variant of grad features uses exactly these moments (identity projection, hand formula)
    recs = [make_record("sft", messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "yz"}])]
    enc = encode_examples(recs, tok, max_length=48)
    proj = Projector(layout.n_params, None, seed=0, layout_hash=layout.hash)
    got = compute_grad_features(model, enc, layout=layout, projector=proj, variant="adam", adam_state=(m, v),
                                normalize=False)
    g, _ = per_example_grads(model, layout, enc, method="loop")
    want = adam_precondition(g.double(), m.double(), v.double()).numpy()
    np.testing.assert_allclose(got.values, want, rtol=1e-4, atol=1e-7)


def test_same_seed_identical_checkpoints_and_cache(trained, tiny_folder, tmp_path):
    table, res = trained
    again = run_warmup(table, tmp_path / "again", model=str(tiny_folder), config=WarmupConfig(**CFG), device="cpu")
    for a, b in zip(res.checkpoints, again.checkpoints, strict=True):
        from safetensors.torch import load_file

        sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        oa, ob = torch.load(str(a / "adam_state.pt")), torch.load(str(b / "adam_state.pt"))
        assert all(torch.equal(oa[w][k], ob[w][k]) for w in oa for k in oa[w])
        assert json.loads((a / "checkpoint.json").read_text()) == json.loads((b / "checkpoint.json").read_text())
    assert again.epoch_losses == res.epoch_losses
    cached = run_warmup(table, tmp_path / "again", model=str(tiny_folder), config=WarmupConfig(**CFG), device="cpu")
    assert cached.cached and cached.mean_lrs == res.mean_lrs
    other = run_warmup(table, tmp_path / "other", model=str(tiny_folder), config=WarmupConfig(**{**CFG, "seed": 1}),
                       device="cpu")
    assert other.summary["sample_uids"] != res.summary["sample_uids"]


def test_refuses_foreign_folder_and_bad_params(tiny_folder, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(SchemaError, match="not a warm-up output"):
        run_warmup(_pool(4), tmp_path / "x", model=str(tiny_folder), config=WarmupConfig(**CFG), device="cpu")
    with pytest.raises(FileNotFoundError):
        run_warmup(_pool(4), tmp_path / "y", model=str(tmp_path / "nope"), device="cpu")
    for bad, name in (({"fraction": 0}, "fraction"), ({"epochs": 0}, "epochs"), ({"schedule": "step"}, "schedule"),
                      ({"lora_layers": 0}, "lora_layers"), ({"lr": -1.0}, "lr")):
        with pytest.raises(ParameterError, match=f"'{name}' parameter of warmup"):
            WarmupConfig(**bad)
    with pytest.raises(ParameterError, match="'model' parameter of warmup"):
        WarmupStep(model=str(tmp_path / "nope"))
    with pytest.raises(ParameterError, match="'save_as'"):
        WarmupStep(save_as="../x")


def test_recipe_steps_warmup_then_adam_features(tiny_folder, tmp_path):
    from curate.features.store import FeatureStore
    from curate.pipeline.step import StepContext, check_step_output

    table = _pool(12)
    targets = to_frame([make_record("target", messages=[{"role": "user", "content": "q?"}], answer="abc", task="t")])
    ctx = StepContext(seed=0, features=FeatureStore(tmp_path / "features"), targets=targets, device="cpu",
                      step_dir=tmp_path / "s1")
    cfg = {k: v for k, v in CFG.items() if k != "seed"}
    warm = WarmupStep(model=str(tiny_folder), **{**cfg, "epochs": 2})
    out = check_step_output("warmup", table, warm.apply(table, ctx))
    assert out["keep"].all() and int(out["in_warmup"].sum()) == 6
    ckpts = resolve_checkpoints(["from_step"], ctx.features.root)
    assert [c.name for c in ckpts] == ["ckpt1", "ckpt2"]
    assert resolve_checkpoints([str(ckpts[0].parent)]) == ckpts  # the folder itself expands the same way
    step = GradFeaturesStep(model=str(tiny_folder), checkpoints="from_step", variant="adam", proj_dim=8, max_length=48,
                            batch_size=4, device="cpu")
    out = check_step_output("grads", table, step.apply(table, ctx))
    fs = ctx.features["grad/adam"]
    assert fs.values.shape == (12, 2, 8) and ctx.features["grad/sgd/targets"].values.shape == (1, 2, 8)
    summary = json.loads((ckpts[0].parent / "warmup.json").read_text())
    np.testing.assert_allclose(fs.meta["lr_weights"], lr_weights(summary["mean_lrs"]))
    np.testing.assert_allclose(np.linalg.norm(fs.values, axis=2), 1, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="warm-up"):
        resolve_checkpoints(["from_step:other"], ctx.features.root)


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_smollm2_warmup_small(data_dir, tmp_path):
    rows = json.loads((data_dir / "alpaca" / "alpaca_5000.json").read_text())[:8]
    table = to_frame([make_record("sft", messages=[{"role": "user", "content": r["instruction"]},
                                                   {"role": "assistant", "content": r["output"]}]) for r in rows])
    cfg = WarmupConfig(fraction=1.0, min_rows=0, epochs=1, batch_size=4, max_length=64, lora_layers=2, lr=1e-4)
    res = run_warmup(table, tmp_path / "ck", model="default", config=cfg, device="cpu")
    assert res.n_steps == 2 and np.isfinite(res.epoch_losses).all()
    model, _, opt = read_checkpoint(load_causal_lm("default", device="cpu")[0], res.checkpoints[0])
    layout = select_parameters(model, "lora")
    assert layout.n_params == 2 * (9216 + 6144 + 6144 + 9216)  # r=8 on q,k,v,o of the top 2 of 30 blocks
    m, v = load_adam_state(opt, layout)
    assert m.shape == (layout.n_params,) and float(v.max()) > 0
