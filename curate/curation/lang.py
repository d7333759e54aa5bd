"""Language identification: the ``lang_id`` step (Lingua, models shipped inside its wheel).

Method: Lingua (``lingua-language-detector``, Apache-2.0; Stahl 2021-2025) scores a text with
character 1- to 5-gram language models of 75 languages and returns a normalised confidence per
language; short texts are where it beats fastText/CLD-style detectors most (its own benchmark).
All models are in the wheel, so nothing is downloaded. We take the top language and its confidence
for the prompt and for the response of every row, each text cut to ``max_chars`` characters
(accuracy saturates long before; the run time grows with length).

Columns: ``prompt_language``, ``prompt_confidence``, ``response_language``,
``response_confidence`` and ``language``, the row's language for ``keep`` and for ``by: language``
budgets: the prompt's (the language a user writes in), else the response's when the prompt is
undetermined. ``und`` marks a text with fewer than ``min_letters`` letters or a confidence below
``min_confidence``. Rows dropped: ``language: <code> not in [...]`` when ``keep`` is set;
``lang_mismatch: prompt <a>, response <b>`` with ``drop_mismatch`` when both sides are determined
and differ (translation tasks legitimately do this, so it is off by default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import texts

UNDETERMINED = "und"


@functools.lru_cache(maxsize=4)
def detector(languages: tuple[str, ...] | None = None, low_accuracy: bool = False) -> Any:
    """A Lingua detector over ``languages`` (ISO 639-1 codes; None = all 75), built once per process.

    Raises:
        ParameterError: an unknown language code.
    """
    lingua = require("lingua", "the lang_id step")
    if languages:
        codes = []
        for code in languages:
            iso = getattr(lingua.IsoCode639_1, str(code).upper(), None)
            if iso is None:
                raise param_error("lang_id", "languages", "ISO 639-1 codes Lingua knows (en, de, zh, ...)", code)
            codes.append(iso)
        if len(codes) < 2:
            raise param_error("lang_id", "languages", "at least two codes (or null for all)", list(languages))
        builder = lingua.LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
    else:
        builder = lingua.LanguageDetectorBuilder.from_all_languages()
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def identify(text_list: Sequence[str], *, languages: Sequence[str] | None = None, low_accuracy: bool = False,
             max_chars: int = 300, min_letters: int = 3, min_confidence: float = 0.0) -> tuple[list[str], np.ndarray]:
    """(ISO 639-1 code or ``und``, confidence) of each text."""
    det = detector(tuple(languages) if languages else None, low_accuracy)
    cut = [t[:max_chars] for t in text_list]
    scored = [i for i, t in enumerate(cut) if sum(c.isalpha() for c in t) >= min_letters]
    langs = [UNDETERMINED] * len(cut)
    conf = np.zeros(len(cut), dtype=np.float64)
    if scored:
        values = det.compute_language_confidence_values_in_parallel([cut[i] for i in scored])
        for i, vals in zip(scored, values):
            if vals and vals[0].value >= min_confidence and vals[0].value > 0:
                langs[i] = vals[0].language.iso_code_639_1.name.lower()
                conf[i] = float(vals[0].value)
    return langs, conf


@register_step("lang_id")
@dataclass(frozen=True, kw_only=True)
class LangId:
    """Language and confidence of each row's prompt and response (Lingua, offline).

    Parameters:
        keep: ISO 639-1 codes of the languages to keep (e.g. ``[en, de]``); null keeps every row.
        drop_mismatch: drop rows whose prompt and response languages differ (default false).
        languages: restrict the detector to these codes (faster, and no confusion with languages
            the data cannot hold); null = all 75 Lingua languages.
        min_confidence: a top confidence below this is ``und`` (default 0.0).
        min_letters: texts with fewer letters are ``und`` (default 3).
        max_chars: characters of each text the detector reads (default 300).
        low_accuracy: Lingua's low-accuracy mode (trigrams only: about 2x faster, worse on short texts).
    """

    keep: tuple[str, ...] | list[str] | None = None
    drop_mismatch: bool = False
    languages: tuple[str, ...] | list[str] | None = None
    min_confidence: float = 0.0
    min_letters: int = 3
    max_chars: int = 300
    low_accuracy: bool = False

    def __post_init__(self) -> None:
        for name in ("keep", "languages"):
            v = getattr(self, name)
            if v is None:
                continue
            vals = [v] if isinstance(v, str) else v
            if not isinstance(vals, (list, tuple)) or not vals or not all(isinstance(c, str) and c for c in vals):
                raise param_error("lang_id", name, "a non-empty list of ISO 639-1 codes or null", v)
            object.__setattr__(self, name, tuple(c.lower() for c in vals))
        for name in ("drop_mismatch", "low_accuracy"):
            if not isinstance(getattr(self, name), bool):
                raise param_error("lang_id", name, "true or false", getattr(self, name))
        c = self.min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= c <= 1.0:
            raise param_error("lang_id", "min_confidence", "in [0, 1]", c)
        for name, lo in (("min_letters", 0), ("max_chars", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise param_error("lang_id", name, f"an integer >= {lo}", v)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        out = lang_table(table, self)
        counts = out["language"].value_counts(sort=True).rows()
        ctx.stats["languages"] = {str(k): int(v) for k, v in counts}
        return out


def lang_table(table: pl.DataFrame, step: LangId | None = None, **params: Any) -> pl.DataFrame:
    """``uid, keep, reason`` and the language columns of ``table`` (``step`` or ``LangId(**params)``)."""
    step = step or LangId(**params)
    kw = {"languages": step.languages, "low_accuracy": step.low_accuracy, "max_chars": step.max_chars,
          "min_letters": step.min_letters, "min_confidence": step.min_confidence}
    p_lang, p_conf = identify(texts(table, "prompt"), **kw)
    r_lang, r_conf = identify(texts(table, "response"), **kw)
    lang = [p if p != UNDETERMINED else r for p, r in zip(p_lang, r_lang)]
    reasons = []
    for p, r, g in zip(p_lang, r_lang, lang):
        if step.keep is not None and g not in step.keep:
            reasons.append(f"language: {g} not in [{', '.join(step.keep)}]")
        elif step.drop_mismatch and UNDETERMINED not in (p, r) and p != r:
            reasons.append(f"lang_mismatch: prompt {p}, response {r}")
        else:
            reasons.append("")
    return pl.DataFrame({
        "uid": table["uid"], "keep": [r == "" for r in reasons], "reason": reasons, "language": lang,
        "prompt_language": p_lang, "prompt_confidence": p_conf, "response_language": r_lang,
        "response_confidence": r_conf,
    }, schema_overrides={"reason": pl.Utf8, "language": pl.Utf8})
