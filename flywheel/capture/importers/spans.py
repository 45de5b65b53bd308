"""OpenInference RETRIEVER spans, in every shape they are exported in.

Shapes read (auto-detected per value): OTLP JSON (``resourceSpans``; the collector's file exporter
writes one such document per line), the OpenTelemetry SDK's ``ConsoleSpanExporter`` and
``ReadableSpan.to_json()`` (``context``/``attributes``, pretty-printed or one per line), Phoenix
span JSON (``span_kind``, ``attributes.retrieval.documents`` as a list) and Phoenix span
dataframe rows (``context.span_id``, ``attributes.*`` columns), flat or nested attributes.

As the instrumentors emit them: LangChain gives ``document.content`` and ``.metadata`` only (no
id, no score); LlamaIndex omits a score that is None and also emits an inner ``_retrieve`` span
without documents (skipped, counted); Haystack's embedding retriever has the query *embedding* as
its input: the query text is then taken from the EMBEDDING span of the same trace that embedded
it (spans of a trace may come in any order, so such spans wait until the file is read), and
reported as ``non_text_query`` when there is none. request_id = span id (hex, as Phoenix attaches
feedback to spans), retriever = span name, version = ``retriever.version`` or the resource's
``service.version``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from flywheel.capture.importers.common import ImportStats, Sink, make_result, parse_json_text
from flywheel.capture.schema import RecordError, coerce_timestamp

_TEXT_KEYS = ("query", "query_str", "question", "input", "q", "text", "search_query")
_VECTOR_KEYS = ("query_embedding", "embedding", "query_vector", "vector")


def _otlp_value(v: Any) -> Any:
    """An OTLP AnyValue; a malformed one is kept as given (only the field that uses it fails)."""
    if not isinstance(v, Mapping):
        return v
    for k in ("stringValue", "doubleValue", "boolValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        try:
            return int(v["intValue"])
        except (TypeError, ValueError):
            return v["intValue"]
    if "arrayValue" in v:
        return [_otlp_value(x) for x in (v["arrayValue"] or {}).get("values", []) or []]
    if "kvlistValue" in v:
        return {kv.get("key"): _otlp_value(kv.get("value")) for kv in (v["kvlistValue"] or {}).get("values", []) or []}
    return None


def _flatten(obj: Any, prefix: str, out: dict) -> dict:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj and all(isinstance(x, Mapping) for x in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    elif prefix.endswith("retrieval.documents") and isinstance(obj, str) and obj.startswith("["):
        _flatten(parse_json_text(obj), prefix, out)  # Phoenix rows: the documents as a JSON string
    else:
        out[prefix] = obj
    return out


def _hex_id(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("0x"):
        return value[2:]
    return value


def _kv_attrs(items: Any) -> dict:
    return {a.get("key"): _otlp_value(a.get("value")) for a in items or [] if isinstance(a, Mapping)}


def spans_of(doc: Any) -> Iterator[dict]:
    """Normalise every span shape to {span_id, trace_id, name, start, attributes (flat), resource}."""
    if isinstance(doc, list):
        for d in doc:
            yield from spans_of(d)
        return
    if not isinstance(doc, Mapping):
        return
    if "resourceSpans" in doc:
        for rs in doc.get("resourceSpans") or []:
            resource = _kv_attrs((rs.get("resource") or {}).get("attributes"))
            for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or []:
                for sp in ss.get("spans") or []:
                    yield {"span_id": sp.get("spanId"), "trace_id": sp.get("traceId"), "name": sp.get("name"),
                           "start": sp.get("startTimeUnixNano"),
                           "attributes": _flatten(_kv_attrs(sp.get("attributes")), "", {}), "resource": resource}
        return
    attrs = doc.get("attributes")
    flat = _flatten(attrs, "", {}) if isinstance(attrs, Mapping) else {}
    for k, v in doc.items():  # Phoenix dataframe rows: "attributes.input.value", ...
        if k.startswith("attributes."):
            _flatten(v, k[len("attributes."):], flat)
    ctx = doc.get("context") if isinstance(doc.get("context"), Mapping) else {}
    if doc.get("span_kind") and "openinference.span.kind" not in flat:
        flat["openinference.span.kind"] = doc["span_kind"]
    resource = doc.get("resource")
    yield {
        "span_id": _hex_id(ctx.get("span_id") or doc.get("context.span_id") or doc.get("span_id") or doc.get("spanId")),
        "trace_id": _hex_id(ctx.get("trace_id") or doc.get("context.trace_id") or doc.get("trace_id")),
        "name": doc.get("name"),
        "start": doc.get("start_time") or doc.get("startTimeUnixNano") or doc.get("start_time_unix_nano"),
        "attributes": flat,
        "resource": _flatten(resource.get("attributes", {}), "", {}) if isinstance(resource, Mapping) else {},
    }


def is_span_value(obj: Any) -> bool:
    if isinstance(obj, list):
        return bool(obj) and is_span_value(obj[0])
    return isinstance(obj, Mapping) and (
        "resourceSpans" in obj or "span_kind" in obj or "context.span_id" in obj
        or (isinstance(obj.get("context"), Mapping) and isinstance(obj.get("attributes"), Mapping)))


class NonTextQuery(Exception):
    """The retriever's input is a vector, not text."""


def _is_vector(value: Any) -> bool:
    if isinstance(value, str):
        s = value.strip()
        return s.startswith("<") and "vector>" in s  # OpenInference's summary of an embedding
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)


def query_of(attrs: dict) -> Any:
    """The query text of a retriever span; raises NonTextQuery when its input is an embedding."""
    value = attrs.get("input.value")
    if isinstance(value, str) and (attrs.get("input.mime_type") == "application/json" or value.lstrip()[:1] in "{["):
        value = parse_json_text(value)
    if _is_vector(value):
        raise NonTextQuery
    if isinstance(value, Mapping):
        for holder in (value, value.get("query_bundle"), value.get("kwargs"), value.get("inputs")):
            if isinstance(holder, Mapping):
                for k in _TEXT_KEYS:
                    if isinstance(holder.get(k), str):
                        return holder[k]
        if any(k in value and (_is_vector(value[k]) or value[k] is not None) for k in _VECTOR_KEYS):
            raise NonTextQuery
    return value


def documents_of(attrs: dict) -> list[dict] | None:
    """Results in index order; None when the span carries no documents at all."""
    docs: dict[int, dict] = {}
    prefix = "retrieval.documents."
    for k, v in attrs.items():
        if not k.startswith(prefix):
            continue
        idx, _, rest = k[len(prefix):].partition(".")
        if not idx.isdigit():
            continue
        key = rest[len("document."):] if rest.startswith("document.") else rest
        if key.startswith("metadata."):  # metadata flattened into keys
            docs.setdefault(int(idx), {}).setdefault("metadata", {})[key[len("metadata."):]] = v
        else:
            docs.setdefault(int(idx), {})[key] = v
    if not docs:
        out = parse_json_text(attrs.get("output.value"))
        empty = out == [] or (isinstance(out, Mapping) and out.get("documents") == [])
        return [] if empty else None
    results = []
    for pos, idx in enumerate(sorted(docs)):
        d = docs[idx]
        results.append(make_result(d.get("id"), d.get("content"), d.get("score"), d.get("metadata"),
                                   f"retrieval.documents.{idx}.document"))
        results[-1]["rank"] = pos + 1
    return results


def _embedding_text(attrs: dict) -> str | None:
    text = attrs.get("embedding.embeddings.0.embedding.text")
    return text if isinstance(text, str) and text.strip() else None


class SpanImporter:
    """Feeds spans to a Sink; holds retriever spans with a vector query until the file is read."""

    def __init__(self, sink: Sink, stats: ImportStats):
        self.sink, self.stats = sink, stats
        self.embedding_texts: dict[Any, list[tuple[float, str]]] = {}
        self.waiting: list[tuple[int, dict, dict, list]] = []

    def feed(self, line: int, value: Any) -> None:
        found = False
        for span in spans_of(value):
            found = True
            self._span(line, span)
        if not found:
            self.stats.skip("not_a_span")

    def _span(self, line: int, span: dict) -> None:
        attrs = span["attributes"]
        kind = str(attrs.get("openinference.span.kind") or "").upper()
        if kind == "EMBEDDING" and _embedding_text(attrs):
            self.embedding_texts.setdefault(span["trace_id"], []).append((_start(span), _embedding_text(attrs)))
        if kind != "RETRIEVER":
            self.stats.skip(f"span_kind_{kind.lower() or 'missing'}")
            return
        try:
            results = documents_of(attrs)
        except RecordError as err:
            self.stats.retrievals += 1
            self.stats.issue(line, err.field, err.reason, err.detail)
            return
        if results is None:
            self.stats.skip("retriever_span_without_documents")
            return
        fields = {
            "request_id": span["span_id"], "timestamp": span["start"], "user_id": attrs.get("user.id"),
            "session_id": attrs.get("session.id"), "retriever": span["name"],
            "retriever_version": attrs.get("retriever.version") or span["resource"].get("service.version"),
        }
        try:
            fields["query"] = query_of(attrs)
        except NonTextQuery:
            self.waiting.append((line, span, fields, results))
            return
        self.sink.search(line, fields, results)

    def finish(self) -> None:
        """Retriever spans whose input was a vector: the query text of the same trace's embedding."""
        for line, span, fields, results in self.waiting:
            texts = sorted(self.embedding_texts.get(span["trace_id"], []))
            before = [t for s, t in texts if s <= _start(span)] or [t for _, t in texts]
            if not before:
                self.stats.retrievals += 1
                self.stats.issue(line, "input.value", "non_text_query",
                                 "the query is an embedding and no EMBEDDING span of the trace has its text")
                continue
            fields["query"] = before[-1]
            self.sink.search(line, fields, results)
        self.waiting = []


def _start(span: dict) -> float:
    try:
        return coerce_timestamp(span["start"]).timestamp()
    except RecordError:
        return math.inf
