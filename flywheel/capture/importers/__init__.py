"""Importers: traces and logs a team already has, turned into capture records.

A team should not have to wait a week of new logging before the flywheel can start. Formats:

    capture        capture records (v0/v1), e.g. logs copied from another machine
    jsonl          a team's own JSON Lines / JSON, shaped by a field mapping (see ``tabular``)
    csv            one row per retrieved chunk, with a column mapping
    openinference  OpenInference RETRIEVER spans (LangChain, LlamaIndex, Haystack instrumentors),
    otlp, phoenix  in OTLP JSON, the OpenTelemetry console exporter's output or Phoenix exports
                   (the three names read the same shapes; see ``spans``)
    mlflow         MLflow traces (RETRIEVER spans)       langfuse   Langfuse observations
    langsmith      LangSmith runs (run_type retriever)
    auto           decided per JSON value (CSV by file name)

Files are streamed (see ``common.iter_json_values``), plain, gzip or BOM-prefixed, rotated names
included (``app.jsonl.1``, ``spans.json.2.gz``); Parquet files (Phoenix's ``TraceDataset.save()``
and span dataframes saved with ``to_parquet``) are read in record batches, each row a value. Every input record is imported, skipped with a
reason (a span that is not a retrieval) or reported as an issue with file, line and field; a bad
one never stops the good ones. Records go through the capture library's coercion, redaction and
validator into the day file of their UTC date. I/O errors on the log directory do raise: an
import, unlike a live app, should fail loudly.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flywheel.capture.importers.common import ImportIssue, ImportStats, Sink, iter_json_values, iter_lines
from flywheel.capture.importers.platforms import (
    import_langfuse,
    import_langsmith,
    import_mlflow,
    is_langfuse,
    is_langsmith,
    is_mlflow,
)
from flywheel.capture.importers.spans import SpanImporter, is_span_value
from flywheel.capture.importers.tabular import (
    MappedJson,
    MappingError,
    import_csv_rows,
    is_capture_record,
    sniff_delimiter,
)
from flywheel.capture.schema import coerce_timestamp as to_datetime

IMPORTS_DIR = "imports"  # under the flywheel home: files dropped here are imported by Dagster's sensor
FORMATS = ("auto", "capture", "jsonl", "csv", "openinference", "otlp", "mlflow", "langfuse", "langsmith", "phoenix")
SPAN_FORMATS = ("openinference", "otlp", "phoenix")
_ROTATION = re.compile(r"(\.\d+|[.-]\d{8}(T?\d{4,6})?|\.gz|\.bz2)+$")

__all__ = ["FORMATS", "IMPORTS_DIR", "ImportIssue", "ImportStats", "MappingError", "detect_value_format",
           "format_summary", "totals", "import_csv", "import_file", "import_folder", "import_jsonl", "import_openinference",
           "import_paths", "pending_imports", "to_datetime"]


def base_suffix(path: Path) -> str:
    """The suffix under rotation and compression: ``app.jsonl.1.gz`` -> ``.jsonl``."""
    name = _ROTATION.sub("", path.name)
    return Path(name).suffix.lower()


def detect_value_format(obj: Any) -> str:
    """The format of one JSON value (``auto``): the first shape it matches."""
    if is_capture_record(obj):
        return "capture"
    if is_mlflow(obj):
        return "mlflow"
    if is_langfuse(obj):
        return "langfuse"
    if is_langsmith(obj):
        return "langsmith"
    if is_span_value(obj):
        return "openinference"
    return "jsonl"


class _FileImport:
    """One file: a sink and the per-format readers, fed value by value."""

    def __init__(self, path: Path, log_dir: Path, fmt: str, mapping, **sink_options):
        self.stats = ImportStats(str(path), format=fmt)
        self.sink = Sink(log_dir, self.stats, **sink_options)
        self.fmt = fmt
        self.spans = SpanImporter(self.sink, self.stats)
        self.mapped = MappedJson(self.sink, self.stats, mapping if fmt != "csv" else None)
        self.seen: set[str] = set()

    def feed(self, line: int, value: Any) -> None:
        fmt = detect_value_format(value) if self.fmt == "auto" else self.fmt
        self.seen.add(fmt)
        if fmt in SPAN_FORMATS:
            self.spans.feed(line, value)
        elif fmt == "mlflow":
            import_mlflow(value, line, self.sink, self.stats)
        elif fmt == "langfuse":
            import_langfuse(value, line, self.sink, self.stats)
        elif fmt == "langsmith":
            import_langsmith(value, line, self.sink, self.stats)
        elif fmt == "capture":
            if is_capture_record(value):
                self.sink.capture_record(line, value)
            else:
                self.stats.retrievals += 1
                self.stats.issue(line, None, "not_a_capture_record", "no schema_version/type (or v0 id/docs)")
        else:
            self.mapped.feed(line, value)

    def finish(self) -> ImportStats:
        try:
            self.spans.finish()
            self.mapped.finish()
        finally:
            self.sink.close()
        if self.fmt == "auto":
            self.stats.format = "auto:" + "+".join(sorted(self.seen)) if self.seen else "auto"
        return self.stats


def import_file(path: str | Path, log_dir: str | Path, *, format: str = "auto", mapping: Mapping[str, str] | None = None,
                redact_pii: bool = True, retriever: str | None = None, retriever_version: str | None = None,
                delimiter: str | None = None) -> ImportStats:
    """Import one file (see the module doc); returns its summary."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
    path, log_dir = Path(path), Path(log_dir)
    options = {"redact_pii": redact_pii, "retriever": retriever, "retriever_version": retriever_version}
    is_csv = format == "csv" or (format == "auto" and base_suffix(path) in (".csv", ".tsv"))
    job = _FileImport(path, log_dir, "csv" if is_csv else format, mapping, **options)
    try:
        if is_csv:
            if delimiter is None:
                head = "".join(t for _, t in zip(range(20), (x for _, x in iter_lines(path, ImportStats(str(path))))))
                delimiter = "\t" if base_suffix(path) == ".tsv" else sniff_delimiter(head)
            import_csv_rows(job.sink, job.stats, path, mapping, delimiter)
        elif base_suffix(path) == ".parquet":
            for line, value in _parquet_rows(path, job.stats):
                job.feed(line, value)
        else:
            for line, value in iter_json_values(path, job.stats):
                job.feed(line, value)
    finally:
        stats = job.finish()
    return stats


def _parquet_rows(path: Path, stats: ImportStats):
    """(row number, row as a dict) of a Parquet file, a record batch at a time."""
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1_000):
        for value in batch.to_pylist():
            row += 1
            stats.read += 1
            yield row, value


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders walked (sorted, hidden files and folders left out)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            out.append(p)
    return out


def import_paths(paths: Iterable[str | Path], log_dir: str | Path, **options: Any) -> list[ImportStats]:
    """Import every file (folders walked); a file that cannot be read is reported, the rest go on."""
    results = []
    for path in expand_paths(paths):
        try:
            results.append(import_file(path, log_dir, **options))
        except (OSError, MappingError) as exc:
            stats = ImportStats(str(path), format=options.get("format", "auto"))
            reason = "mapping_does_not_fit" if isinstance(exc, MappingError) else "file_not_read"
            stats.issue(0, None, reason, f"{type(exc).__name__}: {exc}")
            results.append(stats)
    return results


def pending_imports(imports_dir: str | Path) -> list[Path]:
    """Files waiting in the import folder (not hidden, not summaries, not in ``done/``)."""
    imports_dir = Path(imports_dir)
    if not imports_dir.is_dir():
        return []
    return sorted(p for p in imports_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".summary.json"))


def import_folder(imports_dir: str | Path, log_dir: str | Path, **options: Any) -> list[ImportStats]:
    """The Dagster way: import every file dropped in ``imports_dir`` and move it to ``done/``.

    Each imported file's summary is written next to it (``done/<name>.summary.json``); a file
    whose columns do not fit goes to ``failed/`` with its summary; a file that could not be read
    (an I/O error) stays where it is, with a ``.summary.json`` saying why, for the next run. A file
    is first moved into ``processing/``, so two runs never import the same file; a run that
    crashed leaves its file there (move it back to import it again).
    """
    imports_dir = Path(imports_dir)
    done = imports_dir / "done"
    results = []
    for waiting in pending_imports(imports_dir):
        path = _claim(waiting)
        if path is None:
            continue  # another run took it
        stats = import_paths([path], log_dir, **options)[0]
        stats.source = str(waiting)
        summary = json.dumps(stats.summary(), indent=2)
        if "file_not_read" in stats.issues_by_reason:
            path.replace(waiting)  # back in the queue for the next run
            waiting.with_name(waiting.name + ".summary.json").write_text(summary)
        else:
            dest = imports_dir / "failed" if "mapping_does_not_fit" in stats.issues_by_reason else done
            dest.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), dest / path.name)
            (dest / (path.name + ".summary.json")).write_text(summary)
        results.append(stats)
    return results


def _claim(path: Path) -> Path | None:
    """Move a waiting file into ``processing/`` (atomic): two runs never import the same file."""
    dest = path.parent / "processing" / path.name
    dest.parent.mkdir(exist_ok=True)
    try:
        path.replace(dest)
    except FileNotFoundError:
        return None
    return dest


def format_summary(stats: ImportStats) -> str:
    """A few human lines for one file."""
    lines = [f"{stats.source} [{stats.format}]: imported {stats.imported:,} of {stats.retrievals:,} retrievals"
             + (f" (+{stats.feedback:,} feedback)" if stats.feedback else "")
             + f", lost {stats.lost:,}; {stats.read:,} values read"]
    if stats.skipped_by_reason:
        lines.append("  skipped (not retrievals): " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.skipped_by_reason.items())))
    if stats.issues_by_reason:
        lines.append("  issues: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.issues_by_reason.items())))
        lines += [f"    {i}" for i in stats.issues[:10]]
        if stats.rejected > 10:
            lines.append(f"    ... {stats.rejected - 10:,} more")
    return "\n".join(lines)


def totals(results: list[ImportStats], say=None) -> dict:
    """Totals over files (and each file's summary through ``say``); the last key is per format."""
    out = {"files": len(results), "retrievals": 0, "imported": 0, "lost": 0, "feedback": 0, "files_not_read": 0}
    for stats in results:
        if say:
            say(format_summary(stats))
        out["retrievals"] += stats.retrievals
        out["imported"] += stats.imported
        out["lost"] += stats.lost
        out["feedback"] += stats.feedback
        out["files_not_read"] += bool({"file_not_read", "mapping_does_not_fit"} & set(stats.issues_by_reason))
    return out


# -- the original entry points -----------------------------------------------------------------------

def import_jsonl(path, log_dir, *, mapping=None, **options) -> ImportStats:
    """JSON Lines: capture records, or a team's own records through ``mapping``."""
    return import_file(path, log_dir, format="jsonl", mapping=mapping, **options)


def import_csv(path, log_dir, *, mapping=None, delimiter: str = ",", **options) -> ImportStats:
    """CSV, one row per retrieved chunk; raises MappingError (a ValueError) when columns are missing."""
    return import_file(path, log_dir, format="csv", mapping=mapping, delimiter=delimiter, **options)


def import_openinference(path, log_dir, **options) -> ImportStats:
    """OpenInference spans in any of the shapes ``spans`` reads."""
    return import_file(path, log_dir, format="openinference", **options)
