"""Capture library: records, redaction, failure handling, and the 8-writer SIGKILL run."""

import errno
import json
import logging
import os
from datetime import date, datetime, timedelta, timezone

import pytest

import flywheel.capture.writer as writer_mod
from flywheel.capture import SearchLogger, redact, validate
from flywheel.testing.capture_stress import FEEDBACK_EVERY, query_for, request_id_for, run_writers
from flywheel.lib.logs.ingest import ingest_week, load_quarantine, load_raw_logs

TS = datetime(2026, 10, 6, 12, 30, tzinfo=timezone.utc)
RESULTS = [{"chunk_id": "c1", "text": "alpha", "score": 0.9, "rank": 1, "metadata": {"src": "a.pdf"}},
           {"chunk_id": "c2", "text": "beta", "score": 0.5, "rank": 2}]


def _lines(log_dir, folders="*"):
    out = []
    for f in sorted(log_dir.glob(f"{folders}/*.jsonl")):
        out += [json.loads(line) for line in f.read_text("utf-8").splitlines()]
    return out


def test_log_search_and_feedback_write_v1_records_in_day_files(tmp_path):
    with SearchLogger(tmp_path, retriever="bm25", retriever_version="3") as logger:
        rid = logger.log_search("what is alpha?", RESULTS, user_id="u1", session_id="s1", timestamp=TS)
        assert logger.log_feedback(rid, clicks=["c1"], thumbs="up", dwell_ms=1200, cited=["c2"],
                                   timestamp=TS + timedelta(minutes=1))
        assert logger.stats["written"] == 2 and logger.stats["failed"] == 0
    files = list(tmp_path.glob("day=2026-10-06/*.jsonl"))
    assert len(files) == 1 and files[0].name.count("-") >= 2 and str(os.getpid()) in files[0].name
    search, fb = _lines(tmp_path)
    assert search == {
        "schema_version": 1, "type": "search", "request_id": rid, "timestamp": "2026-10-06T12:30:00.000000Z",
        "query": "what is alpha?", "user_id": "u1", "session_id": "s1", "retriever": "bm25",
        "retriever_version": "3",
        "results": [{"chunk_id": "c1", "text": "alpha", "score": 0.9, "rank": 1, "metadata": {"src": "a.pdf"}},
                    {"chunk_id": "c2", "text": "beta", "score": 0.5, "rank": 2, "metadata": None}],
    }
    assert fb["type"] == "feedback" and fb["clicks"] == ["c1"] and fb["thumbs"] == "up" and fb["cited"] == ["c2"]
    validate(search), validate(fb)


def test_day_directory_follows_the_utc_date_of_the_timestamp(tmp_path):
    late_local = datetime(2026, 10, 6, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # 04:30 UTC next day
    with SearchLogger(tmp_path) as logger:
        logger.log_search("q", RESULTS, timestamp=late_local)
    assert [p.parent.name for p in tmp_path.rglob("*.jsonl")] == ["day=2026-10-07"]


def test_pii_is_redacted_by_default_and_kept_when_disabled(tmp_path):
    q = "email jane.doe@example.com or call +1 (555) 123-4567, card 4111 1111 1111 1111"
    res = [{"chunk_id": "c", "text": "patient id 123456789012, see 2019-2020", "score": 1.0, "rank": 1}]
    with SearchLogger(tmp_path / "a") as logger:
        logger.log_search(q, res, timestamp=TS)
        assert logger.stats["redacted"] == 2
    rec = _lines(tmp_path / "a")[0]
    assert rec["query"] == "email [EMAIL] or call [PHONE], card [NUMBER]"
    assert rec["results"][0]["text"] == "patient id [NUMBER], see 2019-2020"
    with SearchLogger(tmp_path / "b", redact_pii=False) as logger:
        logger.log_search(q, res, timestamp=TS)
    assert _lines(tmp_path / "b")[0]["query"] == q


@pytest.mark.parametrize("text, expected", [
    ("dates 2020-01-15 and ranges 2019-2020 stay", "dates 2020-01-15 and ranges 2019-2020 stay"),
    ("p = 0.0000012, n = 1234567", "p = 0.0000012, n = 1234567"),
    ("ssn 123-45-6789", "ssn [PHONE]"),
    ("reach me: a.b@c.io", "reach me: [EMAIL]"),
])
def test_redaction_rules(text, expected):
    assert redact(text) == expected


def test_a_full_disk_is_counted_logged_and_paused_never_raised_nor_a_file_storm(tmp_path, monkeypatch, caplog):
    clock = [1000.0]
    attempts = []

    def full(fd, data):
        attempts.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(writer_mod, "_sleep", lambda s: None)
    logger = SearchLogger(tmp_path, pause_s=1.0, max_pause_s=8.0)
    monkeypatch.setattr(writer_mod, "_write", full)
    with caplog.at_level(logging.ERROR, logger="flywheel.capture"):
        rid = logger.log_search("q", RESULTS, request_id="r1", timestamp=TS)
        ok = logger.log_feedback("r1", clicks=["c1"], timestamp=TS)
        for i in range(5_000):  # a busy app on a full disk
            logger.log_search("q", RESULTS, request_id=f"x{i}", timestamp=TS)
    assert rid == "r1" and ok is False
    assert logger.stats["failed"] == 5_002 and logger.stats["written"] == 0
    assert "No space left" in logger.stats["last_error"]
    assert any("could not write" in r.message for r in caplog.records)
    assert len(attempts) == 3  # one call tried 3 times (bounded retries), the rest waited out the pause
    assert len(list(tmp_path.rglob("*.jsonl"))) <= 1  # no file storm
    clock[0] += 1.5  # the pause is over, but the disk is still full: the next pause doubles
    logger.log_search("q", RESULTS, request_id="r-again", timestamp=TS)
    clock[0] += 1.5
    logger.log_search("q", RESULTS, request_id="r-still-paused", timestamp=TS)
    assert len(attempts) == 6
    monkeypatch.setattr(writer_mod, "_write", os.write)  # the disk has room again
    clock[0] += 2.0
    logger.log_search("q2", RESULTS, request_id="r2", timestamp=TS)
    assert logger.stats["written"] == 1
    assert [r["request_id"] for r in _lines(tmp_path)] == ["r2"]
    assert len(list(tmp_path.rglob("*.jsonl"))) == 1 and logger._writer.files_created == 1


def test_a_short_write_abandons_the_file_so_the_torn_line_stays_last(tmp_path, monkeypatch):
    real = os.write
    with SearchLogger(tmp_path, retries=0, pause_s=0) as logger:
        logger.log_search("first", RESULTS, request_id="a", timestamp=TS)
        monkeypatch.setattr(writer_mod, "_write", lambda fd, data: real(fd, data[: len(data) // 2]))
        logger.log_search("second", RESULTS, request_id="b", timestamp=TS)
        monkeypatch.setattr(writer_mod, "_write", real)
        logger.log_search("third", RESULTS, request_id="c", timestamp=TS)
        assert logger.stats["failed"] == 1
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert len(files) == 2
    stats = ingest_week(tmp_path, date(2026, 10, 5), date(2026, 10, 12), tmp_path / "o.parquet", tmp_path / "q.parquet")
    assert sorted(load_raw_logs(tmp_path / "o.parquet")["request_id"]) == ["a", "c"]
    assert stats.quarantined == {"torn_line": 1}


def test_an_unwritable_log_dir_never_breaks_the_app(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    logger = SearchLogger(blocker)
    assert logger.log_search("q", RESULTS, timestamp=TS)
    assert logger.stats["failed"] == 1


def test_bad_inputs_are_coerced_or_dead_lettered_with_the_reason(tmp_path):
    class Weird:
        def __str__(self):
            return "weird"

    with SearchLogger(tmp_path) as logger:
        logger.log_search("numpy-like", [{"chunk_id": 7, "text": "t", "score": "0.5", "rank": 1.0}],
                          request_id="coerced", timestamp=TS)
        logger.log_search("bad", [{"chunk_id": "c", "text": "t", "score": Weird(), "rank": 1}],
                          request_id="bad-score", timestamp=TS)
        logger.log_search(None, None, request_id="no-query", timestamp=TS)
        logger.log_feedback("coerced", thumbs=True, clicks="c", timestamp=TS)
        assert logger.stats["failed"] == 0 and logger.stats["dead_lettered"] == 2 and logger.stats["written"] == 2
    recs = {(r["type"], r["request_id"]): r for r in _lines(tmp_path, "day=*")}
    assert validate(recs[("search", "coerced")])[0]["results"][0] == {
        "chunk_id": "7", "text": "t", "score": 0.5, "rank": 1, "metadata": None}
    assert validate(recs[("feedback", "coerced")])[0]["thumbs"] == "up"
    assert recs[("feedback", "coerced")]["clicks"] == ["c"]
    dead = {d["record"]["request_id"]: d for d in _lines(tmp_path, "dead-letter")}
    assert {rid: (d["reason"], d["field"]) for rid, d in dead.items()} == {
        "bad-score": ("wrong_type", "results[0].score"), "no-query": ("missing_field", "query")}


def test_forked_child_writes_its_own_file(tmp_path):
    logger = SearchLogger(tmp_path)
    logger.log_search("parent", RESULTS, timestamp=TS)
    pid = os.fork()
    if pid == 0:  # child
        logger.log_search("child", RESULTS, timestamp=TS)
        os._exit(0)
    os.waitpid(pid, 0)
    logger.close()
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert len(files) == 2
    assert sorted(len(f.read_text().splitlines()) for f in files) == [1, 1]


def test_eight_writers_one_sigkilled_every_acknowledged_event_read_back_exactly_once(tmp_path):
    week = date(2026, 10, 5)
    result = run_writers(tmp_path / "logs", week_start=week, writers=8, events=10_000, kill_writer=0,
                         kill_after=3_000)
    assert result.killed == 0 and 3_000 <= result.killed_at < 10_000, "writer 0 must die mid-run"
    assert result.exit_codes[0] == -9 and result.exit_codes[1:] == [0] * 7
    stats = ingest_week(tmp_path / "logs", week, week + timedelta(days=7), tmp_path / "o.parquet",
                        tmp_path / "q.parquet")
    df = load_raw_logs(tmp_path / "o.parquet")
    ids = df["request_id"].tolist()
    assert len(ids) == len(set(ids))  # exactly once
    got = set(ids)
    acked = {request_id_for(w, i) for w in range(8) for i in range(result.acked[w])}
    assert acked <= got, f"lost {len(acked - got)} acknowledged events"
    # beyond the acknowledged ones, at most the single event in flight when the kill landed
    assert got - acked <= {request_id_for(0, result.killed_at)}
    assert stats.quarantined == {} and stats.duplicates == 0
    assert len(load_quarantine(tmp_path / "q.parquet")) == 0
    # no corrupt rows: content matches what each writer logged (after redaction)
    sample = df.sample(2_000, random_state=0)
    for row in sample.itertuples():
        w, i = int(row.request_id[1:3]), int(row.request_id[4:])
        assert row.query == redact(query_for(w, i))
        assert [r["rank"] for r in row.results] == [1, 2, 3]
        assert (len(row.clicks) == 1) == (i % FEEDBACK_EVERY == 0)
    print(f"\nacknowledged={result.events_acknowledged} read={len(ids)} killed_at={result.killed_at} "
          f"seconds={result.seconds:.1f}")
