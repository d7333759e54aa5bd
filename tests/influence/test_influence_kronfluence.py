"""Parity with kronfluence 1.0.1 (docs/methods/ekfac.md §14 test 14): float64, empirical Fisher, same damping.

Runs only where kronfluence is installed (the benchmark environment, never a project dependency).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from curate.features.lm import encode_examples
from curate.features.tiny import tiny_llama, tiny_tokenizer
from curate.influence import CausalLMTask, Curvature, pairwise_scores
from curate.schema import make_record, to_frame

QA = [("What is 2+3?", "5"), ("Name a colour.", "Blue."), ("Capital of France?", "Paris."), ("Spell cat.", "c-a-t"),
      ("Add 1 and 1.", "2"), ("Say hi.", "hi"), ("Opposite of up?", "down"), ("Largest planet?", "Jupiter")]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,damping", [("ekfac", None), ("kfac", None), ("ekfac", 1e-3)])
def test_influence_matches_kronfluence(tmp_path, strategy, damping):
    pytest.importorskip("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    rows = to_frame([make_record("sft", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                     for q, a in QA])
    tg = to_frame([make_record("target", task="t", messages=[{"role": "user", "content": q}], answer=a)
                   for q, a in (("What is 4+1?", "5"), ("Capital of Italy?", "Rome."), ("Spell dog.", "d-o-g"))])
    train, queries = encode_examples(rows, tok, max_length=40), encode_examples(tg, tok, max_length=40)
    model = tiny_llama(vocab_size=len(tok), dtype="float64", seed=0)
    names = [n for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    task = CausalLMTask(tok.pad_token_id)

    class KTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return task.loss(model, batch)

        def compute_measurement(self, batch, model):
            return task.loss(model, batch)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    def ds(ex):
        return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in ex]

    curv = Curvature(strategy=strategy, modules=names, fisher="empirical", dtype=torch.float64, batch_size=3,
                     max_examples=None, damping=damping).fit(model, task, train)
    ours = pairwise_scores(curv, model, task, queries, train, batch_size=3).values

    an = Analyzer("parity", model=prepare_model(copy.deepcopy(model), KTask()), task=KTask(), cpu=True,
                  disable_tqdm=True, output_dir=str(tmp_path))
    dl = DataLoaderKwargs(collate_fn=task.collate)
    dt = torch.float64
    an.fit_all_factors("f", dataset=ds(train), per_device_batch_size=3, dataloader_kwargs=dl, overwrite_output_dir=True,
                       factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True,
                                                   activation_covariance_dtype=dt, gradient_covariance_dtype=dt,
                                                   per_sample_gradient_dtype=dt, lambda_dtype=dt))
    an.compute_pairwise_scores("s", factors_name="f", query_dataset=ds(queries), train_dataset=ds(train),
                               per_device_query_batch_size=3, per_device_train_batch_size=3, dataloader_kwargs=dl,
                               overwrite_output_dir=True,
                               score_args=ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dt,
                                                         precondition_dtype=dt, score_dtype=dt))
    theirs = an.load_pairwise_scores("s")["all_modules"].double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9 * np.abs(theirs).max())
