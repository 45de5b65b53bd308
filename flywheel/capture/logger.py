"""The two calls a RAG app makes: ``log_search`` after each retrieval, ``log_feedback`` afterwards.

Logging must never hurt the app: both calls catch everything, report failures through the
standard ``logging`` module (rate-limited, logger ``flywheel.capture``) and count them in
``stats``; the request goes on. Writes are synchronous (one ``os.write`` of a line, no fsync by
default, tens of microseconds), so once ``log_search`` has returned its record survives a kill
of the process. Inputs are coerced where that loses nothing (numpy scalars, ids given as ints);
what cannot be coerced is written as given, so the raw_logs stage sets it aside with a reason
instead of the record silently disappearing.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flywheel.capture.redact import redact
from flywheel.capture.schema import SCHEMA_VERSION, THUMBS, format_timestamp
from flywheel.capture.writer import DayFileWriter, encode_line

log = logging.getLogger("flywheel.capture")

DEFAULT_MAX_TEXT_CHARS = 20_000


def _coerce_timestamp(ts: Any) -> str | None:
    if ts is None:
        return format_timestamp(datetime.now(timezone.utc))
    if isinstance(ts, datetime):
        return format_timestamp(ts)
    if isinstance(ts, str):
        try:
            return format_timestamp(datetime.fromisoformat(ts))
        except ValueError:
            return None
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
        return format_timestamp(datetime.fromtimestamp(ts, tz=timezone.utc))
    return None


def _as_str(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool):
        return str(value)
    return value  # left as is: the reader names the field


def _as_float(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    try:
        f = float(value)  # numpy floats, Decimals, ints
    except (TypeError, ValueError):
        return value if isinstance(value, (str, list, dict)) else str(value)
    return f if math.isfinite(f) else None


def _as_int(value: Any, default: int) -> Any:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    try:
        i = int(value)
    except (TypeError, ValueError):
        return value if isinstance(value, (str, list, dict)) else str(value)
    return i if i == value else value


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


class _TextPolicy:
    def __init__(self, redact_pii: bool, max_text_chars: int | None):
        self.redact_pii = redact_pii
        self.max_text_chars = max_text_chars
        self.redacted = 0
        self.truncated = 0

    def __call__(self, text: Any) -> Any:
        if not isinstance(text, str):
            return text
        if self.max_text_chars is not None and len(text) > self.max_text_chars:
            text = text[: self.max_text_chars]
            self.truncated += 1
        if self.redact_pii:
            clean = redact(text)
            if clean != text:
                self.redacted += 1
            return clean
        return text


def build_search_record(
    query: Any,
    results: Any,
    *,
    request_id: str | None = None,
    user_id: Any = None,
    session_id: Any = None,
    timestamp: Any = None,
    retriever: Any = None,
    retriever_version: Any = None,
    text_policy=None,
) -> dict:
    """A v1 search record from what the app passed (coerced, optionally redacted)."""
    text = text_policy or (lambda t: t)
    ts = _coerce_timestamp(timestamp)
    if ts is None:
        log.warning("flywheel.capture: unusable timestamp %r, using the current time", timestamp)
        ts = format_timestamp(datetime.now(timezone.utc))
    items: Any
    if results is None:
        items = []
    elif isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        try:
            items = list(results) if not isinstance(results, (str, bytes, Mapping)) else str(results)
        except TypeError:
            items = str(results)
    else:
        items = list(results)
    if isinstance(items, list):
        out = []
        for i, r in enumerate(items):
            if not isinstance(r, Mapping):
                out.append(_json_safe(r))
                continue
            meta = r.get("metadata")
            out.append({
                "chunk_id": _as_str(r.get("chunk_id")),
                "text": text(r.get("text")),
                "score": _as_float(r.get("score")),
                "rank": _as_int(r.get("rank"), i + 1),
                "metadata": _json_safe(meta) if meta is not None else None,
            })
        items = out
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "search",
        "request_id": _as_str(request_id) if request_id is not None else uuid.uuid4().hex,
        "timestamp": ts,
        "query": text(query if isinstance(query, str) else _json_safe(query)),
        "user_id": _json_safe(_as_str(user_id)),
        "session_id": _json_safe(_as_str(session_id)),
        "retriever": _json_safe(_as_str(retriever)),
        "retriever_version": _json_safe(_as_str(retriever_version)),
        "results": items,
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
    return str(value)


def _id_list(values: Any) -> Any:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    try:
        return [_as_str(v) if not isinstance(v, str) else v for v in values]
    except TypeError:
        return str(values)


def build_feedback_record(
    request_id: Any,
    *,
    clicks: Any = (),
    saves: Any = (),
    thumbs: Any = None,
    dwell_ms: Any = None,
    cited: Any = (),
    timestamp: Any = None,
) -> dict:
    ts = _coerce_timestamp(timestamp) or format_timestamp(datetime.now(timezone.utc))
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "feedback",
        "request_id": _json_safe(_as_str(request_id)),
        "timestamp": ts,
        "clicks": _json_safe(_id_list(clicks)),
        "saves": _json_safe(_id_list(saves)),
        "thumbs": _thumbs(thumbs),
        "dwell_ms": _as_float(dwell_ms) if dwell_ms is not None else None,
        "cited": _json_safe(_id_list(cited)),
    }


class SearchLogger:
    """Log retrievals and what users did with them; never raises, never blocks on a lock held
    by another process. Thread-safe; fork-safe (a child writes its own files).

    >>> with SearchLogger("logs/") as logger:
    ...     rid = logger.log_search("what is x?", [{"chunk_id": "c1", "text": "...", "score": 0.8, "rank": 1}])
    ...     logger.log_feedback(rid, clicks=["c1"], thumbs="up")
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        redact_pii: bool = True,
        retriever: str | None = None,
        retriever_version: str | None = None,
        max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
        fsync: bool = False,
    ):
        self.log_dir = Path(log_dir)
        self.retriever = retriever
        self.retriever_version = retriever_version
        self._writer = DayFileWriter(self.log_dir, fsync=fsync)
        self._text = _TextPolicy(redact_pii, max_text_chars)
        self._lock = threading.Lock()
        self._counts = {"searches": 0, "feedback": 0, "written": 0, "failed": 0, "bytes": 0}
        self._last_error: str | None = None

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

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._counts["failed"] += 1
            n = self._counts["failed"]
            self._last_error = f"{type(exc).__name__}: {exc}"
        # first failure, then one line per 1,000 so a full disk does not flood the app's logs
        if n == 1 or n % 1000 == 0:
            log.error("flywheel.capture: could not write a %s record (%d failed so far): %s: %s",
                      what, n, type(exc).__name__, exc)

    def _write(self, record: dict, what: str) -> bool:
        try:
            data = encode_line(record)
        except (TypeError, ValueError) as exc:  # not JSON-serialisable after coercion
            self._failed(what, exc)
            return False
        try:
            self._writer.write_line(record["timestamp"][:10], data)
        except Exception as exc:
            self._failed(what, exc)
            return False
        with self._lock:
            self._counts["written"] += 1
            self._counts["bytes"] += len(data)
        return True

    def log_search(
        self,
        query: str,
        results: Sequence[Mapping],
        *,
        request_id: str | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        timestamp: datetime | None = None,
        retriever: str | None = None,
        retriever_version: str | None = None,
    ) -> str:
        """Record one retrieval; returns its request id (generated when not given). Never raises."""
        rid = str(request_id) if request_id is not None and request_id != "" else uuid.uuid4().hex
        try:
            with self._lock:
                self._counts["searches"] += 1
            record = build_search_record(
                query, results, request_id=rid, user_id=user_id, session_id=session_id,
                timestamp=timestamp, retriever=retriever or self.retriever,
                retriever_version=retriever_version or self.retriever_version,
                text_policy=self._text,
            )
            self._write(record, "search")
        except Exception as exc:  # a bug in coercion must not reach the app either
            self._failed("search", exc)
        return rid

    def log_feedback(
        self,
        request_id: str,
        *,
        clicks: Sequence[str] = (),
        saves: Sequence[str] = (),
        thumbs: str | None = None,
        dwell_ms: float | None = None,
        cited: Sequence[str] = (),
        timestamp: datetime | None = None,
    ) -> bool:
        """Record what happened after a retrieval; True when written. Never raises."""
        try:
            with self._lock:
                self._counts["feedback"] += 1
            record = build_feedback_record(
                request_id, clicks=clicks, saves=saves, thumbs=thumbs, dwell_ms=dwell_ms,
                cited=cited, timestamp=timestamp,
            )
            return self._write(record, "feedback")
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
