"""raw_logs: read a week of capture files, validate, quarantine, deduplicate, join feedback.

Streaming, so memory stays bounded whatever the week's size: files are read line by line (a line
longer than ``MAX_LINE_BYTES`` is skipped without being held in memory), valid search records go
to a staging Parquet file in batches, and the output is written batch by batch with
``pyarrow.parquet.ParquetWriter``. What is held in memory is per-request bookkeeping (ids,
timestamps, merged feedback), not the records.

Rules (also what the tests pin down):

* Week files are the log files under ``<log_dir>/day=D/`` for the 7 days D of
  ``[week_start, week_end)`` (which names, folders and symlinks are read, and how every file that
  is not read is reported with its reason in ``files_not_read``: see ``files``).
  Every non-blank line read is counted in ``read`` and ends up either ``valid`` or quarantined
  (``read == valid + sum(quarantined)``), with file (relative to ``log_dir``), 1-based line,
  reason, field and the start of the raw line.
* A record whose timestamp is outside the week is quarantined (``timestamp_outside_week``).
* A last line without a newline that does not parse is a writer killed mid-write: ``torn_line``.
* Duplicated request ids: the copy with the earliest timestamp is kept (ties: the first in
  file order); the others are counted in ``duplicates`` and listed in the quarantine file with
  reason ``duplicate_request_id`` and the kept copy's location, but they are not invalid and do
  not count towards the quarantine rate.
* Feedback is joined to its request when it is in the week's files or in the 1-day grace after
  the week (``day=week_end``): an answer read on Monday morning to a Sunday-night search still
  counts. Several feedback records per request merge: clicks, saves and cited are unions in order
  of first appearance, thumbs is the latest non-null one (by timestamp), ``dwell_ms`` is the sum
  (each record reports one view). Feedback in the week's files whose request is not in the week
  is counted as ``feedback_orphaned`` (usually a request from the previous week, joined there).
* The ``schema_version`` column keeps the version the record was written in (0 or 1); every row
  has the v1 shape after upgrade.
* The output depends only on the files' contents, so re-materializing a week is idempotent.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flywheel.capture.schema import RecordError, validate
from flywheel.lib.logs import files as _files
from flywheel.lib.logs.sinks import BATCH_ROWS, _BatchSink, _tmp_next_to
from flywheel.lib.logs.files import GRACE_DAYS, fingerprint, log_fingerprint, scan_week, week_files  # noqa: F401

MAX_FILES_LISTED = 1_000
RAW_PREVIEW_CHARS = 500
DUPLICATE_REASON = "duplicate_request_id"

RESULT_TYPE = pa.struct([
    ("chunk_id", pa.string()), ("text", pa.string()), ("score", pa.float64()), ("rank", pa.int32()),
])
_BASE_FIELDS = [
    ("request_id", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("day", pa.string()),
    ("query", pa.string()),
    ("user_id", pa.string()),
    ("session_id", pa.string()),
    ("retriever", pa.string()),
    ("retriever_version", pa.string()),
    ("results", pa.list_(RESULT_TYPE)),
]
RAW_LOGS_SCHEMA = pa.schema(_BASE_FIELDS + [
    ("clicks", pa.list_(pa.string())),
    ("saves", pa.list_(pa.string())),
    ("cited", pa.list_(pa.string())),
    ("thumbs", pa.string()),
    ("dwell_ms", pa.float64()),
    ("schema_version", pa.int32()),
])
_STAGING_SCHEMA = pa.schema(_BASE_FIELDS + [
    ("schema_version", pa.int32()), ("_seq", pa.int64()), ("_file", pa.int32()), ("_line", pa.int64()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("field", pa.string()),
    ("raw", pa.string()),
])


@dataclass
class IngestStats:
    week_start: str
    week_end: str
    files: int = 0
    bytes: int = 0
    read: int = 0
    valid: int = 0
    searches: int = 0
    feedback: int = 0
    rows: int = 0
    duplicates: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    per_day: dict[str, int] = field(default_factory=dict)
    feedback_joined: int = 0
    feedback_orphaned: int = 0
    feedback_from_grace: int = 0
    fingerprint: str = ""
    files_not_read: dict[str, str] = field(default_factory=dict)  # path -> reason (first 1,000)
    files_not_read_count: int = 0
    files_not_read_by_reason: dict[str, int] = field(default_factory=dict)
    dead_letter_files: int = 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined_total / self.read if self.read else 0.0

    def to_metadata(self) -> dict:
        """Plain JSON-able values (Dagster turns them into metadata entries)."""
        out = asdict(self)
        out["quarantined_total"] = self.quarantined_total
        out["quarantine_rate"] = round(self.quarantine_rate, 6)
        return out


# -- files ----------------------------------------------------------------------------------------

def _read_lines(path: Path, sizes: dict):
    """(line number, bytes, state) of a log file (see ``files.read_lines``)."""
    return _files.read_lines(path, sizes)


def _preview(raw: bytes) -> str:
    return raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", "replace")[:RAW_PREVIEW_CHARS].rstrip("\n")


def _parse(raw: bytes, state: str) -> object:
    """JSON value of a line or RecordError."""
    if state == "too_long":
        raise RecordError("line_too_long", None, f"line longer than {_files.MAX_LINE_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("invalid_utf8", None, f"byte {exc.start}: {exc.reason}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        if state == "no_newline":
            raise RecordError("torn_line", None, "last line of the file is incomplete "
                              "(writer stopped mid-record)") from None
        raise RecordError("invalid_json", None, str(exc)[:200]) from None


# -- feedback -------------------------------------------------------------------------------------

class _Feedback:
    __slots__ = ("clicks", "saves", "cited", "thumbs", "thumbs_ts", "dwell", "in_week")

    def __init__(self):
        self.clicks: dict[str, None] = {}
        self.saves: dict[str, None] = {}
        self.cited: dict[str, None] = {}
        self.thumbs: str | None = None
        self.thumbs_ts: datetime | None = None
        self.dwell: float | None = None
        self.in_week = 0

    def merge(self, rec: dict, ts: datetime) -> None:
        self.clicks.update(dict.fromkeys(rec["clicks"]))
        self.saves.update(dict.fromkeys(rec["saves"]))
        self.cited.update(dict.fromkeys(rec["cited"]))
        if rec["thumbs"] is not None and (self.thumbs_ts is None or ts >= self.thumbs_ts):
            self.thumbs, self.thumbs_ts = rec["thumbs"], ts
        if rec["dwell_ms"] is not None:
            self.dwell = (self.dwell or 0.0) + rec["dwell_ms"]


def _utc(d: date) -> datetime:
    return datetime.combine(d, time(0), tzinfo=timezone.utc)


# -- the ingest -----------------------------------------------------------------------------------

def ingest_week(log_dir: Path, week_start: date, week_end: date, out_path: Path, quarantine_path: Path
                ) -> IngestStats:
    """Read ``[week_start, week_end)`` of capture logs into a raw_logs Parquet file (+ quarantine)."""
    log_dir, out_path, quarantine_path = Path(log_dir), Path(out_path), Path(quarantine_path)
    stats = IngestStats(week_start.isoformat(), week_end.isoformat())
    grace_hi = _utc(week_end + timedelta(days=GRACE_DAYS))
    scan = scan_week(log_dir, week_start, week_end)
    files, grace = scan.week, scan.grace
    _report_unread(scan, log_dir, stats)
    names = [f.relative_to(log_dir).as_posix() for f in files]
    sizes: dict[Path, int] = {}
    feedback: dict[str, _Feedback] = {}

    q_tmp = _tmp_next_to(quarantine_path)
    out_tmp = _tmp_next_to(out_path)
    quarantine = _BatchSink(q_tmp, QUARANTINE_SCHEMA)
    try:
        with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".raw_logs-staging-") as tmpdir:
            staging_path = Path(tmpdir) / "staging.parquet"
            staging = _BatchSink(staging_path, _STAGING_SCHEMA)
            _stage_week(files, names, sizes, (week_start, week_end), staging, quarantine, feedback, stats)
            staging.close()
            _read_grace_feedback(grace, feedback, week_end, grace_hi, sizes, stats)
            stats.files = len(files) + len(grace)
            stats.bytes = sum(sizes.values())
            stats.fingerprint = fingerprint(
                [(p.relative_to(log_dir).as_posix(), n) for p, n in sizes.items()])
            _dedupe_and_join(staging_path, stats.searches, names, feedback, out_tmp, quarantine, stats)
        quarantine.close()
        os.replace(q_tmp, quarantine_path)
        os.replace(out_tmp, out_path)
    except BaseException:
        q_tmp.unlink(missing_ok=True)
        out_tmp.unlink(missing_ok=True)
        raise
    stats.per_day = dict(sorted(stats.per_day.items()))
    stats.quarantined = dict(sorted(stats.quarantined.items()))
    return stats


def _stage_week(files: list[Path], names: list[str], sizes: dict, week: tuple[date, date], staging: _BatchSink,
                quarantine: _BatchSink, feedback: dict, stats: IngestStats) -> None:
    """Every line of the week's files: searches to staging (in read order), feedback merged per
    request, anything invalid or outside ``week`` to quarantine with its reason."""
    week_start, week_end = week
    lo, hi = _utc(week_start), _utc(week_end)
    for file_no, (path, name) in enumerate(zip(files, names)):
        for lineno, raw, state in _read_lines(path, sizes):
            if not raw.strip():
                continue
            stats.read += 1
            try:
                obj = _parse(raw, state)
                version = obj.get("schema_version", 0) if isinstance(obj, dict) else None
                rec, ts = validate(obj)
                if not lo <= ts < hi:
                    raise RecordError("timestamp_outside_week", "timestamp",
                                      f"{ts.isoformat()} not in [{week_start}, {week_end})")
            except RecordError as err:
                stats.quarantined[err.reason] = stats.quarantined.get(err.reason, 0) + 1
                quarantine.add((name, lineno, err.reason, err.field, _preview(raw)))
                continue
            stats.valid += 1
            if rec["type"] == "feedback":
                stats.feedback += 1
                fb = feedback.get(rec["request_id"])
                if fb is None:
                    fb = feedback[rec["request_id"]] = _Feedback()
                fb.merge(rec, ts)
                fb.in_week += 1
                continue
            stats.searches += 1
            staging.add((
                rec["request_id"], ts, ts.date().isoformat(), rec["query"], rec["user_id"],
                rec["session_id"], rec["retriever"], rec["retriever_version"],
                rec["results"],  # the "metadata" key is ignored by pyarrow
                version, stats.searches - 1, file_no, lineno,
            ))


def _report_unread(scan, log_dir: Path, stats: IngestStats) -> None:
    stats.files_not_read_count = len(scan.not_read)
    stats.files_not_read = dict(list(sorted(scan.not_read.items()))[:MAX_FILES_LISTED])
    for reason in scan.not_read.values():
        stats.files_not_read_by_reason[reason] = stats.files_not_read_by_reason.get(reason, 0) + 1
    dead = log_dir / "dead-letter"
    stats.dead_letter_files = sum(1 for p in dead.iterdir() if p.is_file()) if dead.is_dir() else 0


def _read_grace_feedback(grace: list[Path], feedback: dict, week_end: date, grace_hi: datetime,
                         sizes: dict, stats: IngestStats) -> None:
    """Feedback records from the grace day; everything else there belongs to the next week."""
    lo = _utc(week_end)
    for path in grace:
        for _lineno, raw, state in _read_lines(path, sizes):
            if b"feedback" not in raw:  # cheap filter: a feedback record names its type
                continue
            try:
                rec, ts = validate(_parse(raw, state))
            except RecordError:
                continue  # reported by the next week's ingest
            if rec["type"] != "feedback" or not lo <= ts < grace_hi:
                continue
            fb = feedback.get(rec["request_id"])
            if fb is None:
                fb = feedback[rec["request_id"]] = _Feedback()
            fb.merge(rec, ts)
            stats.feedback_from_grace += 1


def _dedupe_and_join(staging_path: Path, n: int, names: list[str], feedback: dict, out_path: Path,
                     quarantine: _BatchSink, stats: IngestStats) -> None:
    writer = pq.ParquetWriter(out_path, RAW_LOGS_SCHEMA)
    try:
        if n == 0:
            writer.write_table(RAW_LOGS_SCHEMA.empty_table())
            stats.feedback_orphaned = sum(fb.in_week for fb in feedback.values())
            return
        winner, file_by_seq, line_by_seq, unique_ids = _first_copies(staging_path, n)
        for batch in pq.ParquetFile(staging_path).iter_batches(batch_size=BATCH_ROWS):
            b_seq = batch.column("_seq").to_numpy()
            keep = winner[b_seq] == b_seq
            for s in b_seq[~keep]:
                w = winner[s]
                stats.duplicates += 1
                quarantine.add((names[file_by_seq[s]], int(line_by_seq[s]), DUPLICATE_REASON, "request_id",
                                f"kept the copy at {names[file_by_seq[w]]}:{int(line_by_seq[w])}"))
            if not keep.all():
                batch = batch.filter(pa.array(keep))
            if batch.num_rows == 0:
                continue
            fb_columns = _feedback_columns(batch.column("request_id").to_pylist(), feedback, stats)
            for day, count in zip(*np.unique(batch.column("day").to_numpy(zero_copy_only=False),
                                             return_counts=True)):
                stats.per_day[str(day)] = stats.per_day.get(str(day), 0) + int(count)
            cols = {name: batch.column(name) for name in batch.schema.names}
            cols.update(fb_columns)
            table = pa.Table.from_arrays([cols[f.name] for f in RAW_LOGS_SCHEMA], schema=RAW_LOGS_SCHEMA)
            writer.write_table(table)
            stats.rows += table.num_rows
        week_fb = [rid for rid, fb in feedback.items() if fb.in_week]
        if week_fb:
            joined = pc.is_in(pa.array(week_fb, pa.string()), value_set=unique_ids).to_numpy(zero_copy_only=False)
            stats.feedback_orphaned = sum(feedback[rid].in_week for rid, j in zip(week_fb, joined) if not j)
    finally:
        writer.close()


def _first_copies(staging_path: Path, n: int):
    """Which staged search of each request_id is kept (the earliest, then first read): (winner seq
    by seq, file number by seq, line by seq, the unique request ids)."""
    keys = pq.read_table(staging_path, columns=["request_id", "timestamp", "_seq", "_file", "_line"])
    order = pc.sort_indices(keys, sort_keys=[("request_id", "ascending"), ("timestamp", "ascending"),
                                             ("_seq", "ascending")])
    rid_sorted = pc.take(keys["request_id"], order).combine_chunks()
    seq = keys["_seq"].to_numpy()
    seq_sorted = seq[order.to_numpy()]
    first = np.ones(n, dtype=bool)
    if n > 1:
        first[1:] = pc.not_equal(rid_sorted.slice(1), rid_sorted.slice(0, n - 1)).to_numpy(
            zero_copy_only=False)
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    winner = np.empty(n, dtype=np.int64)  # by seq: the seq of the copy that is kept
    winner[seq_sorted] = seq_sorted[group_start]
    file_by_seq = np.empty(n, dtype=np.int64)
    line_by_seq = np.empty(n, dtype=np.int64)
    file_by_seq[seq] = keys["_file"].to_numpy()
    line_by_seq[seq] = keys["_line"].to_numpy()
    return winner, file_by_seq, line_by_seq, rid_sorted.filter(pa.array(first))


def _feedback_columns(rids: list[str], feedback: dict, stats: IngestStats) -> dict[str, pa.Array]:
    """The feedback columns of a batch of searches (empty where a search got none)."""
    clicks, saves, cited, thumbs, dwell = [], [], [], [], []
    for rid in rids:
        fb = feedback.get(rid)
        if fb is None:
            clicks.append([]), saves.append([]), cited.append([]), thumbs.append(None), dwell.append(None)
            continue
        stats.feedback_joined += 1
        clicks.append(list(fb.clicks)), saves.append(list(fb.saves)), cited.append(list(fb.cited))
        thumbs.append(fb.thumbs), dwell.append(fb.dwell)
    return {
        "clicks": pa.array(clicks, pa.list_(pa.string())),
        "saves": pa.array(saves, pa.list_(pa.string())),
        "cited": pa.array(cited, pa.list_(pa.string())),
        "thumbs": pa.array(thumbs, pa.string()),
        "dwell_ms": pa.array(dwell, pa.float64()),
    }


def load_raw_logs(path: Path) -> pd.DataFrame:
    """The raw_logs table of a week as a DataFrame (results as lists of dicts)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize raw_logs for this week first")
    return pq.read_table(path).to_pandas()


def load_quarantine(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: materialize raw_logs for this week first")
    return pq.read_table(path).to_pandas()
