"""Traces from LLM-ops platforms: MLflow traces, Langfuse observations, LangSmith runs.

* MLflow: ``Trace.to_json()`` / ``mlflow traces get`` output (``{"info", "data": {"spans"}}``), one
  trace per document or per line, or a list of them. Span attributes are JSON-encoded strings;
  ``mlflow.spanType`` "RETRIEVER" spans have the query in ``mlflow.spanInputs`` and a list of
  documents (``page_content``, ``metadata``, ``id``) in ``mlflow.spanOutputs``. request_id = the
  trace id (or ``trace_id/span_id`` when a trace has several retriever spans); user and session
  from the trace metadata ``mlflow.trace.user`` / ``mlflow.trace.session``.
* Langfuse: observations as the public API returns them (a page ``{"data": [...], "meta"}``, a
  list, or one per line), or traces with their ``observations`` (``GET /api/public/traces/{id}``;
  the trace's ``userId``/``sessionId`` then apply). Type ``RETRIEVER`` (SDK v3), or a ``SPAN``
  whose output is a list of documents (LangChain retrievers through the v2 callback handler).
  request_id = observation id.
* LangSmith: runs as ``Client.list_runs`` returns them (``run_type`` "retriever", inputs
  ``query``, outputs ``documents`` or ``output``), nested ``child_runs`` included
  (``read_run(load_child_runs=True)``); user and session from ``extra.metadata``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from flywheel.capture.importers.common import ImportStats, Sink, document_from, parse_json_text
from flywheel.capture.schema import RecordError

_QUERY_KEYS = ("query", "question", "input", "query_str", "text", "q", "search_query")


def _query(value: Any) -> Any:
    value = parse_json_text(value)
    if isinstance(value, Mapping):
        for k in _QUERY_KEYS:
            if isinstance(value.get(k), str):
                return value[k]
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
    return value


def _documents(value: Any, field: str) -> list[dict] | None:
    value = parse_json_text(value)
    if isinstance(value, Mapping):
        value = next((value[k] for k in ("documents", "output", "result", "results") if isinstance(value.get(k), list)),
                     None)
    if not isinstance(value, list):
        return None
    return [document_from(d, f"{field}[{i}]") for i, d in enumerate(value)]


def _looks_like_documents(value: Any) -> bool:
    value = parse_json_text(value)
    if isinstance(value, Mapping):
        value = value.get("documents")
    return isinstance(value, list) and bool(value) and all(
        isinstance(d, Mapping) and ("page_content" in d or "kwargs" in d) for d in value)


def _emit(sink: Sink, stats: ImportStats, line: int, fields: dict, docs_value: Any, docs_field: str) -> None:
    try:
        results = _documents(docs_value, docs_field)
    except RecordError as err:
        stats.retrievals += 1
        stats.issue(line, err.field, err.reason, err.detail)
        return
    if results is None:
        stats.retrievals += 1
        stats.issue(line, docs_field, "missing_field" if docs_value is None else "wrong_type",
                    "no list of documents in the retriever's output")
        return
    sink.search(line, fields, results)


# -- MLflow ---------------------------------------------------------------------------------------

def is_mlflow(obj: Any) -> bool:
    if isinstance(obj, list):
        return bool(obj) and is_mlflow(obj[0])
    return isinstance(obj, Mapping) and isinstance(obj.get("data"), Mapping) and "spans" in obj["data"] \
        and isinstance(obj.get("info"), Mapping)


def _b64_hex(value: Any) -> Any:
    if isinstance(value, str) and len(value) % 4 == 0 and not all(c in "0123456789abcdef" for c in value):
        try:
            return base64.b64decode(value, validate=True).hex()
        except (binascii.Error, ValueError):
            return value
    return value


def import_mlflow(value: Any, line: int, sink: Sink, stats: ImportStats) -> None:
    if isinstance(value, list):
        for v in value:
            import_mlflow(v, line, sink, stats)
        return
    if not is_mlflow(value):
        stats.skip("not_an_mlflow_trace")
        return
    info = value["info"]
    meta = info.get("trace_metadata") or info.get("request_metadata") or {}
    trace_id = info.get("trace_id") or info.get("request_id")
    spans = [s for s in value["data"].get("spans") or [] if isinstance(s, Mapping)]
    kinds = [parse_json_text((s.get("attributes") or {}).get("mlflow.spanType")) for s in spans]
    n_retrievers = sum(k == "RETRIEVER" for k in kinds)
    for span, kind in zip(spans, kinds):
        if kind != "RETRIEVER":
            stats.skip(f"span_type_{str(kind).lower()}")
            continue
        attrs = span.get("attributes") or {}
        span_id = _b64_hex(span.get("span_id"))
        fields = {
            "request_id": trace_id if n_retrievers == 1 else f"{trace_id}/{span_id}",
            "timestamp": span.get("start_time_unix_nano") or span.get("start_time_ns") or info.get("request_time"),
            "query": _query(attrs.get("mlflow.spanInputs")),
            "user_id": meta.get("mlflow.trace.user"), "session_id": meta.get("mlflow.trace.session"),
            "retriever": span.get("name"),
        }
        _emit(sink, stats, line, fields, attrs.get("mlflow.spanOutputs"), "attributes.mlflow.spanOutputs")


# -- Langfuse -------------------------------------------------------------------------------------

def is_langfuse(obj: Any) -> bool:
    if isinstance(obj, Mapping) and isinstance(obj.get("data"), list):
        return bool(obj["data"]) and is_langfuse(obj["data"][0])
    if isinstance(obj, Mapping) and isinstance(obj.get("observations"), list) and "timestamp" in obj:
        return True  # a trace with its observations
    if isinstance(obj, list):
        return bool(obj) and is_langfuse(obj[0])
    return isinstance(obj, Mapping) and "traceId" in obj and "startTime" in obj and "type" in obj


def import_langfuse(value: Any, line: int, sink: Sink, stats: ImportStats, trace: Mapping | None = None) -> None:
    if isinstance(value, Mapping) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, Mapping) and isinstance(value.get("observations"), list) and "traceId" not in value:
        for v in value["observations"]:
            import_langfuse(v, line, sink, stats, trace=value)
        return
    if isinstance(value, list):
        for v in value:
            import_langfuse(v, line, sink, stats, trace)
        return
    if not is_langfuse(value):
        stats.skip("not_a_langfuse_observation")
        return
    kind = str(value.get("type") or "").upper()
    if kind != "RETRIEVER" and not (kind == "SPAN" and _looks_like_documents(value.get("output"))):
        stats.skip(f"observation_type_{kind.lower() or 'missing'}")
        return
    meta = value.get("metadata") if isinstance(value.get("metadata"), Mapping) else {}
    fields = {
        "request_id": value.get("id"), "timestamp": value.get("startTime"), "query": _query(value.get("input")),
        "user_id": value.get("userId") or meta.get("user_id") or (trace or {}).get("userId"),
        "session_id": value.get("sessionId") or meta.get("session_id") or (trace or {}).get("sessionId"),
        "retriever": value.get("name"), "retriever_version": value.get("version"),
    }
    _emit(sink, stats, line, fields, value.get("output"), "output")


# -- LangSmith ------------------------------------------------------------------------------------

def is_langsmith(obj: Any) -> bool:
    if isinstance(obj, list):
        return bool(obj) and is_langsmith(obj[0])
    return isinstance(obj, Mapping) and "run_type" in obj and ("inputs" in obj or "outputs" in obj)


def import_langsmith(value: Any, line: int, sink: Sink, stats: ImportStats) -> None:
    if isinstance(value, list):
        for v in value:
            import_langsmith(v, line, sink, stats)
        return
    if not is_langsmith(value):
        stats.skip("not_a_langsmith_run")
        return
    for child in value.get("child_runs") or []:
        import_langsmith(child, line, sink, stats)
    if str(value.get("run_type")).lower() != "retriever":
        stats.skip(f"run_type_{str(value.get('run_type')).lower()}")
        return
    extra = value.get("extra") if isinstance(value.get("extra"), Mapping) else {}
    meta = extra.get("metadata") if isinstance(extra.get("metadata"), Mapping) else {}
    fields = {
        "request_id": value.get("id"), "timestamp": value.get("start_time"), "query": _query(value.get("inputs")),
        "user_id": meta.get("user_id"),
        "session_id": meta.get("session_id") or meta.get("thread_id") or meta.get("conversation_id"),
        "retriever": value.get("name"), "retriever_version": meta.get("revision_id"),
    }
    _emit(sink, stats, line, fields, value.get("outputs"), "outputs.documents")
