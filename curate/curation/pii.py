"""PII detection and redaction: emails, phone numbers, IPv4/IPv6, credit cards, API keys/secrets.

Method: regular-expression detectors as in the BigCode PII pipeline (Allal et al., 2023,
"SantaCoder", section 3 and the StarCoder PII redaction tooling: emails, IP addresses, keys
found by pattern plus an entropy test) and Presidio-style checksum validation (Luhn for card
numbers). We deviate by keeping the detectors dependency-free (no NER model: names and addresses
are out of scope) and by requiring separators in phone numbers so plain numbers in maths and
code are not flagged.

Actions: ``flag`` (keep rows, report counts), ``drop`` (drop rows with PII) and ``redact``
(keep rows; the redacted turns come back in the ``redacted`` column as JSON and
:func:`redact_table` returns a table with the text replaced by ``[EMAIL]``, ``[PHONE]`` ...).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext

PII_TYPES = ("email", "phone", "ip_address", "credit_card", "secret")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "ip_address": "[IP_ADDRESS]",
                "credit_card": "[CREDIT_CARD]", "secret": "[SECRET]"}
ACTIONS = ("flag", "drop", "redact")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ -])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-])(?![ -]\d)"
)
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_SECRET_PREFIXED = re.compile(
    r"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}|sk_live_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,})"
    r"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----|$)"
)
_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_=-]{32,}(?![A-Za-z0-9+/_=-])")


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def shannon_entropy(token: str) -> float:
    """Bits per character of ``token``'s character distribution."""
    counts = Counter(token)
    n = len(token)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _is_card(m: str) -> bool:
    digits = re.sub(r"\D", "", m)
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


def _is_ipv6(m: str) -> bool:
    if m.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", m):
        return False
    groups = [g for g in m.split(":") if g]
    if "::" not in m and len(groups) != 8:
        return False
    if len(groups) < 2 and m != "::1":
        return False
    try:
        ipaddress.IPv6Address(m)
    except ValueError:
        return False
    return True


def _is_secret_token(m: str) -> bool:
    has_digit = any(c.isdigit() for c in m)
    has_upper = any(c.isupper() for c in m)
    has_lower = any(c.islower() for c in m)
    return has_digit and has_upper and has_lower and shannon_entropy(m) >= 4.0


_DETECTORS: tuple[tuple[str, re.Pattern[str], Callable[[str], bool] | None], ...] = (
    ("secret", _SECRET_PREFIXED, None),
    ("email", _EMAIL, None),
    ("secret", _TOKEN, _is_secret_token),
    ("credit_card", _CARD, _is_card),
    ("ip_address", _IPV4, None),
    ("ip_address", _IPV6, _is_ipv6),
    ("phone", _PHONE, None),
)


def find_pii(text: str, types: tuple[str, ...] = PII_TYPES) -> list[tuple[str, int, int]]:
    """Non-overlapping PII spans ``(type, start, end)`` in ``text``, in order.

    Detectors run in priority order (secrets, emails, cards, IPs, phones); a span overlapping an
    earlier detector's span is ignored.
    """
    spans: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, check in _DETECTORS:
        if kind not in types:
            continue
        for m in pattern.finditer(text):
            s, e = m.span()
            if check is not None and not check(m.group(0)):
                continue
            if any(s < te and ts < e for ts, te in taken):
                continue
            spans.append((kind, s, e))
            taken.append((s, e))
    return sorted(spans, key=lambda x: x[1])


def redact_text(text: str, types: tuple[str, ...] = PII_TYPES) -> tuple[str, Counter[str]]:
    """``text`` with each PII span replaced by its placeholder, and the counts per type."""
    spans = find_pii(text, types)
    counts: Counter[str] = Counter(k for k, _, _ in spans)
    out, last = [], 0
    for kind, s, e in spans:
        out.append(text[last:s])
        out.append(PLACEHOLDERS[kind])
        last = e
    out.append(text[last:])
    return "".join(out), counts


_MSG_COLS = ("messages", "prompt", "chosen", "rejected")


def _scan_row(row: dict[str, Any], types: tuple[str, ...]) -> tuple[Counter[str], dict[str, Any]]:
    counts: Counter[str] = Counter()
    redacted: dict[str, Any] = {}
    for col in _MSG_COLS:
        msgs = row.get(col)
        if not msgs:
            continue
        new = []
        changed = False
        for m in msgs:
            text, c = redact_text(m["content"] or "", types)
            counts.update(c)
            changed = changed or bool(c)
            new.append({"role": m["role"], "content": text})
        if changed:
            redacted[col] = new
    return counts, redacted


def pii_scan(table: pl.DataFrame, *, action: str = "flag", types: tuple[str, ...] | list[str] = PII_TYPES) -> pl.DataFrame:
    """Detect PII in every turn.

    Returns ``uid, keep, reason, score, pii_types, redacted``; ``score`` is the number of PII
    spans, ``pii_types`` e.g. ``"email=1,phone=2"``, ``redacted`` the JSON of the redacted
    message columns (only with ``action="redact"``). Rows are dropped only with ``action="drop"``.
    """
    types = tuple(types)
    cols = [c for c in _MSG_COLS if c in table.columns]
    keep, reasons, scores, kinds, red = [], [], [], [], []
    for row in table.select(cols).iter_rows(named=True):
        counts, redacted = _scan_row(row, types)
        desc = ",".join(f"{k}={counts[k]}" for k in PII_TYPES if counts.get(k))
        k = not (action == "drop" and counts)
        keep.append(k)
        reasons.append("" if k else f"pii: {desc}")
        scores.append(float(sum(counts.values())))
        kinds.append(desc or None)
        red.append(json.dumps(redacted, ensure_ascii=False) if action == "redact" and redacted else None)
    return pl.DataFrame({"uid": table["uid"], "keep": keep, "reason": reasons, "score": scores,
                         "pii_types": kinds, "redacted": red},
                        schema_overrides={"pii_types": pl.Utf8, "redacted": pl.Utf8, "score": pl.Float64})


def pii_counts(scan: pl.DataFrame) -> dict[str, int]:
    """Total spans per PII type from a :func:`pii_scan` frame."""
    total: Counter[str] = Counter()
    for desc in scan["pii_types"].drop_nulls().to_list():
        for part in desc.split(","):
            k, v = part.split("=")
            total[k] += int(v)
    return {k: total.get(k, 0) for k in PII_TYPES}


def redact_table(table: pl.DataFrame, types: tuple[str, ...] | list[str] = PII_TYPES) -> pl.DataFrame:
    """A copy of ``table`` with PII in every turn replaced by placeholders.

    ``uid`` is kept (it identifies the source row through the run), so a redacted row's uid is
    the hash of its *original* content.
    """
    types = tuple(types)
    cols = [c for c in _MSG_COLS if c in table.columns]
    new_cols: dict[str, list[Any]] = {c: [] for c in cols}
    for row in table.select(cols).iter_rows(named=True):
        _, redacted = _scan_row(row, types)
        for c in cols:
            new_cols[c].append(redacted.get(c, row[c]))
    return table.with_columns([pl.Series(c, v, dtype=table.schema[c]) for c, v in new_cols.items()])


@register_step("pii")
@dataclass(frozen=True, kw_only=True)
class PII:
    """Detect PII (emails, phones, IPs, Luhn-valid cards, secrets); flag, drop or redact.

    Parameters:
        action: ``flag`` (default: keep rows, annotate), ``drop`` or ``redact`` (redacted turns in the
            ``redacted`` column, and ``curated.parquet`` written with the text redacted:
            :meth:`curated_output`).
        types: detector types to run (default all of ``PII_TYPES``).
    """

    action: str = "flag"
    types: tuple[str, ...] | list[str] = PII_TYPES

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise param_error("PII", "action", f"one of {ACTIONS}", self.action)
        types = (self.types,) if isinstance(self.types, str) else tuple(self.types)
        if not types or any(t not in PII_TYPES for t in types):
            raise param_error("PII", "types", f"a non-empty list of {PII_TYPES}", self.types)
        object.__setattr__(self, "types", types)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        out = pii_scan(table, action=self.action, types=self.types)
        ctx.stats["pii"] = {"counts": pii_counts(out), "rows_with_pii": int((out["score"] > 0).sum())}
        return out

    def curated_output(self, curated: pl.DataFrame) -> pl.DataFrame:
        """The curated rows as written: PII replaced by placeholders with ``action="redact"``.
        Steps never change rows; the run's writer calls this on its way out."""
        return redact_table(curated, self.types) if self.action == "redact" else curated
