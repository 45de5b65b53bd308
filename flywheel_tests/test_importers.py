"""Importers: JSON Lines and CSV with mappings, OpenInference spans; bad rows reported, good ones kept.

Real exports (flywheel_tests/fixtures/exports, see the README there) are in test_importers_real.py.
"""

import json
from datetime import date, datetime, timedelta, timezone

import pytest

from flywheel.capture.importers import MappingError, import_csv, import_jsonl, import_openinference, to_datetime
from flywheel.lib.logs.ingest import ingest_week, load_raw_logs

WEEK = date(2026, 10, 5)
TUE = int(datetime(2026, 10, 6, 10, tzinfo=timezone.utc).timestamp())  # epoch seconds


def _ingest(tmp_path):
    stats = ingest_week(tmp_path / "logs", WEEK, WEEK + timedelta(days=7), tmp_path / "o.parquet", tmp_path / "q.parquet")
    return stats, load_raw_logs(tmp_path / "o.parquet").set_index("request_id")


def test_jsonl_with_mapping_imports_good_lines_and_reports_bad_ones(tmp_path):
    src = tmp_path / "old.jsonl"
    rows = [
        {"id": "r1", "when": TUE, "question": "mail bob@x.org", "ctx": [
            {"doc": "d1", "body": "first", "sim": 0.9}, {"doc": "d2", "body": "second", "sim": 0.4}]},
        {"id": "r2", "when": "2026-10-07T08:00:00", "question": "q2", "ctx": [{"doc": "d3", "body": "b", "sim": "x"}]},
        {"id": "r3", "question": "no time", "ctx": []},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    mapping = {"request_id": "id", "timestamp": "when", "query": "question", "results": "ctx",
               "results.chunk_id": "doc", "results.text": "body", "results.score": "sim"}
    stats = import_jsonl(src, tmp_path / "logs", mapping=mapping, retriever="legacy")
    assert stats.read == 4 and stats.imported == 1
    assert {(i.line, i.field, i.reason) for i in stats.issues} == {
        (2, "results[0].score", "wrong_type"), (3, "timestamp", "missing_field"), (4, None, "invalid_json")}
    assert all(str(src) in str(i) for i in stats.issues)
    _, df = _ingest(tmp_path)
    r1 = df.loc["r1"]
    assert r1.query == "mail [EMAIL]" and r1.retriever == "legacy"
    assert [(r["chunk_id"], r["rank"]) for r in r1.results] == [("d1", 1), ("d2", 2)]


def test_jsonl_of_capture_records_passes_through_including_v0(tmp_path):
    src = tmp_path / "cap.jsonl"
    src.write_text(json.dumps({"id": "v0", "ts": float(TUE), "query": "old", "docs": [
        {"id": "a", "content": "x", "score": 1}]}) + "\n" + json.dumps(
        {"schema_version": 1, "type": "feedback", "request_id": "v0", "timestamp": "2026-10-06T00:00:00Z",
         "clicks": ["a"], "saves": [], "thumbs": "up", "dwell_ms": None, "cited": []}) + "\n")
    stats = import_jsonl(src, tmp_path / "logs")
    assert stats.imported == 1 and stats.feedback == 1 and not stats.issues
    _, df = _ingest(tmp_path)
    assert list(df.loc["v0"].clicks) == ["a"] and df.loc["v0"].thumbs == "up"


def test_csv_rows_grouped_by_request_with_column_mapping(tmp_path):
    src = tmp_path / "export.csv"
    src.write_text(
        "req,ts,q,doc,passage,s,user\n"
        "a,2026-10-06T10:00:00Z,first question,d1,text one,0.9,u1\n"
        f"b,{(TUE + 86400) * 1000},second,d9,\"with, comma\",0.3,\n"
        "a,2026-10-06T10:00:00Z,first question,d2,text two,0.7,u1\n"
        "c,2026-10-06T10:00:00Z,bad score,d1,t,high,\n"
        ",2026-10-06T10:00:00Z,no id,d1,t,1,\n"
    )
    mapping = {"request_id": "req", "timestamp": "ts", "query": "q", "chunk_id": "doc", "text": "passage",
               "score": "s", "user_id": "user"}
    stats = import_csv(src, tmp_path / "logs", mapping=mapping)
    assert stats.imported == 2
    assert {(i.line, i.field, i.reason) for i in stats.issues} == {(5, "s", "wrong_type"), (6, "req", "missing_field")}
    _, df = _ingest(tmp_path)
    assert [(r["chunk_id"], r["rank"]) for r in df.loc["a"].results] == [("d1", 1), ("d2", 2)]
    assert df.loc["a"].user_id == "u1" and df.loc["b"].results[0]["text"] == "with, comma"
    assert str(df.loc["b"].timestamp) == "2026-10-07 10:00:00+00:00"  # epoch milliseconds


def test_csv_with_missing_columns_fails_clearly(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("a,b\n1,2\n")
    with pytest.raises(MappingError) as exc:
        import_csv(src, tmp_path / "logs")
    assert "request_id" in str(exc.value) and "mapping" in str(exc.value)


def test_a_csv_mapping_with_a_typo_imports_nothing_and_names_the_column(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("req,ts,q,doc,passage\na,2026-10-06T10:00:00Z,first,d1,text\n")
    mapping = {"request_id": "req", "timestamp": "ts", "query": "q", "chunk_id": "doc", "text": "pasage"}
    with pytest.raises(MappingError) as exc:
        import_csv(src, tmp_path / "logs", mapping=mapping)
    assert "'pasage' not found" in str(exc.value) and "did you mean 'passage'" in str(exc.value)
    assert not (tmp_path / "logs").exists()


def test_a_json_mapping_path_that_never_matches_is_reported(tmp_path):
    src = tmp_path / "old.jsonl"
    src.write_text(json.dumps({"id": "r1", "when": TUE, "question": "q", "ctx": [{"doc": "d1", "body": "b"}]}) + "\n")
    mapping = {"request_id": "id", "timestamp": "when", "query": "question", "results": "ctx",
               "results.chunk_id": "doc", "results.text": "bdy"}
    stats = import_jsonl(src, tmp_path / "logs", mapping=mapping)
    assert stats.imported == 0
    assert [(i.field, i.reason) for i in stats.issues] == [
        ("results[0].text", "missing_field"), ("bdy", "mapping_never_matched")]


def _attr(k, v):
    if isinstance(v, float):
        return {"key": k, "value": {"doubleValue": v}}
    if isinstance(v, int):
        return {"key": k, "value": {"intValue": str(v)}}
    return {"key": k, "value": {"stringValue": v}}


def test_openinference_otlp_json_retriever_spans(tmp_path):
    attrs = {"openinference.span.kind": "RETRIEVER", "input.value": '{"query": "what is phoenix?"}',
             "input.mime_type": "application/json", "session.id": "s1", "user.id": "u1",
             "retrieval.documents.0.document.id": "doc-a", "retrieval.documents.0.document.content": "A",
             "retrieval.documents.0.document.score": 0.8,
             "retrieval.documents.0.document.metadata": '{"source": "a.md"}',
             "retrieval.documents.1.document.id": "doc-b", "retrieval.documents.1.document.content": "B",
             "retrieval.documents.1.document.score": 0.2}
    doc = {"resourceSpans": [{"resource": {"attributes": [_attr("service.version", "1.4")]},
                              "scopeSpans": [{"spans": [
        {"traceId": "t1", "spanId": "span-1", "name": "vector_search", "startTimeUnixNano": str(TUE * 10**9),
         "attributes": [_attr(k, v) for k, v in attrs.items()]},
        {"traceId": "t1", "spanId": "span-2", "name": "llm", "startTimeUnixNano": str(TUE * 10**9),
         "attributes": [_attr("openinference.span.kind", "LLM")]},
    ]}]}]}
    src = tmp_path / "traces.json"
    src.write_text(json.dumps(doc, indent=1))
    stats = import_openinference(src, tmp_path / "logs")
    assert stats.imported == 1 and stats.skipped == 1 and not stats.issues
    _, df = _ingest(tmp_path)
    row = df.loc["span-1"]
    assert row.query == "what is phoenix?" and row.retriever == "vector_search" and row.retriever_version == "1.4"
    assert row.session_id == "s1" and row.user_id == "u1"
    assert [(r["chunk_id"], r["text"], r["score"], r["rank"]) for r in row.results] == [
        ("doc-a", "A", 0.8, 1), ("doc-b", "B", 0.2, 2)]


def test_openinference_phoenix_rows_as_json_lines(tmp_path):
    rows = [
        {"context.span_id": "p1", "span_kind": "RETRIEVER", "name": "retrieve", "start_time": "2026-10-08T12:00:00+00:00",
         "attributes.input.value": "plain query", "attributes.retrieval.documents": [
             {"document.id": "x", "document.content": "X", "document.score": 1.5},
             {"document.id": "y", "document.content": "Y", "document.score": 0.5}]},
        {"context.span_id": "p2", "span_kind": "RETRIEVER", "name": "retrieve", "start_time": "2026-10-08T12:00:00+00:00",
         "attributes.input.value": "docs without ids", "attributes.retrieval.documents": [{"document.content": "Z"}]},
        {"context.span_id": "p3", "span_kind": "CHAIN", "name": "chain", "start_time": "2026-10-08T12:00:00+00:00"},
    ]
    src = tmp_path / "spans.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = import_openinference(src, tmp_path / "logs")
    assert stats.imported == 2 and stats.skipped == 1 and not stats.issues
    _, df = _ingest(tmp_path)
    assert [r["chunk_id"] for r in df.loc["p1"].results] == ["x", "y"]
    # no id: a stable id from the content; no score: null, ranked by position
    (doc,) = df.loc["p2"].results
    assert doc["chunk_id"].startswith("content:") and doc["score"] is None and doc["rank"] == 1


def test_one_bad_int_value_rejects_only_its_span(tmp_path):
    good = [_attr(k, v) for k, v in {"openinference.span.kind": "RETRIEVER", "input.value": "q",
                                     "retrieval.documents.0.document.id": "d",
                                     "retrieval.documents.0.document.content": "D"}.items()]
    bad = good + [{"key": "retrieval.documents.0.document.score", "value": {"intValue": "not-a-number"}}]
    spans = [{"traceId": "t", "spanId": f"s{i}", "name": "r", "startTimeUnixNano": str(TUE * 10**9),
              "attributes": attrs} for i, attrs in enumerate([good, bad, good])]
    src = tmp_path / "t.json"
    src.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}))
    stats = import_openinference(src, tmp_path / "logs")
    assert stats.imported == 2 and stats.lost == 1
    assert [(i.field, i.reason) for i in stats.issues] == [("results[0].score", "wrong_type")]


def test_timestamp_units():
    assert to_datetime(TUE).isoformat() == "2026-10-06T10:00:00+00:00"
    assert to_datetime(TUE * 1000) == to_datetime(TUE * 10**6) == to_datetime(str(TUE * 10**9)) == to_datetime(TUE)
    assert to_datetime("2026-10-07 10:00:00").tzinfo is not None
