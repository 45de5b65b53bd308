"""A team's own logs: JSON Lines with a field mapping, CSV with a column mapping, capture records.

Mappings name, for each capture field, where it lives in the input:
``{"query": "question", "request_id": "id", "results": "contexts", "results.chunk_id": "doc_id",
"results.text": "content"}`` (JSON, dotted paths into nested objects) or
``{"request_id": "req", "query": "q", "chunk_id": "doc", "text": "passage", "score": "s"}`` (CSV,
one row per retrieved chunk; rows of one request id form one search). Unmapped fields keep their
own names; a missing rank is the position; a missing score is null. A mapping that names a
column the CSV does not have is an error before anything is imported (a typo must not import
every search with no results), and so is a JSON mapping path that no record of the file has.
"""

from __future__ import annotations

import csv
import difflib
from collections.abc import Mapping
from typing import Any

from flywheel.capture.importers.common import ImportStats, Sink, iter_lines
from flywheel.capture.schema import RecordError

SEARCH_FIELDS = ("request_id", "timestamp", "query", "user_id", "session_id", "retriever", "retriever_version")
RESULT_FIELDS = ("chunk_id", "text", "score", "rank", "metadata")
CSV_REQUIRED = ("request_id", "timestamp", "query", "chunk_id", "text")


class MappingError(ValueError):
    """A mapping that does not fit the file: raised before anything is imported."""


def get_path(obj: Any, path: str) -> Any:
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


def is_capture_record(obj: Any) -> bool:
    """Capture format: v1 (``schema_version``/``type``) or v0 (``id`` + ``docs``/``event``)."""
    return isinstance(obj, Mapping) and (
        ("schema_version" in obj and obj.get("type") in ("search", "feedback"))
        or obj.get("type") in ("search", "feedback")
        or ("id" in obj and ("docs" in obj or obj.get("event") == "feedback")))


class MappedJson:
    """Records shaped as ``mapping`` says; remembers which mapped paths were ever found."""

    def __init__(self, sink: Sink, stats: ImportStats, mapping: Mapping[str, str] | None):
        self.sink, self.stats = sink, stats
        self.mapping = dict(mapping or {})
        self.found: set[str] = set()

    def feed(self, line: int, obj: Any) -> None:
        if not isinstance(obj, Mapping):
            self.stats.retrievals += 1
            self.stats.issue(line, None, "not_an_object", f"a JSON {type(obj).__name__}")
            return
        if not self.mapping and is_capture_record(obj):
            self.sink.capture_record(line, obj)
            return
        m = self.mapping
        fields = {}
        for f in SEARCH_FIELDS:
            fields[f] = get_path(obj, m.get(f, f))
            if fields[f] is not None:
                self.found.add(f)
        items = get_path(obj, m.get("results", "results"))
        if items is not None:
            self.found.add("results")
        if isinstance(items, list):
            items = [self._result(r) if isinstance(r, Mapping) else r for r in items]
        self.sink.search(line, fields, items)

    def _result(self, r: Mapping) -> dict:
        out = {}
        for f in RESULT_FIELDS:
            out[f] = get_path(r, self.mapping.get(f"results.{f}", f))
            if out[f] is not None:
                self.found.add(f"results.{f}")
        return out

    def finish(self) -> None:
        if self.stats.retrievals == 0:
            return
        for key, path in self.mapping.items():
            if key not in self.found:
                self.stats.issue(0, path, "mapping_never_matched",
                                 f"no record of the file has {path!r} (mapped to {key}): a typo?")


def _check_columns(columns: list[str], mapping: Mapping[str, str], source: str) -> None:
    problems = []
    for key in sorted(set(CSV_REQUIRED) | set(mapping)):
        col = mapping.get(key, key)
        if col not in columns:
            near = difflib.get_close_matches(col, columns, n=1)
            problems.append(f"{key} -> column {col!r} not found" + (f" (did you mean {near[0]!r}?)" if near else ""))
    if problems:
        raise MappingError(f"{source}: {'; '.join(problems)}; columns are {columns}; "
                           f"pass mapping={{field: column}} (--map field=column)")


def import_csv_rows(sink: Sink, stats: ImportStats, path, mapping: Mapping[str, str] | None,
                    delimiter: str = ",") -> None:
    """Rows are streamed; the rows of each request are grouped until the end of the file."""
    mapping = dict(mapping or {})
    lines = (text for _, text in iter_lines(path, stats))
    reader = csv.DictReader(lines, delimiter=delimiter)
    _check_columns(list(reader.fieldnames or []), mapping, str(path))
    col = lambda row, k: row.get(mapping.get(k, k))  # noqa: E731
    groups: dict[str, dict] = {}
    for row in reader:
        line = reader.line_num
        stats.read += 1
        rid = col(row, "request_id")
        if not rid:
            stats.retrievals += 1
            stats.issue(line, mapping.get("request_id", "request_id"), "missing_field")
            continue
        g = groups.get(rid)
        if g is None:
            g = groups[rid] = {"line": line, "fields": {f: col(row, f) or None for f in SEARCH_FIELDS},
                               "results": [], "bad": None}
        if g["bad"] or not col(row, "chunk_id"):
            continue  # a request row without a chunk: a search with no results
        try:
            g["results"].append(_csv_result(row, col, mapping, len(g["results"]) + 1))
        except RecordError as err:
            g["bad"] = (line, err)
    for g in groups.values():
        if g["bad"]:
            stats.retrievals += 1
            line, err = g["bad"]
            stats.issue(line, err.field, err.reason, err.detail)
        else:
            sink.search(g["line"], g["fields"], g["results"])


def _csv_result(row: dict, col, mapping: Mapping[str, str], position: int) -> dict:
    raw_score = col(row, "score")
    try:
        score = float(raw_score) if raw_score not in (None, "") else None
    except ValueError:
        raise RecordError("wrong_type", mapping.get("score", "score"), f"score {raw_score!r} is not a number") from None
    raw_rank = col(row, "rank")
    try:
        rank = int(raw_rank) if raw_rank not in (None, "") else position
    except ValueError:
        raise RecordError("wrong_type", mapping.get("rank", "rank"), f"rank {raw_rank!r} is not an integer") from None
    return {"chunk_id": col(row, "chunk_id"), "text": col(row, "text") or "", "score": score, "rank": rank,
            "metadata": None}


def sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


