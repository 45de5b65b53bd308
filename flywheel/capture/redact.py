"""PII redaction applied at capture time, before text leaves the app for a third-party judge.

Queries and chunk texts are sent to an LLM judge later, so emails, phone numbers and long digit
runs (card, account, ID numbers) are replaced by placeholders *before* they are written: what is
never stored can never leak. The rules lean towards keeping scientific text intact: dates
(``2020-01-15``), ranges (``2019-2020``), decimals (``0.0000012``) and short numbers survive.
"""

from __future__ import annotations

import re

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
NUMBER = "[NUMBER]"

_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# a digit, then at least six more digits, each optionally preceded by up to two separators
_NUMBERISH_RE = re.compile(r"(?<![\w.])\+?\(?\d(?:[ .\-()]{0,2}\d){6,}\)?(?![\w])")
_LOCAL_PHONE_RE = re.compile(r"\d{3}[ .\-]\d{4}")
_SEPARATORS = re.compile(r"[ .\-()+]")


def _classify(match: re.Match) -> str:
    s = match.group(0)
    digits = sum(ch.isdigit() for ch in s)
    seps = _SEPARATORS.findall(s)
    if not seps:
        return NUMBER if digits >= 9 else s
    # a decimal number (one dot, nothing else) is not a phone number
    if seps == ["."]:
        return NUMBER if digits >= 13 else s
    if digits > 15:
        return NUMBER
    if digits >= 9:
        return PHONE
    if s.startswith("+") or "(" in s or _LOCAL_PHONE_RE.fullmatch(s):
        return PHONE
    return s  # 7-8 digits with separators: dates, ranges


def redact(text: str) -> str:
    """Replace emails, phone numbers and digit runs of 9+ digits by placeholders."""
    if not text:
        return text
    if "@" in text:
        text = _EMAIL_RE.sub(EMAIL, text)
    return _NUMBERISH_RE.sub(_classify, text)
