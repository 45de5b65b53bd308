"""What every importer shares: the per-file summary, the streaming JSON reader and the record sink.

``iter_json_values`` streams any mix of JSON Lines, pretty-printed objects one after another (the
OpenTelemetry SDK's ``ConsoleSpanExporter``) and whole documents, from plain, gzip (``.gz``) or
BOM-prefixed files, yielding each top-level value with the line it starts on. A value that does
not parse is reported (file, line, reason) and reading resumes at the next line that starts a
value, so one bad value never stops the good ones. Only one top-level value is held at a time.

``Sink`` turns a candidate retrieval (query, documents as the tool gave them) into a capture
record: a chunk id from the document, else from its metadata, else a content hash; a missing
score stays null (the order is the rank); PII redaction; the same ``validate`` the reader uses;
the day folder of the UTC-normalised timestamp. Every candidate is either written or reported.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flywheel.capture.logger import _TextPolicy, build_search_record
from flywheel.capture.schema import (
    MAX_LINE_BYTES,
    RecordError,
    coerce_id,
    coerce_timestamp,
    format_timestamp,
    validate,
)
from flywheel.capture.writer import DayFileWriter, encode_line

MAX_ISSUES_KEPT = 1_000
MAX_VALUE_CHARS = 64 * 1024 * 1024  # one top-level JSON value; larger ones are reported, not held
_ID_KEYS = ("chunk_id", "id", "doc_id", "document_id", "node_id", "_id", "uuid")


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
    """The summary of one input file."""

    source: str
    format: str = ""
    read: int = 0  # top-level values (lines, objects, rows) read
    retrievals: int = 0  # retrieval records found (imported + rejected)
    imported: int = 0
    feedback: int = 0  # capture-format feedback records imported
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # not retrievals: other spans...
    issues: list[ImportIssue] = field(default_factory=list)
    issues_by_reason: dict[str, int] = field(default_factory=dict)
    files_written: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def rejected(self) -> int:
        return sum(self.issues_by_reason.values())

    @property
    def lost(self) -> int:
        """Retrieval records found but not imported (each one has an issue)."""
        return self.retrievals - self.imported

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + n

    def add_issue(self, issue: ImportIssue) -> None:
        self.issues_by_reason[issue.reason] = self.issues_by_reason.get(issue.reason, 0) + 1
        if len(self.issues) < MAX_ISSUES_KEPT:
            self.issues.append(issue)

    def issue(self, line: int, fld: str | None, reason: str, detail: str = "") -> None:
        self.add_issue(ImportIssue(self.source, line, fld, reason, detail))

    def summary(self) -> dict:
        return {"file": self.source, "format": self.format, "read": self.read, "retrievals": self.retrievals,
                "imported": self.imported, "feedback": self.feedback, "lost": self.lost,
                "skipped": dict(sorted(self.skipped_by_reason.items())),
                "issues": dict(sorted(self.issues_by_reason.items())),
                "first_issues": [str(i) for i in self.issues[:20]]}


# -- reading ----------------------------------------------------------------------------------------

def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when it is gzip (by its magic number, whatever its name)."""
    f = open(path, "rb")
    if f.read(2) == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")
    f.seek(0)
    return f


def iter_lines(path: Path, stats: ImportStats) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; undecodable lines are reported; the BOM is dropped."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                stats.issue(lineno, None, "invalid_utf8", f"byte {exc.start}: {exc.reason}")


def _starts_value(text: str) -> bool:
    return text[:1] in ("{", "[")


def iter_json_values(path: Path, stats: ImportStats) -> Iterator[tuple[int, Any]]:
    """Each top-level JSON value of the file with the line it starts on (see the module doc)."""
    decoder = json.JSONDecoder()
    pending: list[tuple[int, str]] = []  # lines of the value being read
    size = 0
    lines = iter_lines(path, stats)
    replay: list[tuple[int, str]] = []
    while True:
        if replay:
            lineno, line = replay.pop(0)
        else:
            nxt = next(lines, None)
            if nxt is None:
                break
            lineno, line = nxt
        if not pending and line.strip() in ("", ","):
            continue
        pending.append((lineno, line))
        size += len(line)
        stripped = line.rstrip()
        closes = stripped.endswith(("}", "]")) and (len(pending) == 1 or not line[:1].isspace())
        if size > MAX_VALUE_CHARS:
            stats.read += 1
            stats.issue(pending[0][0], None, "value_too_large", f"over {MAX_VALUE_CHARS:,} characters")
            pending, size = [], 0
            continue
        if not closes:
            continue
        text = "".join(t for _, t in pending).strip().rstrip(",")
        try:
            value, end = decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            stats.read += 1
            stats.issue(pending[0][0] + exc.lineno - 1, None, "invalid_json", exc.msg)
            restart = next((i for i in range(1, len(pending)) if _starts_value(pending[i][1])), None)
            replay = (pending[restart:] if restart is not None else []) + replay
            pending, size = [], 0
            continue
        first = pending[0][0]
        pending, size = [], 0
        stats.read += 1
        yield first, value
        rest = text[end:].strip().lstrip(",").strip()
        if rest:  # two values on one line ("}{"): read the rest as if on its own line
            replay.insert(0, (lineno, rest + "\n"))
    if pending:  # values whose last line did not look like an end (indented documents)
        text = "".join(t for _, t in pending).strip().rstrip(",")
        try:
            value, end = decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            stats.read += 1
            stats.issue(pending[0][0] + exc.lineno - 1, None, "torn_value" if exc.pos >= len(text) - 1
                        else "invalid_json", exc.msg)
            return
        stats.read += 1
        yield pending[0][0], value
        if text[end:].strip():
            stats.issue(pending[0][0], None, "invalid_json", "extra data after the last value")


def parse_json_text(value: Any) -> Any:
    """A JSON string's value when it holds JSON ("{...}", "[...]"), else the value itself."""
    if isinstance(value, str) and value[:1] in ("{", "[", '"'):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# -- documents --------------------------------------------------------------------------------------

def content_id(text: str) -> str:
    """A stable chunk id for a document that has none: a hash of its content."""
    return "content:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:20]


def make_result(doc_id: Any, text: Any, score: Any, metadata: Any, field_prefix: str) -> dict:
    """One result: the document's id, else an id from its metadata, else a content hash."""
    metadata = parse_json_text(metadata)
    if metadata is not None and not isinstance(metadata, dict):
        metadata = {"value": metadata}
    cid = None
    if doc_id not in (None, ""):
        cid = coerce_id(doc_id, f"{field_prefix}.id")
    elif metadata:
        cid = next((coerce_id(metadata[k], f"{field_prefix}.metadata.{k}") for k in _ID_KEYS
                    if metadata.get(k) not in (None, "") and not isinstance(metadata[k], (dict, list))), None)
    if cid is None:
        if not isinstance(text, str):
            raise RecordError("missing_field", f"{field_prefix}.content", "a document with neither id nor text")
        cid = content_id(text)
    return {"chunk_id": cid, "text": text if text is not None else "", "score": score, "metadata": metadata}


def document_from(obj: Any, field_prefix: str) -> dict:
    """A result from a document as LangChain, MLflow, Langfuse or LangSmith serialise it."""
    if isinstance(obj, str):
        obj = parse_json_text(obj)
    if isinstance(obj, str):
        return make_result(None, obj, None, None, field_prefix)
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", field_prefix, f"a document is a {type(obj).__name__}")
    if isinstance(obj.get("kwargs"), dict):  # LangChain's serialised constructor form
        obj = {**obj["kwargs"], "id": obj["kwargs"].get("id")}
    text = next((obj[k] for k in ("page_content", "content", "text") if k in obj), None)
    score = next((obj[k] for k in ("score", "relevance_score", "similarity") if obj.get(k) is not None), None)
    return make_result(obj.get("id") or obj.get("doc_id"), text, score, obj.get("metadata"), field_prefix)


def dedupe_ids(results: list[dict]) -> None:
    """Derived ids can repeat (the same passage twice): later copies get ``#rank``."""
    seen: set[str] = set()
    for r in results:
        if r["chunk_id"] in seen:
            r["chunk_id"] = f"{r['chunk_id']}#{r['rank']}"
        seen.add(r["chunk_id"])


# -- writing ----------------------------------------------------------------------------------------

class Sink:
    """Builds, redacts, validates and writes records for one input file; reports what it cannot."""

    def __init__(self, log_dir: Path, stats: ImportStats, *, redact_pii: bool = True,
                 retriever: str | None = None, retriever_version: str | None = None):
        self.writer = DayFileWriter(log_dir)
        self.stats = stats
        self.text = _TextPolicy(redact_pii)
        self.retriever = retriever
        self.retriever_version = retriever_version

    def search(self, line: int, fields: dict, results: Any) -> bool:
        """One retrieval: ``results`` in rank order (rank = position when missing)."""
        self.stats.retrievals += 1
        try:
            if fields.get("request_id") in (None, ""):
                raise RecordError("missing_field", "request_id")
            if isinstance(results, list):
                for i, r in enumerate(results):
                    if isinstance(r, dict) and r.get("rank") is None:
                        r["rank"] = i + 1
                dedupe_ids([r for r in results if isinstance(r, dict) and "chunk_id" in r])
            record = build_search_record(
                fields.get("query"), results, request_id=fields["request_id"], user_id=fields.get("user_id"),
                session_id=fields.get("session_id"), timestamp=_required_ts(fields.get("timestamp")),
                retriever=fields.get("retriever") or self.retriever,
                retriever_version=fields.get("retriever_version") or self.retriever_version,
                text_policy=self.text)
            _check_line(encode_line(record))
            validate(json.loads(encode_line(record)))
        except RecordError as err:
            rid = fields.get("request_id")
            self.stats.issue(line, err.field, err.reason, f"record {rid}: {err.detail}" if rid else err.detail)
            return False
        self.writer.write(record)
        self.stats.imported += 1
        return True

    def capture_record(self, line: int, obj: dict) -> None:
        """A record already in capture format (v0 or v1): validated, redacted, written clean."""
        kind = obj.get("type") or ("feedback" if obj.get("event") == "feedback" else "search")
        if kind == "search":
            self.stats.retrievals += 1
        try:
            obj = dict(obj)
            if obj.get("schema_version") == 1 and obj.get("timestamp") is not None:
                obj["timestamp"] = format_timestamp(_required_ts(obj["timestamp"]))
            rec, ts = validate(obj)
        except RecordError as err:
            self.stats.issue(line, err.field, err.reason, err.detail)
            return
        rec["timestamp"] = format_timestamp(ts)  # the day folder follows the UTC date
        try:
            _check_line(encode_line(rec))
        except RecordError as err:
            self.stats.issue(line, err.field, err.reason, err.detail)
            return
        if rec["type"] == "search":
            rec["query"] = self.text.query(rec["query"])
            rec["user_id"] = self.text.identifier(rec["user_id"])
            rec["session_id"] = self.text.identifier(rec["session_id"])
            for r in rec["results"]:
                r["text"] = self.text.text(r["text"])
                r["metadata"] = self.text.metadata(r["metadata"])
            self.stats.imported += 1
        else:
            self.stats.feedback += 1
        self.writer.write(rec)

    def close(self) -> None:
        self.stats.files_written = sorted(str(p) for p in self.writer.files())
        self.writer.close()


def _check_line(data: bytes) -> None:
    if len(data) > MAX_LINE_BYTES:
        raise RecordError("line_too_long", None, f"{len(data):,} bytes > {MAX_LINE_BYTES:,}: the reader skips it")


def _required_ts(value: Any):
    return coerce_timestamp(value)
