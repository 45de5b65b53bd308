"""Importers on real exports, shaped exactly as each tool writes them (fixtures/exports/README.md).

Each format: every retriever record imports (0 lost), the other spans are skipped with a reason,
ids/scores/queries come out as the tool meant them, and the raw_logs ingest reads them back.
"""

import gzip
import json
import shutil
from datetime import date, timedelta
from pathlib import Path

import pytest

from flywheel.capture.importers import import_file, import_folder, import_paths
from flywheel.lib.logs.ingest import ingest_week, load_raw_logs

EXPORTS = Path(__file__).parent / "fixtures" / "exports"

# file -> (format, retriever records in it, request ids expected)
REAL = {
    "langchain_console.txt": ("openinference", 2),
    "langchain_otlp.json": ("otlp", 2),
    "llamaindex_spans.jsonl": ("openinference", 1),
    "haystack_otlp.json": ("otlp", 1),
    "haystack_console.txt": ("openinference", 1),
    "phoenix_span.json": ("phoenix", 1),
    "mlflow_trace.json": ("mlflow", 1),
    "langfuse_observations.json": ("langfuse", 2),
    "langsmith_runs.jsonl": ("langsmith", 1),
}


def _records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.rglob("*.jsonl")) for line in f.read_text("utf-8").splitlines()]


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "named"])
def test_every_real_export_imports_every_retriever_record(tmp_path, name, explicit):
    fmt, expected = REAL[name]
    stats = import_file(EXPORTS / name, tmp_path / "logs", format=fmt if explicit else "auto")
    assert (stats.retrievals, stats.imported, stats.lost) == (expected, expected, 0), stats.summary()
    assert not stats.issues
    recs = _records(tmp_path / "logs")
    assert len(recs) == expected and all(r["results"] and r["query"].strip() for r in recs)


def test_langchain_documents_without_id_or_score_get_content_ids_null_scores_and_redaction(tmp_path):
    import_file(EXPORTS / "langchain_console.txt", tmp_path / "logs")
    first, second = _records(tmp_path / "logs")
    assert first["query"] == "how do statins lower cholesterol?" and first["retriever"] == "KB"
    assert first["request_id"] == "f7a09c722c691787"  # the console's 0x-prefixed span id, as hex
    assert [r["rank"] for r in first["results"]] == [1, 2, 3] and all(r["score"] is None for r in first["results"])
    assert all(r["chunk_id"].startswith("content:") for r in first["results"])
    # the same passage gets the same id in both searches (stable), and its metadata is kept
    assert [r["chunk_id"] for r in first["results"]] == [r["chunk_id"] for r in second["results"]]
    assert first["results"][0]["metadata"] == {"source": "cardio.pdf", "page": 3}
    assert first["results"][2]["text"] == "Contact the study nurse at [EMAIL] for enrolment."
    # the OTLP JSON of the same spans gives the same records
    import_file(EXPORTS / "langchain_otlp.json", tmp_path / "otlp")
    assert [r["results"] for r in _records(tmp_path / "otlp")] == [first["results"], second["results"]]


def test_haystack_embedding_query_takes_the_text_of_the_traces_embedding_span(tmp_path):
    stats = import_file(EXPORTS / "haystack_otlp.json", tmp_path / "logs")
    (rec,) = _records(tmp_path / "logs")
    assert rec["query"] == "does aspirin prevent heart attacks?"  # not "<4-dimensional vector>"
    assert [r["score"] for r in rec["results"]] == [0.3125, 0.2625]
    assert stats.skipped_by_reason == {"span_kind_chain": 1, "span_kind_embedding": 1}


def test_a_vector_query_with_no_text_in_its_trace_is_reported_not_imported_as_text(tmp_path):
    doc = json.loads((EXPORTS / "haystack_otlp.json").read_text())
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans[:] = [s for s in spans if s["name"] != "CreateEmbeddings"]  # only the retriever and the pipeline
    src = tmp_path / "no-embedding.json"
    src.write_text(json.dumps(doc))
    stats = import_file(src, tmp_path / "logs")
    assert stats.imported == 0 and stats.lost == 1
    assert [(i.field, i.reason) for i in stats.issues] == [("input.value", "non_text_query")]


def test_llamaindex_inner_span_without_documents_is_skipped_and_a_missing_score_is_null(tmp_path):
    stats = import_file(EXPORTS / "llamaindex_spans.jsonl", tmp_path / "a")
    assert stats.skipped_by_reason == {"retriever_span_without_documents": 1}
    (rec,) = _records(tmp_path / "a")
    assert rec["query"] == "why is vitamin D deficiency common?"
    assert [r["chunk_id"] for r in rec["results"]] == ["node-vitd-1", "node-vitd-2"]
    # older instrumentors leave out a score that is None: imported with a null score
    lines = (EXPORTS / "llamaindex_spans.jsonl").read_text().splitlines()
    span = json.loads(lines[1])
    span["attributes"] = {k: v for k, v in span["attributes"].items() if not k.endswith(".score")}
    (tmp_path / "old.jsonl").write_text(json.dumps(span) + "\n")
    assert import_file(tmp_path / "old.jsonl", tmp_path / "b").imported == 1
    assert [r["score"] for r in _records(tmp_path / "b")[0]["results"]] == [None, None]


def test_platform_exports_keep_ids_users_sessions_and_utc_days(tmp_path):
    import_file(EXPORTS / "mlflow_trace.json", tmp_path / "mlflow")
    (m,) = _records(tmp_path / "mlflow")
    assert m["request_id"] == "tr-506542be84806eb5de5536c7343cf590"
    assert [r["chunk_id"] for r in m["results"]][0] == "diabetes.md#2"
    import_file(EXPORTS / "langsmith_runs.jsonl", tmp_path / "ls")
    (s,) = _records(tmp_path / "ls")
    assert (s["user_id"], s["session_id"], s["results"][0]["chunk_id"]) == ("u-42", "sess-9", "nsaid-1")
    import_file(EXPORTS / "langfuse_observations.json", tmp_path / "lf")
    by_id = {r["request_id"]: r for r in _records(tmp_path / "lf")}
    span_v2 = by_id["a9d8c7b6-1e2f-4a3b-8c4d-5e6f7a8b9c0d"]  # a v2 SPAN whose output is documents
    assert span_v2["timestamp"] == "2026-10-07T06:02:11.004000Z"  # 08:02 at +02:00, in UTC
    assert sorted(p.parent.name for p in (tmp_path / "lf").rglob("*.jsonl")) == ["day=2026-10-06", "day=2026-10-07"]
    import_file(EXPORTS / "phoenix_span.json", tmp_path / "px")
    (p,) = _records(tmp_path / "px")
    assert p["timestamp"] == "2023-09-15T14:04:07.167267Z" and p["results"][0]["score"] == pytest.approx(0.8024, abs=1e-4)


def test_gzip_rotated_and_bom_files_and_a_folder_import(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    with gzip.open(src / "runs.jsonl.1.gz", "wb") as f:
        f.write((EXPORTS / "langsmith_runs.jsonl").read_bytes())
    (src / "spans.jsonl.2").write_bytes(b"\xef\xbb\xbf" + (EXPORTS / "llamaindex_spans.jsonl").read_bytes())
    shutil.copy(EXPORTS / "langchain_console.txt", src / "console.log")
    results = {Path(s.source).name: s for s in import_paths([src], tmp_path / "logs")}
    assert {k: (s.imported, s.lost) for k, s in results.items()} == {
        "runs.jsonl.1.gz": (1, 0), "spans.jsonl.2": (1, 0), "console.log": (2, 0)}


def test_the_import_folder_moves_files_to_done_with_their_summary(tmp_path):
    inbox = tmp_path / "imports"
    inbox.mkdir()
    shutil.copy(EXPORTS / "mlflow_trace.json", inbox)
    (inbox / "broken.csv").write_text("a,b\n1,2\n")
    stats = import_folder(inbox, tmp_path / "logs")
    assert [s.imported for s in stats] == [0, 1]
    assert (inbox / "done" / "mlflow_trace.json").exists()
    summary = json.loads((inbox / "done" / "mlflow_trace.json.summary.json").read_text())
    assert summary["imported"] == 1 and summary["lost"] == 0
    # a file whose columns do not fit goes to failed/, its summary saying why
    assert (inbox / "failed" / "broken.csv").exists() and not (inbox / "broken.csv").exists()
    assert "request_id" in (inbox / "failed" / "broken.csv.summary.json").read_text()
    assert import_folder(inbox, tmp_path / "logs") == []  # nothing left waiting


def test_capture_records_are_redacted_cleaned_and_filed_by_their_utc_day(tmp_path):
    rows = [
        {"schema_version": 1, "type": "search", "request_id": "late", "timestamp": "2026-10-06T23:30:00-08:00",
         "query": "mail jane@example.org", "user_id": "jane@example.org", "session_id": "s1", "retriever": "r",
         "retriever_version": "1", "api_key": "sk-live-123",
         "results": [{"chunk_id": "c", "text": "IBAN DE89370400440532013000", "score": None, "rank": 1,
                      "metadata": {"owner": "bob@example.org", "token": "abc"}}]},
        {"schema_version": 1, "type": "search", "request_id": "basic", "timestamp": "20261008T101500Z",
         "query": "q", "results": []},
        {"schema_version": 1, "type": "search", "request_id": "weekdate", "timestamp": "2026-W41-5T09:00:00+00:00",
         "query": "q", "results": []},
    ]
    src = tmp_path / "cap.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = import_file(src, tmp_path / "logs", format="capture")
    assert stats.imported == 3 and not stats.issues
    recs = {r["request_id"]: r for r in _records(tmp_path / "logs")}
    late = recs["late"]
    assert "api_key" not in late and late["timestamp"] == "2026-10-07T07:30:00.000000Z"
    assert late["query"] == "mail [EMAIL]" and late["user_id"].startswith("pii-")
    assert late["results"][0]["text"] == "IBAN [IBAN]"
    assert late["results"][0]["metadata"] == {"owner": "[EMAIL]", "token": "[SECRET]"}
    days = sorted(p.parent.name for p in (tmp_path / "logs").rglob("*.jsonl"))
    assert days == ["day=2026-10-07", "day=2026-10-08", "day=2026-10-09"]
    week = date(2026, 10, 5)
    ingest = ingest_week(tmp_path / "logs", week, week + timedelta(days=7), tmp_path / "o.parquet", tmp_path / "q.parquet")
    assert ingest.rows == 3 and ingest.quarantined_total == 0
    assert sorted(load_raw_logs(tmp_path / "o.parquet").request_id) == ["basic", "late", "weekdate"]


def test_one_bad_value_in_a_pretty_printed_stream_never_stops_the_next(tmp_path):
    text = (EXPORTS / "langchain_console.txt").read_text()
    first_end = text.index("\n}\n") + 3
    broken = text[:first_end].replace('"input.value"', '"input.value" oops', 1) + text[first_end:]
    src = tmp_path / "console.txt"
    src.write_text(broken)
    stats = import_file(src, tmp_path / "logs")
    assert stats.imported == 1 and stats.issues_by_reason == {"invalid_json": 1}
    assert stats.issues[0].line > 1  # the line of the bad value, not the file's start


def test_flywheel_import_command_prints_a_summary_per_file(tmp_path, monkeypatch, capsys):
    from flywheel.cli import main

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    code = main(["import", str(EXPORTS / "mlflow_trace.json"), str(EXPORTS / "langchain_otlp.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "mlflow_trace.json [auto:mlflow]: imported 1 of 1 retrievals, lost 0" in out
    assert "langchain_otlp.json [auto:openinference]: imported 2 of 2 retrievals, lost 0" in out
    assert len(_records(tmp_path / "home" / "logs")) == 3
    assert main(["import", str(tmp_path / "missing.json"), "--format", "langfuse"]) == 1
    assert "file_not_read" in capsys.readouterr().out


def test_nested_exports_langsmith_child_runs_and_a_langfuse_trace_with_observations(tmp_path):
    run = json.loads((EXPORTS / "langsmith_runs.jsonl").read_text())
    root = {**run, "id": "root", "run_type": "chain", "name": "RAG", "child_runs": [run]}
    (tmp_path / "tree.json").write_text(json.dumps(root))
    stats = import_file(tmp_path / "tree.json", tmp_path / "ls")
    assert (stats.imported, stats.skipped_by_reason) == (1, {"run_type_chain": 1})
    page = json.loads((EXPORTS / "langfuse_observations.json").read_text())
    trace = {"id": "c5a1e2f4b3d64f6a8e9b0c1d2e3f4a5b", "timestamp": "2026-10-06T21:14:03.400Z", "userId": "u-9",
             "sessionId": "chat-1", "observations": [{k: v for k, v in o.items() if k not in ("userId", "sessionId")}
                                                     for o in page["data"][:2]]}
    (tmp_path / "trace.json").write_text(json.dumps(trace))
    stats = import_file(tmp_path / "trace.json", tmp_path / "lf")
    assert stats.imported == 1 and stats.lost == 0
    (rec,) = _records(tmp_path / "lf")
    assert (rec["user_id"], rec["session_id"]) == ("u-9", "chat-1")


def test_a_phoenix_spans_dataframe_saved_as_parquet(tmp_path):
    import pandas as pd

    span = json.loads((EXPORTS / "phoenix_span.json").read_text())
    row = {"name": span["name"], "span_kind": span["span_kind"], "parent_id": span["parent_id"],
           "start_time": pd.Timestamp(span["start_time"], tz="UTC"), "status_code": "OK",
           "context.span_id": span["context"]["span_id"], "context.trace_id": span["context"]["trace_id"],
           "attributes.input.value": span["attributes"]["input.value"],
           "attributes.retrieval.documents": span["attributes"]["retrieval.documents"]}
    other = {**row, "context.span_id": "llm-1", "span_kind": "LLM", "attributes.retrieval.documents": None}
    pd.DataFrame([row, other]).to_parquet(tmp_path / "spans.parquet")
    stats = import_file(tmp_path / "spans.parquet", tmp_path / "logs", format="phoenix")
    assert (stats.imported, stats.lost, stats.skipped_by_reason) == (1, 0, {"span_kind_llm": 1})
    (rec,) = _records(tmp_path / "logs")
    assert rec["timestamp"] == "2023-09-15T14:04:07.167267Z"
    assert [r["chunk_id"] for r in rec["results"]] == [d["document.id"] for d in span["attributes"]["retrieval.documents"]]
