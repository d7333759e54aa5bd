"""The lang_id step: planted languages found, keep / mismatch reasons, and per-language budgets."""

from __future__ import annotations

import polars as pl
import pytest

pytest.importorskip("lingua")

from curate.curation import LangId, lang_table  # noqa: E402
from curate.errors import ParameterError  # noqa: E402
from curate.pipeline.step import StepContext  # noqa: E402
from curate.schema import make_record, to_frame  # noqa: E402
from curate.selectors import SELECTORS  # noqa: E402

PLANTED = [
    ("en", "Explain why the sky appears blue during the day.", "Sunlight is scattered by the molecules of the air."),
    ("de", "Erkläre, warum der Himmel am Tag blau erscheint.", "Das Sonnenlicht wird von den Luftmolekülen gestreut."),
    ("fr", "Explique pourquoi le ciel paraît bleu pendant la journée.", "La lumière du soleil est diffusée par l'air."),
    ("es", "Explica por qué el cielo se ve azul durante el día.", "La luz del sol se dispersa en las moléculas del aire."),
    ("ru", "Объясни, почему небо днём кажется голубым.", "Солнечный свет рассеивается молекулами воздуха."),
    ("ja", "昼間に空が青く見えるのはなぜですか。", "太陽の光が空気の分子によって散乱されるからです。"),
]

# the detector restricted to the planted languages loads 6 models instead of 75 (a fast default test)
LANGS = ["en", "de", "fr", "es", "ru", "ja"]


def _table(pairs) -> pl.DataFrame:
    return to_frame([make_record("sft", messages=[{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                     for p, r in pairs])


def test_planted_languages_and_keep():
    table = _table([(p, r) for _, p, r in PLANTED])
    out = LangId(keep=["en", "de"], languages=LANGS).apply(table, ctx := StepContext())
    assert out["language"].to_list() == [code for code, _, _ in PLANTED]
    assert out["response_language"].to_list() == [code for code, _, _ in PLANTED]
    assert (out["prompt_confidence"] > 0).all() and out["keep"].to_list() == [True, True] + [False] * 4
    assert out["reason"][2] == "language: fr not in [en, de]"
    assert ctx.stats["languages"] == {c: 1 for c, _, _ in PLANTED}


def test_mismatch_and_undetermined():
    table = _table([("Translate into German: the cat sleeps on the sofa.", "Die Katze schläft auf dem Sofa."),
                    ("42 + 17 = ?", "Die Antwort ist neunundfünfzig, also genau 59.")])
    out = lang_table(table, drop_mismatch=True, languages=LANGS)
    assert out["reason"][0] == "lang_mismatch: prompt en, response de"
    # a prompt without letters is undetermined; the row takes the response's language and is kept
    assert out["prompt_language"][1] == "und" and out["language"][1] == "de" and out["keep"][1]
    assert lang_table(table, languages=LANGS)["keep"].all()  # mismatches are reported only when asked


def test_params_validated():
    with pytest.raises(ParameterError, match="'keep' parameter of lang_id"):
        LangId(keep=[])
    with pytest.raises(ParameterError, match="'languages' parameter of lang_id"):
        lang_table(_table([("hello there friend", "hi")]), languages=["en", "xx"])


def test_per_language_budget_on_step_columns():
    pairs = [PLANTED[i % 2][1:] for i in range(12)]  # 6 en + 6 de, distinct by a suffix
    table = _table([(p + f" ({i})", r) for i, (p, r) in enumerate(pairs)])
    cols = lang_table(table, languages=LANGS).drop("keep", "reason")
    pool = table.join(cols.rename({c: f"lang_id__{c}" for c in cols.columns if c != "uid"}), on="uid")
    res = SELECTORS["random"]().select(pool, {}, {"n": 5, "by": "language", "ratios": {"en": 0.6, "de": 0.4}})
    kept = res.frame.join(pool.select("uid", "lang_id__language"), on="uid").filter(pl.col("keep"))
    assert dict(kept["lang_id__language"].value_counts().rows()) == {"en": 3, "de": 2}
