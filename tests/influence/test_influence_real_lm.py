"""Real-model path: SmolLM2 MLP layers, 3 short rows (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from curate.schema import make_record, to_frame


@pytest.mark.slow
def test_influence_smollm2_fit_and_score(tmp_path):
    pytest.importorskip("curate.features.lm")
    import torch

    torch.set_num_threads(2)
    from curate.influence.api import fit_table, score_tables

    rows = to_frame([
        make_record("sft", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in [("What is 2+3?", "5"), ("Name a colour.", "Blue."), ("Capital of France?", "Paris.")]
    ])
    target = to_frame([make_record("target", task="t", messages=[{"role": "user", "content": "What is 4+1?"}],
                                   answer="5")])
    out = fit_table(rows, tmp_path / "f", modules="model.layers.0.mlp.down_proj,model.layers.1.mlp.down_proj",
                    max_examples=3, batch_size=3, max_length=48)
    s = score_tables(rows, target, out, max_length=48, batch_size=2)
    assert s.values.shape == (1, 3) and np.isfinite(s.values).all()
    assert s.train_uids == rows["uid"].to_list() and s.query_uids == target["uid"].to_list()
    no_answer = to_frame([make_record("target", task="t", messages=[{"role": "user", "content": "Hi?"}])])
    with pytest.raises(Exception, match="without response tokens"):
        score_tables(rows, no_answer, out, max_length=48)
