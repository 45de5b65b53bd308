"""Importers: logs a team already has (JSON Lines, CSV, OpenTelemetry/OpenInference spans) into capture records.

A team should not have to wait a week of new logging before the flywheel can start: their
existing retrieval logs or Phoenix traces become the same v1 records the capture library writes,
through the same day-file writer, redaction and validator. Every input record is either
imported or reported (file, line, field, reason); a bad one never stops the good ones. I/O errors
on the log directory (a full disk) do raise: an import, unlike a live app, should fail loudly.

Column mappings name, for each capture field, where it lives in the input:
``{"query": "question", "request_id": "id", "results": "contexts", "results.chunk_id": "doc_id",
"results.text": "content"}`` (JSON Lines, dotted paths into nested objects) or
``{"request_id": "req", "query": "q", "chunk_id": "doc", "text": "passage", "score": "s"}`` (CSV,
one row per retrieved chunk, rows grouped by request id). Unmapped fields keep their own names;
a missing rank is the position in the input. Timestamps may be ISO-8601 (no offset = UTC) or epoch
seconds / milliseconds / microseconds / nanoseconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flywheel.capture.logger import _TextPolicy, build_search_record
from flywheel.capture.schema import RecordError, validate
from flywheel.capture.writer import DayFileWriter

MAX_ISSUES_KEPT = 1_000
_SEARCH_FIELDS = ("request_id", "timestamp", "query", "user_id", "session_id", "retriever",
                  "retriever_version")
_RESULT_FIELDS = ("chunk_id", "text", "score", "rank", "metadata")


@dataclass
class ImportIssue:
    file: str
    line: int
    field: str | None
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f" field {self.field}" if self.field else "")
        return f"{where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class ImportStats:
    source: str
    read: int = 0
    imported: int = 0
    skipped: int = 0  # records that are not retrievals (other span kinds)
    issues: list[ImportIssue] = field(default_factory=list)
    issues_by_reason: dict[str, int] = field(default_factory=dict)
    files_written: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return sum(self.issues_by_reason.values())

    def add_issue(self, issue: ImportIssue) -> None:
        self.issues_by_reason[issue.reason] = self.issues_by_reason.get(issue.reason, 0) + 1
        if len(self.issues) < MAX_ISSUES_KEPT:
            self.issues.append(issue)


def to_datetime(value: Any, field_name: str = "timestamp") -> datetime:
    """A UTC datetime from ISO-8601 (naive = UTC) or an epoch number in s, ms, us or ns."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        s = value.strip()
        try:
            value = float(s)
        except ValueError:
            try:
                ts = datetime.fromisoformat(s)
            except ValueError:
                raise RecordError("bad_timestamp", field_name, f"not ISO-8601 or epoch: {s[:60]!r}") from None
            return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError("missing_field" if value is None else "wrong_type", field_name)
    v = float(value)
    for scale in (1e9, 1e6, 1e3):  # ns, us, ms
        if abs(v) >= scale * 1e8:
            v /= scale
            break
    try:
        return datetime.fromtimestamp(v, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise RecordError("bad_timestamp", field_name, f"epoch {value!r} out of range") from None


def _get(obj: Any, path: str) -> Any:
    """obj[a][b] for "a.b"; a key containing dots is tried whole first."""
    if isinstance(obj, Mapping) and path in obj:
        return obj[path]
    cur = obj
    for part in path.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


class _Sink:
    """Builds, redacts, validates and writes search records; collects issues."""

    def __init__(self, log_dir: Path, stats: ImportStats, redact_pii: bool, retriever, retriever_version):
        self.writer = DayFileWriter(log_dir)
        self.stats = stats
        self.text = _TextPolicy(redact_pii, None)
        self.retriever = retriever
        self.retriever_version = retriever_version

    def search(self, file: str, line: int, fields: dict, results: Any) -> None:
        try:
            ts = to_datetime(fields.get("timestamp"))
            for i, r in enumerate(results if isinstance(results, list) else []):
                if isinstance(r, dict) and isinstance(r.get("metadata"), str):
                    try:
                        r["metadata"] = json.loads(r["metadata"])
                    except ValueError:
                        r["metadata"] = {"raw": r["metadata"]}
            record = build_search_record(
                fields.get("query"), results, request_id=fields.get("request_id"),
                user_id=fields.get("user_id"), session_id=fields.get("session_id"), timestamp=ts,
                retriever=fields.get("retriever") or self.retriever,
                retriever_version=fields.get("retriever_version") or self.retriever_version,
                text_policy=self.text,
            )
            if fields.get("request_id") in (None, ""):
                raise RecordError("missing_field", "request_id")
            validate(json.loads(json.dumps(record, default=str)))
        except RecordError as err:
            self.stats.add_issue(ImportIssue(file, line, err.field, err.reason, err.detail))
            return
        self.writer.write(record)
        self.stats.imported += 1

    def raw(self, file: str, line: int, obj: dict) -> None:
        """A record already in capture format (any accepted schema version)."""
        try:
            validate(obj)
        except RecordError as err:
            self.stats.add_issue(ImportIssue(file, line, err.field, err.reason, err.detail))
            return
        self.writer.write(obj if obj.get("schema_version") == 1 else _v1(obj))
        self.stats.imported += 1

    def close(self) -> None:
        self.stats.files_written = sorted(str(p) for p in self.writer.files())
        self.writer.close()


def _v1(obj: dict) -> dict:
    from flywheel.capture.schema import upgrade

    return upgrade(obj)


def _json_lines(path: Path, stats: ImportStats) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            stats.read += 1
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                stats.add_issue(ImportIssue(str(path), lineno, None, "invalid_utf8", f"byte {exc.start}"))
            except ValueError as exc:
                stats.add_issue(ImportIssue(str(path), lineno, None, "invalid_json", str(exc)[:120]))


def _is_capture_record(obj: dict) -> bool:
    """A record already in capture format: v1 (``schema_version``/``type``) or v0 (``id`` + ``docs``/``event``)."""
    return "schema_version" in obj or "type" in obj or ("id" in obj and ("docs" in obj or obj.get("event") == "feedback"))


def import_jsonl(path: str | Path, log_dir: str | Path, *, mapping: Mapping[str, str] | None = None,
                 redact_pii: bool = True, retriever: str | None = None,
                 retriever_version: str | None = None) -> ImportStats:
    """One JSON object per line, each a retrieval with its results nested (see the module doc)."""
    path = Path(path)
    mapping = dict(mapping or {})
    stats = ImportStats(str(path))
    sink = _Sink(Path(log_dir), stats, redact_pii, retriever, retriever_version)
    try:
        for lineno, obj in _json_lines(path, stats):
            if not isinstance(obj, dict):
                stats.add_issue(ImportIssue(str(path), lineno, None, "not_an_object"))
                continue
            if not mapping and _is_capture_record(obj):
                sink.raw(str(path), lineno, obj)
                continue
            fields = {f: _get(obj, mapping.get(f, f)) for f in _SEARCH_FIELDS}
            items = _get(obj, mapping.get("results", "results"))
            if isinstance(items, list):
                items = [
                    {f: _get(r, mapping.get(f"results.{f}", f)) for f in _RESULT_FIELDS} if isinstance(r, Mapping) else r
                    for r in items
                ]
                for i, r in enumerate(items):
                    if isinstance(r, dict) and r.get("rank") is None:
                        r["rank"] = i + 1
            sink.search(str(path), lineno, fields, items)
    finally:
        sink.close()
    return stats


def import_csv(path: str | Path, log_dir: str | Path, *, mapping: Mapping[str, str] | None = None,
               redact_pii: bool = True, retriever: str | None = None, retriever_version: str | None = None,
               delimiter: str = ",") -> ImportStats:
    """One row per retrieved chunk; rows with the same request id form one search record."""
    path = Path(path)
    mapping = dict(mapping or {})
    stats = ImportStats(str(path))
    sink = _Sink(Path(log_dir), stats, redact_pii, retriever, retriever_version)
    groups: dict[str, dict] = {}
    try:
        with open(path, newline="", encoding="utf-8", errors="strict") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = [mapping.get(k, k) for k in ("request_id", "query", "timestamp")
                       if mapping.get(k, k) not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: columns {missing} not found (columns: {reader.fieldnames}); "
                                 "pass mapping={{field: column}}")
            for row in reader:
                line = reader.line_num
                stats.read += 1
                col = lambda k: row.get(mapping.get(k, k))  # noqa: E731
                rid = col("request_id")
                if not rid:
                    stats.add_issue(ImportIssue(str(path), line, mapping.get("request_id", "request_id"),
                                                "missing_field"))
                    continue
                g = groups.get(rid)
                if g is None:
                    g = groups[rid] = {"line": line, "fields": {f: col(f) or None for f in _SEARCH_FIELDS},
                                       "results": [], "bad": None}
                if g["bad"]:
                    continue
                chunk_id = col("chunk_id")
                if not chunk_id:
                    continue  # a request row without a chunk (no results)
                try:
                    score = float(col("score"))
                except (TypeError, ValueError):
                    g["bad"] = ImportIssue(str(path), line, mapping.get("score", "score"), "wrong_type",
                                           f"score {col('score')!r} is not a number")
                    continue
                rank_raw = col("rank")
                try:
                    rank = int(rank_raw) if rank_raw not in (None, "") else len(g["results"]) + 1
                except ValueError:
                    g["bad"] = ImportIssue(str(path), line, mapping.get("rank", "rank"), "wrong_type",
                                           f"rank {rank_raw!r} is not an integer")
                    continue
                g["results"].append({"chunk_id": chunk_id, "text": col("text") or "", "score": score,
                                     "rank": rank, "metadata": None})
        for g in groups.values():
            if g["bad"]:
                stats.add_issue(g["bad"])
            else:
                sink.search(str(path), g["line"], g["fields"], g["results"])
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc})") from None
    finally:
        sink.close()
    return stats


# -- OpenTelemetry / OpenInference ---------------------------------------------------------------

def _otlp_value(v: Any) -> Any:
    if not isinstance(v, Mapping):
        return v
    for k in ("stringValue", "doubleValue", "boolValue"):
        if k in v:
            return v[k]
    if "intValue" in v:
        return int(v["intValue"])
    if "arrayValue" in v:
        return [_otlp_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: _otlp_value(kv.get("value")) for kv in v["kvlistValue"].get("values", [])}
    return None


def _flatten(obj: Any, prefix: str, out: dict) -> dict:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj and all(isinstance(x, Mapping) for x in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = obj
    return out


def _spans(doc: Any) -> Iterator[dict]:
    """Normalise OTLP JSON, flat span dicts and Phoenix dataframe rows to one flat shape."""
    if isinstance(doc, list):
        for d in doc:
            yield from _spans(d)
        return
    if not isinstance(doc, Mapping):
        return
    if "resourceSpans" in doc:
        for rs in doc["resourceSpans"]:
            resource = {a["key"]: _otlp_value(a.get("value")) for a in rs.get("resource", {}).get("attributes", [])}
            for ss in rs.get("scopeSpans", rs.get("instrumentationLibrarySpans", [])):
                for sp in ss.get("spans", []):
                    attrs = {a["key"]: _otlp_value(a.get("value")) for a in sp.get("attributes", [])}
                    yield {"span_id": sp.get("spanId"), "trace_id": sp.get("traceId"), "name": sp.get("name"),
                           "start": sp.get("startTimeUnixNano"), "attributes": _flatten(attrs, "", {}),
                           "resource": resource}
        return
    attrs = doc.get("attributes")
    flat = _flatten(attrs, "", {}) if isinstance(attrs, Mapping) else {}
    for k, v in doc.items():  # Phoenix dataframe rows: "attributes.input.value", ...
        if k.startswith("attributes."):
            _flatten(v, k[len("attributes."):], flat)
    ctx = doc.get("context") if isinstance(doc.get("context"), Mapping) else {}
    if "span_kind" in doc and "openinference.span.kind" not in flat:
        flat["openinference.span.kind"] = doc["span_kind"]
    yield {
        "span_id": ctx.get("span_id") or doc.get("context.span_id") or doc.get("span_id") or doc.get("spanId"),
        "trace_id": ctx.get("trace_id") or doc.get("context.trace_id") or doc.get("trace_id"),
        "name": doc.get("name"),
        "start": doc.get("start_time") or doc.get("startTimeUnixNano") or doc.get("start_time_unix_nano"),
        "attributes": flat,
        "resource": _flatten(doc.get("resource", {}).get("attributes", {}), "", {})
        if isinstance(doc.get("resource"), Mapping) else {},
    }


def _query_text(attrs: dict) -> Any:
    value = attrs.get("input.value")
    if isinstance(value, str) and (attrs.get("input.mime_type") == "application/json" or value.lstrip().startswith("{")):
        try:
            obj = json.loads(value)
        except ValueError:
            return value
        if isinstance(obj, Mapping):
            for k in ("query", "input", "question", "q", "query_str"):
                if isinstance(obj.get(k), str):
                    return obj[k]
    return value


def _span_documents(attrs: dict) -> list[dict]:
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
            continue
        docs.setdefault(int(idx), {})[key] = v
    out = []
    for rank, idx in enumerate(sorted(docs), start=1):
        d = docs[idx]
        out.append({"chunk_id": d.get("id"), "text": d.get("content"), "score": d.get("score"),
                    "rank": rank, "metadata": d.get("metadata")})
    return out


def import_openinference(path: str | Path, log_dir: str | Path, *, redact_pii: bool = True,
                         retriever: str | None = None, retriever_version: str | None = None) -> ImportStats:
    """RETRIEVER spans (``openinference.span.kind``) from OTLP JSON, span JSON Lines or Phoenix exports.

    request_id = span id (Phoenix attaches feedback annotations to spans), query = ``input.value``
    (or its ``query`` key when it is JSON), results = ``retrieval.documents.N.document.*`` in index
    order, user/session from ``user.id``/``session.id``, retriever = span name, version from
    ``retriever.version`` or the resource's ``service.version``.
    """
    path = Path(path)
    stats = ImportStats(str(path))
    sink = _Sink(Path(log_dir), stats, redact_pii, retriever, retriever_version)
    try:
        text = path.read_bytes()
        stripped = text.lstrip()
        if stripped.startswith(b"[") or (stripped.startswith(b"{") and b"\n{" not in text.strip()):
            try:
                entries: Iterator = iter([(1, json.loads(text.decode("utf-8")))])
            except ValueError:
                entries = _json_lines(path, stats)
            else:
                stats.read += 1
        else:
            entries = _json_lines(path, stats)
        for lineno, doc in entries:
            for span in _spans(doc):
                attrs = span["attributes"]
                kind = str(attrs.get("openinference.span.kind") or "").upper()
                if kind != "RETRIEVER":
                    stats.skipped += 1
                    continue
                fields = {
                    "request_id": span["span_id"],
                    "timestamp": span["start"],
                    "query": _query_text(attrs),
                    "user_id": attrs.get("user.id"),
                    "session_id": attrs.get("session.id"),
                    "retriever": span["name"],
                    "retriever_version": attrs.get("retriever.version") or span["resource"].get("service.version"),
                }
                sink.search(str(path), lineno, fields, _span_documents(attrs))
    finally:
        sink.close()
    return stats
