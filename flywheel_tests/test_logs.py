"""raw_logs: validation, quarantine, dedupe, feedback join, v0 upgrade, Dagster checks and sensor."""

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq

from flywheel.capture import SearchLogger
from flywheel.config import load_config
from flywheel.defs.logs import (
    defs,
    import_logs,
    log_imports,
    raw_logs,
    raw_logs_files_read,
    raw_logs_new_files,
    raw_logs_not_empty,
    raw_logs_quarantine_rate,
    raw_logs_schema_valid,
)
from flywheel.defs.resources import resources_for
from flywheel.layout import Layout
from flywheel.lib.logs.ingest import (
    QUARANTINE_SCHEMA,
    RAW_LOGS_SCHEMA,
    ingest_week,
    load_quarantine,
    load_raw_logs,
)

WEEK = date(2026, 10, 5)
END = WEEK + timedelta(days=7)
TS = "2026-10-06T10:00:00.000000Z"


def search(rid, ts=TS, **over):
    rec = {"schema_version": 1, "type": "search", "request_id": rid, "timestamp": ts, "query": f"query {rid}",
           "user_id": None, "session_id": None, "retriever": "r", "retriever_version": "1",
           "results": [{"chunk_id": "c2", "text": "two", "score": 0.5, "rank": 2, "metadata": None},
                       {"chunk_id": "c1", "text": "one", "score": 0.9, "rank": 1, "metadata": {"p": 1}}]}
    rec.update(over)
    return rec


def feedback(rid, ts=TS, **over):
    rec = {"schema_version": 1, "type": "feedback", "request_id": rid, "timestamp": ts, "clicks": [],
           "saves": [], "thumbs": None, "dwell_ms": None, "cited": []}
    rec.update(over)
    return rec


def write(log_dir: Path, day: str, lines, name="host-1-abcd.jsonl", raw_tail: bytes = b""):
    folder = log_dir / f"day={day}"
    folder.mkdir(parents=True, exist_ok=True)
    data = b"".join(
        (x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode()) + b"\n" for x in lines)
    (folder / name).write_bytes(data + raw_tail)
    return folder / name


def ingest(tmp_path):
    stats = ingest_week(tmp_path / "logs", WEEK, END, tmp_path / "out.parquet", tmp_path / "q.parquet")
    return stats, load_raw_logs(tmp_path / "out.parquet"), load_quarantine(tmp_path / "q.parquet")


def test_every_malformed_input_gets_a_reason_and_good_records_survive(tmp_path):
    logs = tmp_path / "logs"
    lines = [
        search("good-1"),
        b'{"schema_version":1,"type":"search","request_id":"trunc',  # truncated mid-file
        search("wrong-type", results=[{"chunk_id": "c", "text": "t", "score": "high", "rank": 1}]),
        {k: v for k, v in search("missing").items() if k != "query"},
        search("huge", results=[{"chunk_id": "c", "text": "x" * 1_000_000, "score": 1.0, "rank": 1}]),
        b'{"schema_version":1,"type":"search","request_id":"bad-bytes","query":"\xff\xfe"}',
        search("emoji-rtl", query="مرحبا بالعالم 👋🏽 שלום"),
        search("wrong-week", ts="2026-09-01T10:00:00Z"),
        search("dup"),
        search("no-tz", ts="2026-10-06T10:00:00"),
        ["not", "an", "object"],
        search("future", schema_version=7),
        search("dup-rank", results=[{"chunk_id": "a", "text": "", "score": 1, "rank": 1},
                                    {"chunk_id": "b", "text": "", "score": 1, "rank": 1}]),
        search("good-2"),
    ]
    write(logs, "2026-10-06", lines)
    write(logs, "2026-10-07", [search("dup", ts="2026-10-07T00:00:00Z"), search("good-3", ts="2026-10-07T09:00:00Z")],
          raw_tail=b'{"schema_version":1,"type":"sea')  # torn last line of a killed writer
    stats, df, q = ingest(tmp_path)
    assert sorted(df["request_id"]) == ["dup", "emoji-rtl", "good-1", "good-2", "good-3"]
    assert df.set_index("request_id").loc["emoji-rtl", "query"] == "مرحبا بالعالم 👋🏽 שלום"
    reasons = {(r.line, r.reason, r.field if isinstance(r.field, str) else None) for r in q.itertuples() if r.file.startswith("day=2026-10-06")}
    assert reasons == {
        (2, "invalid_json", None), (3, "wrong_type", "results[0].score"), (4, "missing_field", "query"),
        (5, "text_too_long", "results[0].text"), (6, "invalid_utf8", None),
        (8, "timestamp_outside_week", "timestamp"), (10, "bad_timestamp", "timestamp"),
        (11, "not_an_object", None), (12, "unsupported_schema_version", "schema_version"),
        (13, "invalid_value", "results[1].rank"),
    }
    torn = q[q.reason == "torn_line"]
    assert list(torn.file) == ["day=2026-10-07/host-1-abcd.jsonl"] and list(torn.line) == [3]
    dup = q[q.reason == "duplicate_request_id"].iloc[0]
    # the earlier copy (10-06) is kept; the later one is listed with a pointer to the kept one
    assert dup.file.startswith("day=2026-10-07") and dup.line == 1 and "day=2026-10-06" in dup.raw
    assert stats.read == 17 and stats.valid == 6 and stats.duplicates == 1 and stats.rows == 5
    assert stats.read == stats.valid + stats.quarantined_total
    assert stats.quarantined["invalid_json"] == 1 and stats.quarantined["torn_line"] == 1
    assert stats.per_day == {"2026-10-06": 4, "2026-10-07": 1}
    assert all(len(r) <= 500 for r in q["raw"])


def test_schema_is_exact_results_sorted_and_both_files_written_even_when_empty(tmp_path):
    write(tmp_path / "logs", "2026-10-06", [search("a")])
    stats, df, _ = ingest(tmp_path)
    assert pq.read_schema(tmp_path / "out.parquet").remove_metadata().equals(RAW_LOGS_SCHEMA)
    assert [r["rank"] for r in df.iloc[0]["results"]] == [1, 2]
    assert df.iloc[0]["timestamp"] == datetime(2026, 10, 6, 10, tzinfo=timezone.utc)
    empty = ingest_week(tmp_path / "nothing", WEEK, END, tmp_path / "e.parquet", tmp_path / "eq.parquet")
    assert empty.read == 0 and empty.rows == 0
    assert pq.read_table(tmp_path / "e.parquet").schema.remove_metadata().equals(RAW_LOGS_SCHEMA)
    assert pq.read_table(tmp_path / "eq.parquet").schema.remove_metadata().equals(QUARANTINE_SCHEMA)


def test_feedback_is_merged_joined_within_grace_and_orphans_counted(tmp_path):
    logs = tmp_path / "logs"
    write(logs, "2026-10-05", [feedback("last-week", ts="2026-10-05T00:10:00Z", clicks=["x"])])
    write(logs, "2026-10-11", [
        search("sun", ts="2026-10-11T23:50:00Z"),
        feedback("sun", ts="2026-10-11T23:51:00Z", clicks=["c1"], thumbs="down", dwell_ms=100),
        search("no-feedback", ts="2026-10-11T10:00:00Z"),
    ])
    write(logs, "2026-10-12", [  # grace day: belongs to the next week, except this feedback
        feedback("sun", ts="2026-10-12T00:05:00Z", clicks=["c2", "c1"], saves=["c2"], thumbs="up", dwell_ms=50),
        search("next-week", ts="2026-10-12T01:00:00Z"),
        b"garbage that next week's ingest will report",
    ])
    write(logs, "2026-10-13", [feedback("sun", ts="2026-10-13T08:00:00Z", thumbs="down")])  # too late
    stats, df, q = ingest(tmp_path)
    rows = df.set_index("request_id")
    assert sorted(rows.index) == ["no-feedback", "sun"]
    sun = rows.loc["sun"]
    assert list(sun.clicks) == ["c1", "c2"] and list(sun.saves) == ["c2"]
    assert sun.thumbs == "up" and sun.dwell_ms == 150.0  # latest thumbs, summed dwell
    assert pd.isna(rows.loc["no-feedback"].thumbs) and list(rows.loc["no-feedback"].clicks) == []
    assert stats.feedback_joined == 1 and stats.feedback_orphaned == 1 and stats.feedback_from_grace == 1
    assert len(q) == 0  # the grace day's garbage is next week's business


def test_v0_records_are_upgraded(tmp_path):
    ts = datetime(2026, 10, 8, 9, tzinfo=timezone.utc).timestamp()
    write(tmp_path / "logs", "2026-10-08", [
        {"id": "old-1", "ts": ts, "query": "legacy", "user": "u", "session": "s", "model": "bm25",
         "docs": [{"id": "d1", "content": "first", "score": 2.0}, {"id": "d2", "content": "second", "score": 1}]},
        {"event": "feedback", "id": "old-1", "ts": ts + 5, "clicked": ["d2"], "rating": -1},
        {"id": "old-2", "query": "no timestamp", "docs": []},
    ])
    stats, df, q = ingest(tmp_path)
    row = df.iloc[0]
    assert row.request_id == "old-1" and row.schema_version == 0 and row.retriever == "bm25"
    assert [(r["chunk_id"], r["rank"], r["score"]) for r in row.results] == [("d1", 1, 2.0), ("d2", 2, 1.0)]
    assert list(row.clicks) == ["d2"] and row.thumbs == "down"
    assert list(zip(q.reason, q.field)) == [("missing_field", "ts")]


def test_reingest_is_idempotent_and_a_huge_line_is_skipped_without_loading(tmp_path, monkeypatch):
    import flywheel.lib.logs.files as files_mod

    monkeypatch.setattr(files_mod, "MAX_LINE_BYTES", 4096)
    write(tmp_path / "logs", "2026-10-06", [search("a"), search("big", query="q" * 9000), search("b")])
    s1, df1, q1 = ingest(tmp_path)
    s2, df2, q2 = ingest(tmp_path)
    assert df1.equals(df2) and q1.equals(q2) and s1 == s2
    assert list(df1.request_id) == ["a", "b"] and list(q1.reason) == ["line_too_long"] and list(q1.line) == [2]


# -- Dagster ----------------------------------------------------------------------------------

CHECKS = [raw_logs_schema_valid, raw_logs_quarantine_rate, raw_logs_not_empty, raw_logs_files_read]


class _Paths:
    """What the tests read back: the layout of the materialized week's files."""

    def __init__(self, resources):
        self.resources = resources
        self.layout = Layout.of(resources["paths"].settings())
        self.assets_dir = self.layout.assets_dir


def resources(tmp_path, **tiers):
    return resources_for(load_config(environ={}), paths={"home": str(tmp_path / "home"), "log_dir": str(tmp_path / "logs")},
                         tiers=tiers or None)


def asset_path(assets_dir, name, week):
    return assets_dir / name / f"{week.isoformat() if hasattr(week, 'isoformat') else week}.parquet"


def _materialize(tmp_path, instance=None, **tiers):
    res = resources(tmp_path, **tiers)
    instance = instance or dg.DagsterInstance.ephemeral()
    result = dg.materialize([raw_logs, *CHECKS], partition_key=WEEK.isoformat(), instance=instance,
                            resources={"paths": res["paths"], "tiers": res["tiers"]}, raise_on_error=False)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return result, checks, instance, _Paths(res)


def test_asset_writes_files_metadata_and_checks_pass(tmp_path):
    with SearchLogger(tmp_path / "logs") as logger:
        for i in range(30):
            rid = logger.log_search(f"q{i}", [{"chunk_id": "c", "text": "t", "score": 1.0, "rank": 1}],
                                    timestamp=datetime(2026, 10, 6 + i % 3, tzinfo=timezone.utc))
            logger.log_feedback(rid, clicks=["c"], timestamp=datetime(2026, 10, 9, tzinfo=timezone.utc))
    result, checks, _, paths = _materialize(tmp_path)
    assert result.success
    assert {k: c.passed for k, c in checks.items()} == {
        "raw_logs_schema_valid": True, "raw_logs_quarantine_rate": True, "raw_logs_not_empty": True,
        "raw_logs_files_read": True}
    mat = result.asset_materializations_for_node("raw_logs")[0]
    md = mat.metadata
    assert md["read"].value == 60 and md["dagster/row_count"].value == 30 and md["feedback_joined"].value == 30
    assert "| 2026-10-06 | 10 |" in md["queries_per_day"].value
    assert "q0" in md["sample"].value
    assert asset_path(paths.assets_dir, "raw_logs", WEEK).exists()
    assert asset_path(paths.assets_dir, "raw_logs_quarantine", WEEK).exists()


def test_quarantine_rate_check_fails_above_the_threshold(tmp_path):
    write(tmp_path / "logs", "2026-10-06", [search("a"), search("b"), b"{broken", search("c", query=5)])
    result, checks, _, _ = _materialize(tmp_path, max_quarantine_rate=0.25)
    assert not checks["raw_logs_quarantine_rate"].passed
    assert checks["raw_logs_quarantine_rate"].metadata["quarantine_rate"].value == 0.5
    assert checks["raw_logs_schema_valid"].passed and checks["raw_logs_not_empty"].passed
    _, checks, _, _ = _materialize(tmp_path, max_quarantine_rate=0.6)
    assert checks["raw_logs_quarantine_rate"].passed


def test_empty_week_check_fails(tmp_path):
    write(tmp_path / "logs", "2026-10-20", [search("other-week", ts="2026-10-20T00:00:00Z")])
    result, checks, _, _ = _materialize(tmp_path)
    assert not checks["raw_logs_not_empty"].passed and checks["raw_logs_not_empty"].metadata["rows"].value == 0


def test_schema_check_fails_on_a_file_with_the_wrong_schema(tmp_path, monkeypatch):
    import pyarrow as pa

    import flywheel.defs.logs as defs_logs

    write(tmp_path / "logs", "2026-10-06", [search("a")])

    real = defs_logs.ingest_week

    def broken_ingest(log_dir, start, end, out, quarantine):
        stats = real(log_dir, start, end, out, quarantine)
        pq.write_table(pa.table({"request_id": ["a"], "query": [1]}), out)  # a writer gone wrong
        return stats

    monkeypatch.setattr(defs_logs, "ingest_week", broken_ingest)
    result, checks, _, _ = _materialize(tmp_path)
    assert not checks["raw_logs_schema_valid"].passed
    assert "schema differs" in checks["raw_logs_schema_valid"].metadata["problems"].value


def test_definitions_load_with_the_paths_resource(tmp_path):
    merged = dg.Definitions.merge(defs, dg.Definitions(resources=resources(tmp_path)))
    dg.Definitions.validate_loadable(merged)
    assert merged.resolve_asset_graph().get_all_asset_keys() == {raw_logs.key}
    assert merged.resolve_sensor_def("raw_logs_new_files") is not None
    assert merged.resolve_sensor_def("log_imports") is not None


def test_sensor_requests_a_rerun_only_when_files_changed_after_materialization(tmp_path):
    write(tmp_path / "logs", "2026-10-06", [search("a")])
    _, _, instance, paths = _materialize(tmp_path)
    res = {"paths": paths.resources["paths"]}
    first = raw_logs_new_files(dg.build_sensor_context(instance=instance, resources=res))
    assert first.run_requests == []  # the materialization already read these files
    write(tmp_path / "logs", "2026-10-08", [search("late", ts="2026-10-08T00:00:00Z")], name="late-host.jsonl")
    second = raw_logs_new_files(dg.build_sensor_context(instance=instance, resources=res, cursor=first.cursor))
    assert [(r.partition_key, r.asset_selection) for r in second.run_requests] == [(WEEK.isoformat(), [raw_logs.key])]
    third = raw_logs_new_files(dg.build_sensor_context(instance=instance, resources=res, cursor=second.cursor))
    assert third.run_requests == []  # same files: not requested twice
    # after the re-run, even a fresh cursor finds nothing new; the week now holds both requests
    _materialize(tmp_path, instance=instance)
    again = raw_logs_new_files(dg.build_sensor_context(instance=instance, resources=res))
    assert again.run_requests == []
    assert sorted(load_raw_logs(asset_path(paths.assets_dir, "raw_logs", WEEK))["request_id"]) == ["a", "late"]
    # files of a week that was never materialized are left to the schedule
    write(tmp_path / "logs", "2026-10-21", [search("x", ts="2026-10-21T00:00:00Z")])
    later = raw_logs_new_files(dg.build_sensor_context(instance=instance, resources=res, cursor=again.cursor))
    assert later.run_requests == []


# -- which files are read, and every one that is not -------------------------------------------------

def test_other_log_names_gzip_rotation_bom_unpadded_and_nested_folders_are_read(tmp_path):
    import gzip

    logs = tmp_path / "logs"
    write(logs, "2026-10-06", [search("plain")])
    write(logs, "2026-10-06", [search("json")], name="a.json")
    write(logs, "2026-10-06", [search("nd")], name="b.ndjson")
    write(logs, "2026-10-06", [search("rotated")], name="app.jsonl.1")
    (logs / "day=2026-10-06" / "c.jsonl.2.gz").write_bytes(gzip.compress(json.dumps(search("gz")).encode() + b"\n"))
    (logs / "day=2026-10-06" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(search("bom")).encode() + b"\n")
    write(logs, "2026-10-7", [search("unpadded", ts="2026-10-07T10:00:00Z")])
    nested = logs / "day=2026-10-08" / "host-b"  # a nested folder
    nested.mkdir(parents=True)
    (nested / "x.jsonl").write_text(json.dumps(search("nested", ts="2026-10-08T10:00:00Z")) + "\n")
    stats, df, q = ingest(tmp_path)
    assert sorted(df.request_id) == ["bom", "gz", "json", "nd", "nested", "plain", "rotated", "unpadded"]
    assert stats.quarantined_total == 0 and len(q) == 0


def test_every_file_not_read_is_reported_with_its_reason_and_outside_symlinks_are_not_followed(tmp_path):
    logs = tmp_path / "logs"
    write(logs, "2026-10-06", [search("a")])
    day = logs / "day=2026-10-06"
    (day / "notes.txt").write_text("hello")
    (day / ".hidden.jsonl").write_text(json.dumps(search("hidden")) + "\n")
    (day / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps(search("outside")) + "\n")
    (day / "outside.jsonl").symlink_to(outside / "secret.jsonl")
    (logs / "day=2026-10-09").symlink_to(outside, target_is_directory=True)
    (day / "inside.jsonl").symlink_to(day / "host-1-abcd.jsonl")  # inside the folder: read (a duplicate)
    (logs / "day=2026-13-45").mkdir()
    (logs / "README").write_text("x")
    (logs / "dead-letter").mkdir()
    stats, df, _ = ingest(tmp_path)
    assert sorted(df.request_id) == ["a"] and stats.duplicates == 1
    assert stats.files_not_read == {
        "README": "not_a_day_folder", "day=2026-10-06/.hidden.jsonl": "hidden_file",
        "day=2026-10-06/gone.jsonl": "dangling_symlink", "day=2026-10-06/notes.txt": "unknown_extension",
        "day=2026-10-06/outside.jsonl": "symlink_outside_log_dir", "day=2026-10-09": "symlink_outside_log_dir",
        "day=2026-13-45": "bad_day_folder"}
    assert stats.files_not_read_count == 7 and stats.files_not_read_by_reason["symlink_outside_log_dir"] == 2


def test_unread_files_check_fails_above_the_threshold(tmp_path):
    write(tmp_path / "logs", "2026-10-06", [search("a")])
    (tmp_path / "logs" / "day=2026-10-06" / "export.csv").write_text("a,b\n")
    result, checks, _, _ = _materialize(tmp_path)
    assert not checks["raw_logs_files_read"].passed
    assert checks["raw_logs_files_read"].metadata["first_files_not_read"].value == {
        "day=2026-10-06/export.csv": "unknown_extension"}
    md = result.asset_materializations_for_node("raw_logs")[0].metadata
    assert md["files_not_read"].value == 1 and "unknown_extension" in md["files_not_read_by_reason"].value
    _, checks, _, _ = _materialize(tmp_path, max_unread_log_files=1)
    assert checks["raw_logs_files_read"].passed


def test_the_import_sensor_starts_the_import_job_which_imports_dropped_files(tmp_path):
    import shutil

    exports = Path(__file__).parent / "fixtures" / "exports"
    res = resources(tmp_path)
    inbox = tmp_path / "home" / "imports"
    assert isinstance(log_imports(dg.build_sensor_context(resources={"paths": res["paths"]})), dg.SkipReason)
    inbox.mkdir(parents=True)
    shutil.copy(exports / "langfuse_observations.json", inbox)
    request = log_imports(dg.build_sensor_context(resources={"paths": res["paths"]}))
    assert isinstance(request, dg.RunRequest) and request.run_key.startswith("import:")
    result = import_logs.execute_in_process(resources={"paths": res["paths"]})
    assert result.success and result.output_for_node("import_dropped_files")["imported"] == 2
    assert (inbox / "done" / "langfuse_observations.json").exists()
    assert isinstance(log_imports(dg.build_sensor_context(resources={"paths": res["paths"]})), dg.SkipReason)
    stats, df, _ = ingest(tmp_path)
    assert len(df) == 2 and stats.quarantined_total == 0


def _run_with_console_logger(tmp_path):
    """raw_logs run as the CLI runs a week: its run config selects flywheel's console logger."""
    from flywheel.defs.loggers import LOGGERS

    res = resources(tmp_path)
    job = dg.define_asset_job("ingest_only", selection=[raw_logs])
    run_defs = dg.Definitions(assets=[raw_logs], jobs=[job], loggers=LOGGERS,
                              resources={"paths": res["paths"], "tiers": res["tiers"]})
    return run_defs.resolve_job_def("ingest_only").execute_in_process(
        partition_key=WEEK.isoformat(), instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}})


def test_the_console_shows_each_stage_line_in_the_cli_format_and_a_failure_with_its_error(tmp_path, capfd, monkeypatch):
    import re

    import flywheel.defs.logs as defs_logs

    write(tmp_path / "logs", "2026-10-06", [search("a"), search("late", ts="2026-10-20T00:00:00Z")])
    assert _run_with_console_logger(tmp_path).success
    err = capfd.readouterr().err
    # the stage's own line, prefixed only by the time and the step; none of Dagster's run-id prefix
    assert re.search(r"^\[flywheel \d\d:\d\d:\d\d\] raw_logs: week 2026-10-05: read 2 records .*, 1 quarantined "
                     r"\(timestamp_outside_week: 1\)$", err, re.M), err
    assert " - dagster - " not in err and "INFO" not in err

    def broken(*args, **kwargs):
        raise ValueError("row 3 of host-1.jsonl: field 'query' is not a string")

    monkeypatch.setattr(defs_logs, "ingest_week", broken)
    assert not _run_with_console_logger(tmp_path).success
    err = capfd.readouterr().err
    # a failure names its level and carries the error itself, not just "step failed"
    assert re.search(r"^\[flywheel \d\d:\d\d:\d\d\] raw_logs: ERROR: Execution of step \"raw_logs\" failed", err, re.M), err
    assert "ValueError: row 3 of host-1.jsonl: field 'query' is not a string" in err
