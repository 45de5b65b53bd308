"""Capture as real apps run it: forked children, spawn/forkserver, numpy/bytes/epoch inputs, limits, PII.

The fork test is the shape that hung before: a thread of the parent logs non-stop while the
parent forks, so the lock is often held at the moment of fork (47 of 50 children hung without
the at-fork reset, measured). The benchmark runs the same with 1,000 children.
"""

import json
import multiprocessing as mp
import pickle
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest

from flywheel.capture import SearchLogger, redact, validate
from flywheel.capture.redact import redact_identifier, redact_metadata
from flywheel.capture.schema import MAX_QUERY_CHARS, MAX_RESULTS, MAX_TEXT_CHARS
from flywheel.lib.logs.ingest import ingest_week, load_raw_logs
from flywheel.testing.capture_stress import fork_while_logging, log_from_process, run_type_battery

TS = datetime(2026, 10, 6, 12, tzinfo=timezone.utc)
WEEK = date(2026, 10, 5)


def _records(folder, pattern="day=*/*.jsonl"):
    return [json.loads(line) for f in sorted(folder.glob(pattern)) for line in f.read_text("utf-8").splitlines()]


def test_forked_children_never_hang_while_a_parent_thread_logs(tmp_path):
    result = fork_while_logging(tmp_path / "logs", children=50, timeout_s=30)
    assert result == {"children": 50, "hung": 0, "failed": 0, "records": 50}


@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver") if m in mp.get_all_start_methods()])
def test_the_logger_can_be_sent_to_spawn_and_forkserver_processes(tmp_path, method):
    logger = SearchLogger(tmp_path / "logs", retriever="sent", redact_pii=False)
    logger.log_search("parent", [{"chunk_id": "c", "text": "t", "score": 1.0}], request_id="p", timestamp=TS)
    clone = pickle.loads(pickle.dumps(logger))
    assert clone.retriever == "sent" and not clone.redact_pii and clone.stats["written"] == 0
    assert log_from_process(logger, method, n=3) == 0
    logger.close()
    ids = sorted(r["request_id"] for r in _records(tmp_path / "logs"))
    assert ids == sorted(["p"] + [f"{method}-{i}" for i in range(3)])


def test_every_input_of_the_type_battery_is_written_or_dead_lettered_never_lost(tmp_path):
    r = run_type_battery(tmp_path / "logs")
    assert r["lost_without_trace"] == 0 and r["failed"] == 0 and r["lost_ids"] == []
    assert r["dead_letter_reasons"] == {
        "case-24-unparseable_timestamp": "bad_timestamp", "case-25-dict_chunk_id": "wrong_type",
        "case-26-duplicate_ranks": "invalid_value", "case-27-none_query": "missing_field",
        "case-28-results_not_a_list": "wrong_type"}
    recs = {r["request_id"]: r for r in _records(tmp_path / "logs")}
    first = {k.split("-", 2)[2]: v["results"][0] if v["results"] else None for k, v in recs.items() if k.startswith("case")}
    assert first["np_int64_chunk_id"]["chunk_id"] == "42" and first["np_uint32_chunk_id"]["chunk_id"] == "7"
    assert first["bytes_chunk_id"]["chunk_id"] == "doc-9" and first["binary_bytes_chunk_id"]["chunk_id"] == "00ff10"
    assert first["np_float32_score"]["score"] == 0.25 and first["decimal_score"]["score"] == 0.75
    assert first["none_score"]["score"] is None and first["nan_score"]["score"] is None
    assert [r["rank"] for r in recs["case-10-missing_rank"]["results"]] == [1, 2]
    for case in ("epoch_seconds", "epoch_millis", "epoch_micros_np", "epoch_nanos_str", "basic_iso",
                 "naive_datetime", "np_datetime64"):
        (rid,) = [k for k in recs if k.endswith(case)]
        assert recs[rid]["timestamp"] == "2026-10-06T12:00:00.000000Z", case
    assert recs["case-15-offset_string"]["timestamp"] == "2026-10-07T07:30:00.000000Z"
    assert "123" in recs and recs["case-20-bytes_user_id"]["user_id"] == "u-1"
    # the same limits at write and read time: cut at capture, accepted by the reader
    assert len(recs["case-21-query_too_long"]["query"]) == MAX_QUERY_CHARS
    assert len(first["text_too_long"]["text"]) == MAX_TEXT_CHARS
    assert len(recs["case-23-too_many_results"]["results"]) == MAX_RESULTS
    dead = _records(tmp_path / "logs", "dead-letter/*.jsonl")
    assert {d["record"]["timestamp"] for d in dead if d["reason"] == "bad_timestamp"} == {"next tuesday"}
    stats = ingest_week(tmp_path / "logs", WEEK, WEEK + timedelta(days=7), tmp_path / "o.parquet", tmp_path / "q.parquet")
    assert stats.quarantined_total == 0 and stats.rows == len(recs) and stats.dead_letter_files == 1
    assert stats.files_not_read_count == 0  # the dead-letter folder is expected, not "unread"


@pytest.mark.parametrize("text, expected", [
    ("IBAN DE89370400440532013000 bitte", "IBAN [IBAN] bitte"),
    ("IBAN DE89 3704 0044 0532 0130 00", "IBAN [IBAN]"),
    ("compte FR7630006000011234567890189.", "compte [IBAN]."),
    ("GB82WEST12345698765432", "[IBAN]"),
    ("Card No.4111111111111111 expires", "Card No.[NUMBER] expires"),
    ("Karte Nr.4111-1111-1111-1111", "Karte Nr.[NUMBER]"),
    ("écrire à josé.garcía@correo.es", "écrire à [EMAIL]"),
    ("почта иван@пример.рф", "почта [EMAIL]"),
    ("用户 张伟@例子.中国 联系", "用户 [EMAIL] 联系"),
    ("call +44 20 7946 0958", "call [PHONE]"),
    ("tél 06 12 34 56 78", "tél [PHONE]"),
    ("+49 (0)30 1234567", "[PHONE]"),
    ("ssn 123-45-6789", "ssn [PHONE]"),
    # science stays
    ("pH 7.4, n=12, p<0.001, 95% CI 1.2-3.4", "pH 7.4, n=12, p<0.001, 95% CI 1.2-3.4"),
    ("dates 2020-01-15 and ranges 2019-2020", "dates 2020-01-15 and ranges 2019-2020"),
    ("p = 0.0000012, n = 1234567", "p = 0.0000012, n = 1234567"),
    ("session chat-2026-10-06-7", "session chat-2026-10-06-7"),
    ("gene BRCA1 and ABCD1234EFGH5678", "gene BRCA1 and ABCD1234EFGH5678"),
])
def test_international_redaction_battery(text, expected):
    assert redact(text) == expected


def test_identifiers_and_result_metadata_are_redacted_too(tmp_path):
    with SearchLogger(tmp_path) as logger:
        logger.log_search("q", [{"chunk_id": "c", "text": "t", "score": 1.0,
                                 "metadata": {"author": "ana@example.es", "api_key": "sk-123", "page": 3,
                                              "nested": [{"phone": "+33 6 12 34 56 78"}]}}],
                          user_id="ana@example.es", session_id="s-1", timestamp=TS)
        logger.log_search("q", [], user_id="ana@example.es", timestamp=TS)
    a, b = _records(tmp_path)
    assert a["user_id"].startswith("pii-") and a["user_id"] == b["user_id"]  # same pseudonym: still groups
    assert a["session_id"] == "s-1"
    assert a["results"][0]["metadata"] == {"author": "[EMAIL]", "api_key": "[SECRET]", "page": 3,
                                           "nested": [{"phone": "[PHONE]"}]}
    assert redact_identifier("u-42") == "u-42" and redact_metadata({"password": 1}) == {"password": "[SECRET]"}


def test_numpy_results_from_faiss_are_read_back_by_the_ingest(tmp_path):
    ids, scores = np.array([[17, 4, 99]], dtype=np.int64), np.array([[0.9, 0.5, 0.1]], dtype=np.float32)
    with SearchLogger(tmp_path / "logs") as logger:
        logger.log_search("faiss", [{"chunk_id": i, "text": f"doc {i}", "score": s} for i, s in zip(ids[0], scores[0])],
                          request_id="f", timestamp=int(TS.timestamp() * 1000))
    ingest_week(tmp_path / "logs", WEEK, WEEK + timedelta(days=7), tmp_path / "o.parquet", tmp_path / "q.parquet")
    row = load_raw_logs(tmp_path / "o.parquet").iloc[0]
    assert [(r["chunk_id"], r["rank"]) for r in row.results] == [("17", 1), ("4", 2), ("99", 3)]
    assert validate(_records(tmp_path / "logs")[0])[0]["results"][0]["score"] == pytest.approx(0.9)


def test_a_record_longer_than_the_reader_reads_is_dead_lettered_with_its_reason(tmp_path):
    results = [{"chunk_id": f"c{i}", "text": "x" * 90_000, "score": 1.0} for i in range(120)]  # ~11 MB
    with SearchLogger(tmp_path) as logger:
        logger.log_search("q", results, request_id="big", timestamp=TS)
        assert logger.stats["dead_lettered"] == 1 and logger.stats["written"] == 0
    (dead,) = _records(tmp_path, "dead-letter/*.jsonl")
    assert dead["reason"] == "line_too_long" and dead["record"] == {
        "type": "search", "request_id": "big", "timestamp": "2026-10-06T12:00:00.000000Z"}
