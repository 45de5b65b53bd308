"""The ``corpus`` recipe's pieces: the frozen corpus, the query/document model, each row's targets.

Only the query encoder trains. The model is a sentence-transformers ``Router`` whose document
route is the base itself, frozen, so the corpus embeddings the app already serves stay valid (no
re-embedding after training). The loss (``losses.CorpusSoftmaxLoss``) scores each query against
every chunk of those embeddings; chunks judged relevant or related to the query are masked, or
(``corpus_targets = "graded"``, :func:`graded_targets`) are the target, each by its grade's gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.lib.datasets.tiers import latest_usable
from flywheel.lib.registry import index


@dataclass
class CorpusEmbeddings:
    """The frozen document side of a query-only fine-tune: the base's corpus embeddings, as served."""

    ids: list[str]
    vectors: np.ndarray  # (chunks, dim), float32, L2-normalised


def frozen_corpus(uri, base_model: str, corpus, *, max_seq_length: int, device: str, batch_size: int,
                  precision: str = "fp32", cache_dir=None, progress=None) -> CorpusEmbeddings:
    """The base's corpus embeddings as served (its LanceDB table at the serving precision, built
    here if missing, the base loaded only then; ``cache_dir``: where OpenVINO networks are kept
    between processes)."""
    base = index.EmbedderToLoad(base_model, max_seq_length, precision, device=device, cache_dir=cache_dir)
    table = index.ensure_corpus_table(
        uri, base, index.model_fingerprint(base_model), corpus, batch_size=batch_size, progress=progress
    )
    ids, vectors = index.table_vectors(uri, table)
    if progress:
        progress(f"corpus loss: the {len(ids)} chunks of {table} are the negatives")
    return CorpusEmbeddings(ids, vectors)


def related_chunks(labels: pd.DataFrame) -> dict[str, set[str]]:
    """query_key -> chunks judged relevant or related (grade >= 1): never negatives of that query."""
    judged = labels[labels["grade"].notna() & (labels["grade"] >= 1)]
    return judged.groupby("query_key")["chunk_id"].agg(set).to_dict()


def judged_grades(labels: pd.DataFrame) -> dict[str, dict[str, int]]:
    """query_key -> {chunk_id: grade} for chunks graded >= 1 (a pair judged in several weeks: its latest grade)."""
    judged = latest_usable(labels)
    judged = judged[judged["grade"] >= 1]
    out: dict[str, dict[str, int]] = {}
    for key, cid, grade in zip(judged["query_key"], judged["chunk_id"], judged["grade"]):
        out.setdefault(key, {})[cid] = int(grade)
    return out


def graded_targets(rows: pd.DataFrame, corpus_ids: list[str],
                   grades: dict[str, dict[str, int]]) -> list[tuple[list[int], list[float]]]:
    """Per row: (corpus indices, weights summing to 1) over its query's chunks graded >= 1, each
    weighted by the NDCG gain 2^grade - 1 (perfect 7, relevant 3, related 1). The row's positive is
    always in (at its judged grade, else as relevant). A soft, listwise target in the manner of
    ListNet (Cao et al., 2007): the query moves toward its perfect chunks most and its related ones
    a little, where the one-positive target pushes neither and masks both."""
    where = {cid: i for i, cid in enumerate(corpus_ids)}
    out = []
    for key, pos in zip(rows["query_key"], rows["positive_id"]):
        chunks = {pos: 2, **grades.get(key, {})}
        kept = sorted((where[c], 2.0 ** g - 1.0) for c, g in chunks.items() if c in where and g >= 1)
        total = sum(w for _, w in kept) or 1.0
        out.append(([i for i, _ in kept], [w / total for _, w in kept]))
    return out


def query_document_model(base_model: str, *, device: str = "auto", max_seq_length: int | None = None):
    """A Router model: the query route is a trainable copy of the base, the document route the
    base itself, frozen (its embeddings are the ones already in the corpus table)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Router

    query = index.load_embedder(base_model, device=device, max_seq_length=max_seq_length)
    document = index.load_embedder(base_model, device=device, max_seq_length=max_seq_length)
    for p in document.parameters():
        p.requires_grad_(False)
    router = Router.for_query_document(
        query_modules=list(query.children()), document_modules=list(document.children())
    )
    model = SentenceTransformer(modules=[router], device=index.resolve_device(device))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def corpus_targets(
    rows: pd.DataFrame, corpus_ids: list[str], related: dict[str, set[str]] | None = None
) -> tuple[list[int], list[list[int]], int]:
    """Per row: the positive's corpus index, and the indices to mask out of its softmax (the
    query's other positives and every chunk judged relevant or related to it: not negatives).
    Also the number of rows whose positive is not in the corpus (they cannot be trained on)."""
    where = {cid: i for i, cid in enumerate(corpus_ids)}
    positives = rows.groupby("query_key")["positive_id"].agg(set).to_dict()
    targets, masked, missing = [], [], 0
    for key, pos in zip(rows["query_key"], rows["positive_id"]):
        if pos not in where:
            missing += 1
            targets.append(-1)
            masked.append([])
            continue
        others = (positives.get(key, set()) | (related or {}).get(key, set())) - {pos}
        targets.append(where[pos])
        masked.append(sorted(where[c] for c in others if c in where))
    return targets, masked, missing


def write_towers_file(out: Path, base_model: str) -> None:
    """Record beside a query-only model that its documents are the base's (its corpus table)."""
    import json

    (Path(out) / index.TOWERS_FILE).write_text(json.dumps({
        "document_encoder": index.model_fingerprint(base_model),
        "document_encoder_path": str(base_model),
        "trained": "query",
    }, indent=2))
