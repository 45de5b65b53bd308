"""The log record format, its versions, and the one validator that writer, importers and reader share.

Every record carries ``schema_version``. Version 1 (current)::

    search   {"schema_version": 1, "type": "search", "request_id", "timestamp", "query",
              "user_id", "session_id", "retriever", "retriever_version",
              "results": [{"chunk_id", "text", "score", "rank", "metadata"}]}
    feedback {"schema_version": 1, "type": "feedback", "request_id", "timestamp",
              "clicks": [...], "saves": [...], "thumbs": "up"|"down"|null,
              "dwell_ms": number|null, "cited": [...]}

Version 0 is the shape of the first prototype logger (records have no ``schema_version`` key)::

    search   {"id", "ts": epoch seconds, "query", "user", "session", "model",
              "docs": [{"id", "content", "score"}]}          rank = position in "docs" (1-based)
    feedback {"event": "feedback", "id", "ts": epoch seconds, "clicked": [...],
              "rating": 1 | -1 | 0 | null}                    rating 1 = thumbs up, -1 = down

``upgrade`` turns any accepted version into v1; ``validate`` returns the clean v1 record or raises
``RecordError`` naming the reason and the field, so a bad record is set aside with a clear cause.
Timestamps are stored as UTC ISO-8601 (``...Z``); a timestamp with no UTC offset is rejected
by the reader (it is ambiguous), while the capture API treats a naive ``datetime`` as UTC.
A result's ``score`` may be null (retrievers that give none: the order is the ``rank``).

The limits below are the only ones: the capture library, the importers and the reader all use
them, so what capture accepts the reader accepts. ``coerce_timestamp`` and ``coerce_id`` are the
documented coercions applied at capture and import time (never by the reader, which reads only
what they wrote):

* timestamps: an aware ``datetime`` (a naive one is UTC), ISO-8601 text in any form Python reads
  (extended, basic ``20261006T103000Z``, week dates ``2026-W41-2``; no offset = UTC; any offset is
  normalised to UTC), epoch numbers or numeric strings in seconds, milliseconds, microseconds or
  nanoseconds (told apart by magnitude), numpy ``datetime64`` and integer scalars. Anything else
  raises ``RecordError("bad_timestamp")``: it never silently becomes "now".
* ids: ``str``; integers of any kind (``int``, ``np.int64``; anything with ``__index__``) as
  decimal text; ``uuid.UUID`` as text; ``bytes`` as UTF-8 text when they decode to printable text,
  else as hex. Anything else raises ``RecordError("wrong_type")``.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Any

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (0, 1)

# limits past which a record is set aside rather than sent on to the judge (write and read time)
MAX_QUERY_CHARS = 10_000
MAX_TEXT_CHARS = 100_000
MAX_RESULTS = 1_000
MAX_ID_CHARS = 512
MAX_RANK = 1_000_000
MAX_LINE_BYTES = 8 * 1024 * 1024  # one encoded record; the reader skips longer lines unread

THUMBS = ("up", "down")


class RecordError(ValueError):
    """A record that cannot be accepted: ``reason`` is a short code, ``field`` the offending path."""

    def __init__(self, reason: str, field: str | None = None, detail: str = ""):
        self.reason = reason
        self.field = field
        self.detail = detail
        super().__init__(f"{reason}" + (f" at {field}" if field else "") + (f": {detail}" if detail else ""))


def format_timestamp(ts: datetime) -> str:
    """UTC ISO-8601 with microseconds and a ``Z`` suffix; naive datetimes are taken as UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: Any, field: str = "timestamp") -> datetime:
    """An aware UTC datetime from an ISO-8601 string with an offset; raises RecordError."""
    if not isinstance(value, str):
        raise RecordError("wrong_type", field, f"expected an ISO-8601 string, got {type(value).__name__}")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise RecordError("bad_timestamp", field, f"not ISO-8601: {value[:60]!r}") from None
    if ts.tzinfo is None:
        raise RecordError("bad_timestamp", field, f"no UTC offset: {value[:60]!r}")
    return ts.astimezone(timezone.utc)


_EPOCH_UNITS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))  # (magnitude from which, divisor): ns, us, ms


def coerce_timestamp(value: Any, field: str = "timestamp") -> datetime:
    """An aware UTC datetime from any documented timestamp form (module doc); raises RecordError."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    if type(value).__name__ == "datetime64":  # numpy, without importing it
        value = str(value.astype("datetime64[us]")) if str(value) != "NaT" else None
    if isinstance(value, str):
        s = value.strip()
        try:
            value = float(s)
        except ValueError:
            try:
                ts = datetime.fromisoformat(s)
            except ValueError:
                raise RecordError("bad_timestamp", field, f"not ISO-8601 or epoch: {s[:60]!r}") from None
            return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    if value is None:
        raise RecordError("missing_field", field)
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise RecordError("bad_timestamp", field, f"a {type(value).__name__} is not a timestamp")
    v = float(value)
    if not math.isfinite(v):
        raise RecordError("bad_timestamp", field, f"{value!r} is not finite")
    for magnitude, divisor in _EPOCH_UNITS:
        if abs(v) >= magnitude:
            v /= divisor
            break
    try:
        return datetime.fromtimestamp(v, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise RecordError("bad_timestamp", field, f"epoch {value!r} out of range") from None


def coerce_id(value: Any, field: str) -> str:
    """Text of an id given as str, any integer type, UUID or bytes (module doc); raises RecordError."""
    if isinstance(value, str):
        return value
    if value is None:
        raise RecordError("missing_field", field)
    if isinstance(value, bool):
        raise RecordError("wrong_type", field, "a bool is not an id")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.hex()
        return text if text.isprintable() and text.strip() else raw.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "__index__"):
        return str(value.__index__())
    if isinstance(value, float) or type(value).__name__.startswith("float"):
        f = float(value)
        if math.isfinite(f) and f.is_integer():
            return str(int(f))
    raise RecordError("wrong_type", field, f"a {type(value).__name__} is not an id")


def upgrade(rec: dict) -> dict:
    """Bring an accepted older record to the current version (v0 -> v1)."""
    version = rec.get("schema_version", 0)
    if version == SCHEMA_VERSION:
        return rec
    if version != 0:
        raise RecordError("unsupported_schema_version", "schema_version", f"{version!r}")
    return _upgrade_v0(rec)


def _epoch_to_iso(value: Any, field: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError("wrong_type", field, "v0 timestamps are epoch seconds")
    return format_timestamp(datetime.fromtimestamp(value, tz=timezone.utc))


def _upgrade_v0(rec: dict) -> dict:
    if "id" not in rec:
        raise RecordError("missing_field", "id", "v0 record without an id")
    if "ts" not in rec:
        raise RecordError("missing_field", "ts", "v0 record without a timestamp")
    ts = _epoch_to_iso(rec["ts"], "ts")
    if rec.get("event") == "feedback":
        rating = rec.get("rating")
        thumbs = {1: "up", -1: "down"}.get(rating) if not isinstance(rating, bool) else None
        return {
            "schema_version": 1, "type": "feedback", "request_id": rec["id"], "timestamp": ts,
            "clicks": rec.get("clicked", []), "saves": [], "thumbs": thumbs, "dwell_ms": None,
            "cited": [],
        }
    if "event" in rec and rec["event"] not in (None, "search"):
        raise RecordError("unknown_record_type", "event", f"{rec['event']!r}")
    docs = rec.get("docs")
    if not isinstance(docs, list):
        raise RecordError("missing_field" if docs is None else "wrong_type", "docs")
    results = []
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise RecordError("wrong_type", f"docs[{i}]", "expected an object")
        results.append({"chunk_id": d.get("id"), "text": d.get("content"), "score": d.get("score"),
                        "rank": i + 1, "metadata": None})
    return {
        "schema_version": 1, "type": "search", "request_id": rec["id"], "timestamp": ts,
        "query": rec.get("query"), "user_id": rec.get("user"), "session_id": rec.get("session"),
        "retriever": rec.get("model"), "retriever_version": None, "results": results,
    }


# -- field checks --------------------------------------------------------------------------------

def _req(rec: dict, key: str, field: str | None = None) -> Any:
    if key not in rec or rec[key] is None:
        raise RecordError("missing_field", field or key)
    return rec[key]


def _str(value: Any, field: str, *, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError("wrong_type", field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError("invalid_value", field, "empty string")
    if len(value) > max_chars:
        raise RecordError("text_too_long", field, f"{len(value):,} chars > limit {max_chars:,}")
    return value


def _opt_str(rec: dict, key: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    return _str(value, key, max_chars=MAX_ID_CHARS, allow_empty=True)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError("wrong_type", field, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise RecordError("invalid_value", field, "not a finite number")
    return value


def _str_list(rec: dict, key: str) -> list[str]:
    value = rec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordError("wrong_type", key, f"expected a list, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise RecordError("wrong_type", f"{key}[{i}]", f"expected a string, got {type(v).__name__}")
    return value


def validate(rec: Any) -> tuple[dict, datetime]:
    """Check (and upgrade) one parsed record; return the clean v1 record and its UTC timestamp."""
    if not isinstance(rec, dict):
        raise RecordError("not_an_object", None, f"a JSON {type(rec).__name__}, not an object")
    version = rec.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError("wrong_type", "schema_version", f"{version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise RecordError("unsupported_schema_version", "schema_version", f"{version!r}")
    rec = upgrade(rec)
    kind = rec.get("type")
    if kind not in ("search", "feedback"):
        raise RecordError("missing_field" if kind is None else "unknown_record_type", "type", f"{kind!r}")
    request_id = _str(_req(rec, "request_id"), "request_id", max_chars=MAX_ID_CHARS)
    ts = parse_timestamp(_req(rec, "timestamp"))
    if kind == "feedback":
        thumbs = rec.get("thumbs")
        if thumbs is not None and thumbs not in THUMBS:
            raise RecordError("invalid_value", "thumbs", f"{thumbs!r} is not 'up', 'down' or null")
        dwell = rec.get("dwell_ms")
        if dwell is not None:
            dwell = _number(dwell, "dwell_ms")
            if dwell < 0:
                raise RecordError("invalid_value", "dwell_ms", "negative")
        return {
            "schema_version": SCHEMA_VERSION, "type": "feedback", "request_id": request_id,
            "timestamp": ts, "clicks": _str_list(rec, "clicks"), "saves": _str_list(rec, "saves"),
            "thumbs": thumbs, "dwell_ms": dwell, "cited": _str_list(rec, "cited"),
        }, ts
    query = _str(_req(rec, "query"), "query", max_chars=MAX_QUERY_CHARS)
    raw_results = _req(rec, "results")
    if not isinstance(raw_results, list):
        raise RecordError("wrong_type", "results", f"expected a list, got {type(raw_results).__name__}")
    if len(raw_results) > MAX_RESULTS:
        raise RecordError("invalid_value", "results", f"{len(raw_results)} results > limit {MAX_RESULTS}")
    results = _fast_results(raw_results)
    if results is None:
        results = _checked_results(raw_results)
    results.sort(key=_rank)
    return {
        "schema_version": SCHEMA_VERSION, "type": "search", "request_id": request_id,
        "timestamp": ts, "query": query, "user_id": _opt_str(rec, "user_id"),
        "session_id": _opt_str(rec, "session_id"), "retriever": _opt_str(rec, "retriever"),
        "retriever_version": _opt_str(rec, "retriever_version"), "results": results,
    }, ts


def _rank(r: dict) -> int:
    return r["rank"]


def _fast_results(raw_results: list) -> list | None:
    """The common case (well-typed results) in one tight loop; None sends it to the careful path."""
    results = []
    ranks = set()
    chunk_ids = set()
    isfinite = math.isfinite
    for r in raw_results:
        if type(r) is not dict:
            return None
        cid = r.get("chunk_id")
        text = r.get("text")
        score = r.get("score")
        rank = r.get("rank")
        meta = r.get("metadata")
        if not (type(cid) is str and 0 < len(cid) <= MAX_ID_CHARS and not cid.isspace()
                and type(text) is str and len(text) <= MAX_TEXT_CHARS
                and (score is None or ((type(score) is float or type(score) is int) and isfinite(score)))
                and type(rank) is int and 1 <= rank <= MAX_RANK
                and (meta is None or type(meta) is dict)
                and rank not in ranks and cid not in chunk_ids):
            return None
        ranks.add(rank)
        chunk_ids.add(cid)
        results.append({"chunk_id": cid, "text": text, "score": None if score is None else float(score),
                        "rank": rank, "metadata": meta})
    return results


def _checked_results(raw_results: list) -> list:
    results = []
    ranks: set[int] = set()
    chunk_ids: set[str] = set()
    for i, r in enumerate(raw_results):
        f = f"results[{i}]"
        if not isinstance(r, dict):
            raise RecordError("wrong_type", f, "expected an object")
        chunk_id = _str(_req(r, "chunk_id", f"{f}.chunk_id"), f"{f}.chunk_id", max_chars=MAX_ID_CHARS)
        text = _str(_req(r, "text", f"{f}.text"), f"{f}.text", max_chars=MAX_TEXT_CHARS, allow_empty=True)
        score = r.get("score")
        score = None if score is None else _number(score, f"{f}.score")
        rank = _req(r, "rank", f"{f}.rank")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise RecordError("wrong_type", f"{f}.rank", f"expected an integer, got {type(rank).__name__}")
        if rank < 1 or rank > MAX_RANK:
            raise RecordError("invalid_value", f"{f}.rank", f"{rank} (ranks are 1-based)")
        if rank in ranks:
            raise RecordError("invalid_value", f"{f}.rank", f"rank {rank} appears twice")
        if chunk_id in chunk_ids:
            raise RecordError("invalid_value", f"{f}.chunk_id", f"chunk {chunk_id!r} appears twice")
        metadata = r.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise RecordError("wrong_type", f"{f}.metadata", "expected an object or null")
        ranks.add(rank)
        chunk_ids.add(chunk_id)
        results.append({"chunk_id": chunk_id, "text": text, "score": score, "rank": rank,
                        "metadata": metadata})
    return results
