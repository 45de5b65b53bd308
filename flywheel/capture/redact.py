"""PII redaction applied at capture and import time, before text leaves the app for a third-party judge.

Queries and chunk texts are sent to an LLM judge later, so e-mail addresses (any script in the
local part or domain), IBANs (compact or grouped), phone numbers and long digit runs (card,
account, ID numbers, also glued to a label such as ``No.4111...``) are replaced by placeholders
*before* they are written: what is never stored can never leak. The rules lean towards keeping
scientific text intact: dates (``2020-01-15``), ranges (``2019-2020``), decimals
(``0.0000012``) and short numbers survive.

Three entry points, one per kind of field:

* ``redact(text)`` for free text (queries, chunk texts);
* ``redact_identifier(value)`` for user and session ids: an id that contains PII (an e-mail used
  as a user id) becomes a stable pseudonym ``pii-<hash>``, so one user's searches still group
  together but the address is never stored;
* ``redact_metadata(obj)`` for result metadata: every string value is redacted, and values under
  keys that name secrets (``api_key``, ``password``, ``token``, ``authorization``...) are replaced.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
NUMBER = "[NUMBER]"
IBAN = "[IBAN]"
SECRET = "[SECRET]"

# \w is Unicode-aware: accented, Cyrillic, CJK local parts and internationalised domains match
_EMAIL_RE = re.compile(r"[\w.%+\-']+@[\w\-]+(?:\.[\w\-]+)*\.\w{2,}")
# country code, check digits, then 11-30 letters/digits, compact or in groups of four
_IBAN_RE = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}(?![\w])")
# a digit, then at least six more digits, each optionally preceded by up to two separators; not the
# fractional part of a decimal ("0.0000012"), but a number glued to a label ("No.4111...") counts
_NUMBERISH_RE = re.compile(r"(?<!\d[.,])(?<![\w])\+?\(?\d(?:[ .\-()/]{0,2}\d){6,}\)?(?![\w])")
_LOCAL_PHONE_RE = re.compile(r"\d{3}[ .\-]\d{4}")
_SEPARATORS = re.compile(r"[ .\-()+/]")
_ISO_DATE = re.compile(r"(?:19|20)\d\d-[01]\d-[0-3]\d")
# a key that names a secret: "api_key", "X-Api-Key", "client_secret", "auth_token" (not "num_tokens")
_SECRET_KEYS = re.compile(r"(?:^|[^a-z])(?:api[_-]?key|(?:secret|private)[_-]?key|secret|password|passwd|token"
                          r"|authorization|cookie|credentials?)$", re.I)


def _classify(match: re.Match) -> str:
    s = match.group(0)
    digits = sum(ch.isdigit() for ch in s)
    seps = _SEPARATORS.findall(s)
    if not seps:
        return NUMBER if digits >= 9 else s
    # a decimal number (one dot, nothing else) is not a phone number
    if seps == ["."]:
        return NUMBER if digits >= 13 else s
    if _ISO_DATE.match(s) and digits <= 10:
        return s  # a date with a short suffix ("2026-10-06-7" in a session id)
    if digits > 15:
        return NUMBER
    if digits >= 9:
        return PHONE
    if s.startswith("+") or "(" in s or _LOCAL_PHONE_RE.fullmatch(s):
        return PHONE
    return s  # 7-8 digits with separators: dates, ranges


def _iban(match: re.Match) -> str:
    s = match.group(0)
    return IBAN if sum(ch.isdigit() for ch in s) >= 8 else s  # "AB12 CDEF..." words are not IBANs


def redact(text: str) -> str:
    """Replace e-mail addresses, IBANs, phone numbers and digit runs of 9+ digits by placeholders."""
    if not text or not isinstance(text, str):
        return text
    if "@" in text:
        text = _EMAIL_RE.sub(EMAIL, text)
    text = _IBAN_RE.sub(_iban, text)
    return _NUMBERISH_RE.sub(_classify, text)


def redact_identifier(value: Any) -> Any:
    """An id with PII in it becomes ``pii-<16 hex>`` (stable, so grouping by user still works)."""
    if not isinstance(value, str) or not value or redact(value) == value:
        return value
    return "pii-" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]


def redact_metadata(obj: Any, _depth: int = 0) -> Any:
    """Redact every string in a JSON-like value; values under secret-looking keys are dropped."""
    if isinstance(obj, str):
        return redact(obj)
    if _depth > 20:
        return obj
    if isinstance(obj, dict):
        return {k: SECRET if isinstance(k, str) and _SECRET_KEYS.search(k) else redact_metadata(v, _depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_metadata(v, _depth + 1) for v in obj]
    return obj
