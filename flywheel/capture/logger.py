"""The two calls a RAG app makes: ``log_search`` after each retrieval, ``log_feedback`` afterwards.

Logging must never hurt the app: both calls catch everything, report failures through the
standard ``logging`` module (rate-limited, logger ``flywheel.capture``) and count them in
``stats``; the request goes on. Writes are synchronous (one ``os.write`` of a line, no fsync by
default, tens of microseconds), so once ``log_search`` has returned its record survives a kill
of the process.

Every record is checked by the same ``validate`` the reader uses, after the documented
coercions (``schema.coerce_timestamp`` / ``coerce_id``; numpy and Decimal numbers; a rank
missing = its position). Texts longer than the schema's limits are cut to them, and results past
``MAX_RESULTS`` are cut (both counted in ``stats["truncated"]``). A record that still is not
valid (an unparseable timestamp, a chunk id that is a dict...) is written to the dead-letter
folder with the reason and field (``stats["dead_lettered"]``), so nothing disappears without a
trace; only a write that fails (full disk) loses a record, and that is counted and logged.

PII (``redact_pii=True``, the default) is removed from the query, chunk texts and result
metadata, and user and session ids that contain PII become stable pseudonyms (see ``redact``).

Fork, spawn, forkserver: the logger resets its lock in a forked child (``os.register_at_fork``)
and pickles as its settings, so it can be handed to any ``multiprocessing`` start method.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flywheel.capture.redact import redact, redact_identifier, redact_metadata
from flywheel.capture.schema import (
    MAX_LINE_BYTES,
    MAX_QUERY_CHARS,
    MAX_RESULTS,
    MAX_TEXT_CHARS,
    SCHEMA_VERSION,
    THUMBS,
    RecordError,
    coerce_id,
    coerce_timestamp,
    format_timestamp,
    validate,
)
from flywheel.capture.writer import DayFileWriter, encode_line

log = logging.getLogger("flywheel.capture")


def _now() -> str:
    return format_timestamp(datetime.now(timezone.utc))


def _timestamp(ts: Any) -> Any:
    """UTC ISO text; what cannot be read is kept (as text) for ``validate`` to name: never "now"."""
    if ts is None:
        return _now()
    try:
        return format_timestamp(coerce_timestamp(ts))
    except RecordError:
        return ts if isinstance(ts, str) else f"unreadable {type(ts).__name__}: {str(ts)[:80]}"


def _id(value: Any, field: str) -> Any:
    try:
        return coerce_id(value, field)
    except RecordError:
        return _json_safe(value)  # left for validate to name


def _opt_id(value: Any, field: str) -> Any:
    return None if value is None else _id(value, field)


def _as_float(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    try:
        f = float(value)  # numpy floats, Decimals, ints, numeric strings
    except (TypeError, ValueError):
        return _json_safe(value)
    return f if math.isfinite(f) else None  # NaN / inf: no score


def _as_int(value: Any, default: int) -> Any:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    try:
        i = int(value)
    except (TypeError, ValueError, OverflowError):
        return _json_safe(value)
    return i if i == value else _json_safe(value)


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _json_safe(value.item())
        except Exception:
            pass
    return str(value)


class _TextPolicy:
    """Cuts texts to the schema's limits and redacts PII; counts both."""

    def __init__(self, redact_pii: bool, max_text_chars: int | None = None):
        self.redact_pii = redact_pii
        self.max_text_chars = max_text_chars
        self.redacted = 0
        self.truncated = 0

    def _cut(self, text: str, limit: int) -> str:
        if self.max_text_chars is not None:
            limit = min(limit, self.max_text_chars)
        if len(text) > limit:
            self.truncated += 1
            return text[:limit]
        return text

    def _clean(self, text: Any, fn) -> Any:
        if not self.redact_pii:
            return text
        clean = fn(text)
        if clean != text:
            self.redacted += 1
        return clean

    def query(self, text: Any) -> Any:
        return self._clean(self._cut(text, MAX_QUERY_CHARS), redact) if isinstance(text, str) else _json_safe(text)

    def text(self, text: Any) -> Any:
        return self._clean(self._cut(text, MAX_TEXT_CHARS), redact) if isinstance(text, str) else _json_safe(text)

    def identifier(self, value: Any) -> Any:
        return self._clean(value, redact_identifier) if isinstance(value, str) else value

    def metadata(self, meta: Any) -> Any:
        return None if meta is None else self._clean(_json_safe(meta), redact_metadata)

    def __call__(self, text: Any) -> Any:  # kept for callers that pass a plain text policy
        return self.text(text)


def _result_items(results: Any, policy: _TextPolicy) -> Any:
    if results is None:
        return []
    if isinstance(results, (str, bytes, Mapping)):
        return _json_safe(results) if not isinstance(results, bytes) else results.hex()
    try:
        items = list(results)
    except TypeError:
        return _json_safe(results)
    if len(items) > MAX_RESULTS:
        policy.truncated += 1
        items = items[:MAX_RESULTS]  # results come in rank order: the cut keeps the top
    out = []
    for i, r in enumerate(items):
        if not isinstance(r, Mapping):
            out.append(_json_safe(r))
            continue
        out.append({
            "chunk_id": _id(r.get("chunk_id"), f"results[{i}].chunk_id"),
            "text": policy.text(r.get("text")),
            "score": _as_float(r.get("score")),
            "rank": _as_int(r.get("rank"), i + 1),
            "metadata": policy.metadata(r.get("metadata")),
        })
    return out


def build_search_record(query: Any, results: Any, *, request_id: Any = None, user_id: Any = None,
                        session_id: Any = None, timestamp: Any = None, retriever: Any = None,
                        retriever_version: Any = None, text_policy: _TextPolicy | None = None) -> dict:
    """A v1 search record from what the app passed (coerced, cut to limits, redacted); what cannot
    be coerced is left in the record for ``validate`` to name."""
    policy = text_policy or _TextPolicy(False)
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "search",
        "request_id": _id(request_id, "request_id") if request_id is not None else uuid.uuid4().hex,
        "timestamp": _timestamp(timestamp),
        "query": policy.query(query),
        "user_id": policy.identifier(_opt_id(user_id, "user_id")),
        "session_id": policy.identifier(_opt_id(session_id, "session_id")),
        "retriever": _json_safe(_opt_id(retriever, "retriever")),
        "retriever_version": _json_safe(_opt_id(retriever_version, "retriever_version")),
        "results": _result_items(results, policy),
    }


def _thumbs(value: Any) -> Any:
    if value is None or value in THUMBS:
        return value
    if isinstance(value, bool):
        return "up" if value else "down"
    if isinstance(value, (int, float)) and value != 0:
        return "up" if value > 0 else "down"
    if isinstance(value, str) and value.lower() in THUMBS:
        return value.lower()
    return _json_safe(value)


def _id_list(values: Any, field: str) -> Any:
    if values is None:
        return []
    if isinstance(values, (str, bytes)):
        values = [values]
    try:
        return [_id(v, f"{field}[{i}]") for i, v in enumerate(values)]
    except TypeError:
        return _json_safe(values)


def build_feedback_record(request_id: Any, *, clicks: Any = (), saves: Any = (), thumbs: Any = None,
                          dwell_ms: Any = None, cited: Any = (), timestamp: Any = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "feedback",
        "request_id": _id(request_id, "request_id"),
        "timestamp": _timestamp(timestamp),
        "clicks": _id_list(clicks, "clicks"),
        "saves": _id_list(saves, "saves"),
        "thumbs": _thumbs(thumbs),
        "dwell_ms": _as_float(dwell_ms),
        "cited": _id_list(cited, "cited"),
    }


def dead_letter_line(kind: str, err: RecordError, record: Any) -> bytes:
    """The dead-letter line for a record that could not be made valid: reason, field and the record."""
    return encode_line({"dead_letter": 1, "kind": kind, "reason": err.reason, "field": err.field,
                        "detail": err.detail, "written_at": _now(), "record": _json_safe(record)})


_LIVE: "weakref.WeakSet[SearchLogger]" = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [lg._after_fork() for lg in list(_LIVE)])


class SearchLogger:
    """Log retrievals and what users did with them; never raises, never blocks on a lock held
    by another process or by a thread of the parent. Thread-safe, fork-safe, picklable.

    >>> with SearchLogger("logs/") as logger:
    ...     rid = logger.log_search("what is x?", [{"chunk_id": "c1", "text": "...", "score": 0.8, "rank": 1}])
    ...     logger.log_feedback(rid, clicks=["c1"], thumbs="up")
    """

    def __init__(self, log_dir: str | Path, *, redact_pii: bool = True, retriever: str | None = None,
                 retriever_version: str | None = None, max_text_chars: int | None = None,
                 fsync: bool = False, **writer_options: Any):
        self.log_dir = Path(log_dir)
        self.retriever = retriever
        self.retriever_version = retriever_version
        self._settings = {"redact_pii": redact_pii, "retriever": retriever, "retriever_version": retriever_version,
                          "max_text_chars": max_text_chars, "fsync": fsync, **writer_options}
        self._writer = DayFileWriter(self.log_dir, fsync=fsync, **writer_options)
        self._text = _TextPolicy(redact_pii, max_text_chars)
        self._init_counters()
        _LIVE.add(self)

    def _init_counters(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"searches": 0, "feedback": 0, "written": 0, "dead_lettered": 0, "failed": 0, "bytes": 0}
        self._last_error: str | None = None

    def _after_fork(self) -> None:
        self._init_counters()  # fresh lock and this process's own counts
        self._text.redacted = self._text.truncated = 0

    def __getstate__(self) -> dict:
        return {"log_dir": str(self.log_dir), **self._settings}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        self.__init__(state.pop("log_dir"), **state)

    @property
    def redact_pii(self) -> bool:
        return self._text.redact_pii

    @property
    def stats(self) -> dict:
        with self._lock:
            out = dict(self._counts)
            out["redacted"] = self._text.redacted
            out["truncated"] = self._text.truncated
            out["last_error"] = self._last_error
            return out

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._counts["failed"] += 1
            n = self._counts["failed"]
            self._last_error = f"{type(exc).__name__}: {exc}"
        # first failure, then one line per 1,000 so a full disk does not flood the app's logs
        if n == 1 or n % 1000 == 0:
            log.error("flywheel.capture: could not write a %s record (%d failed so far): %s: %s",
                      what, n, type(exc).__name__, exc)

    def _write(self, kind: str, build) -> bool:
        """Build, validate and write one record; a record that is not valid goes to the dead letters."""
        record: Any = None
        try:
            record = build()
            validate(record)
            data, dead = encode_line(record), False
            if len(data) > MAX_LINE_BYTES:  # the reader would skip it: keep the reason, not the bulk
                raise RecordError("line_too_long", None, f"{len(data):,} bytes > {MAX_LINE_BYTES:,}")
        except RecordError as err:
            if err.reason == "line_too_long":
                record = {k: record[k] for k in ("type", "request_id", "timestamp") if k in record}
            data, dead = dead_letter_line(kind, err, record), True
        try:
            if dead:
                self._writer.write_dead_letter(data)
            else:
                self._writer.write_line(record["timestamp"][:10], data)
        except Exception as exc:
            self._failed(kind, exc)
            return False
        with self._lock:
            self._counts["dead_lettered" if dead else "written"] += 1
            self._counts["bytes"] += len(data)
        return not dead

    def log_search(self, query: str, results: Sequence[Mapping], *, request_id: str | None = None,
                   user_id: str | None = None, session_id: str | None = None, timestamp: Any = None,
                   retriever: str | None = None, retriever_version: str | None = None) -> str:
        """Record one retrieval; returns its request id (generated when not given). Never raises."""
        rid = uuid.uuid4().hex
        try:
            if request_id is not None and request_id != "":
                rid = _id(request_id, "request_id")
                rid = rid if isinstance(rid, str) else str(rid)
            self._count("searches")
            self._write("search", lambda: build_search_record(
                query, results, request_id=rid, user_id=user_id, session_id=session_id,
                timestamp=timestamp, retriever=retriever or self.retriever,
                retriever_version=retriever_version or self.retriever_version, text_policy=self._text))
        except Exception as exc:  # a bug in coercion must not reach the app either
            self._failed("search", exc)
        return rid

    def log_feedback(self, request_id: str, *, clicks: Sequence[str] = (), saves: Sequence[str] = (),
                     thumbs: str | None = None, dwell_ms: float | None = None, cited: Sequence[str] = (),
                     timestamp: Any = None) -> bool:
        """Record what happened after a retrieval; True when written as a valid record. Never raises."""
        try:
            self._count("feedback")
            return self._write("feedback", lambda: build_feedback_record(
                request_id, clicks=clicks, saves=saves, thumbs=thumbs, dwell_ms=dwell_ms, cited=cited,
                timestamp=timestamp))
        except Exception as exc:
            self._failed("feedback", exc)
            return False

    def files(self) -> list[Path]:
        return self._writer.files()

    def close(self) -> None:
        try:
            self._writer.close()
        except Exception as exc:  # pragma: no cover - closing fds does not fail in practice
            log.error("flywheel.capture: close failed: %s", exc)

    def __enter__(self) -> "SearchLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
