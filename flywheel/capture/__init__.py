"""Capture: the small library a RAG app imports to log retrievals and feedback (no Dagster here).

    from flywheel.capture import SearchLogger
    logger = SearchLogger("/var/log/rag", retriever="bm25+minilm", retriever_version="2026-10-01")
    rid = logger.log_search(query, [{"chunk_id": ..., "text": ..., "score": ..., "rank": 1}])
    logger.log_feedback(rid, clicks=["c1"], thumbs="up", cited=["c1"])

Records land in append-only JSON Lines day files (see ``writer``); ``schema`` defines the format
and its versions, limits and coercions; ``redact`` strips PII before text is stored; ``importers``
turns traces other tools already wrote (OpenInference/OTLP, MLflow, Langfuse, LangSmith, Phoenix,
CSV, JSON Lines) into the same records.
"""

from flywheel.capture.logger import SearchLogger, build_feedback_record, build_search_record
from flywheel.capture.redact import redact, redact_identifier, redact_metadata
from flywheel.capture.schema import (
    SCHEMA_VERSION,
    RecordError,
    coerce_id,
    coerce_timestamp,
    format_timestamp,
    parse_timestamp,
    upgrade,
    validate,
)
from flywheel.capture.writer import DayFileWriter, encode_line

__all__ = [
    "SCHEMA_VERSION",
    "DayFileWriter",
    "RecordError",
    "SearchLogger",
    "build_feedback_record",
    "build_search_record",
    "coerce_id",
    "coerce_timestamp",
    "encode_line",
    "format_timestamp",
    "parse_timestamp",
    "redact",
    "redact_identifier",
    "redact_metadata",
    "upgrade",
    "validate",
]
