"""Embedding models and their corpus tables in LanceDB.

Each model version gets its own table of corpus embeddings, named by a fingerprint of the
model's weights, the corpus and the sequence length, so embedding the corpus (minutes on CPU)
happens once per model and every later search, benchmark or rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from flywheel.lib.beir import Corpus
from flywheel.lib.progress import Progress as ProgressMeter
from flywheel.lib.registry.store import Where, connect

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(
    path: str | Path, *, device: str = "auto", max_seq_length: int | None = None, precision: str = "fp32",
    query_precision: str = "auto", calibration_texts=None, cache_dir: str | Path | None = None,
):
    """A SentenceTransformer from a local folder; never reaches for a model hub.

    ``precision`` ("fp32", "bf16", "int8", "openvino-bf16", "openvino-int8" or "auto") and
    ``query_precision`` (the same choices; ``auto`` follows ``precision`` except that int8 on
    OpenVINO encodes queries at bf16) are for inference only: load at fp32 to train. Where the two
    differ, a single-tower model is loaded as a query/document Router of two copies. See
    ``registry.inference``, which also explains ``calibration_texts`` and ``cache_dir``."""
    from sentence_transformers import SentenceTransformer

    from flywheel.lib.registry.inference import (
        apply_precision, resolve_precision, resolve_query_precision, with_query_route,
    )

    path = Path(path)
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: not a sentence-transformers model folder (no modules.json or config.json)"
        )
    model = SentenceTransformer(str(path), device=resolve_device(device), local_files_only=True)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    corpus = resolve_precision(precision, str(model.device))
    query = resolve_query_precision(query_precision, corpus, str(model.device))
    if query != corpus:
        model = with_query_route(model)
    return apply_precision(model, corpus, str(model.device), query_precision=query,
                           calibration_texts=calibration_texts, cache_dir=cache_dir)


TOWERS_FILE = "flywheel_towers.json"  # written beside a query-only fine-tune: whose documents it reads


def corpus_encoder_id(path: str | Path) -> str:
    """The fingerprint of the model that encodes a model's *documents*.

    A query-only fine-tune (training loss ``corpus``) keeps its base's document encoder: it
    searches the base's corpus table, so a new model needs no corpus re-embedding."""
    towers = Path(path) / TOWERS_FILE
    if towers.exists():
        return json.loads(towers.read_text())["document_encoder"]
    return model_fingerprint(path)


def transformer_dir(path: str | Path) -> Path:
    """The folder of the model's (query-side) transformer, e.g. to start a cross-encoder from it."""
    path = Path(path)
    routed = sorted(path.glob("query_*_Transformer"))
    return routed[0] if routed else path


def model_fingerprint(path: str | Path) -> str:
    """Short content hash of a model folder's weights and configs: a stable model version id."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"} and "checkpoint" not in str(p)
    )
    if not files:
        raise FileNotFoundError(f"{path}: no model files to fingerprint")
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def encode(
    model,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    label: str = "encode",
    progress: Progress | None = None,
    task: str = "document",
) -> np.ndarray:
    """Normalised float32 embeddings, with progress reports for long corpora.

    ``task`` is "query" or "document": a model with separate query and document encoders
    (sentence-transformers' Router) routes by it; a single-tower model encodes both alike."""
    if task not in ("query", "document"):
        raise ValueError(f"task must be 'query' or 'document', got {task!r}")
    fn = model.encode_query if task == "query" else model.encode_document
    out = []
    meter = ProgressMeter(label, len(texts), progress)
    chunk = max(batch_size * 8, 1)
    for start in range(0, len(texts), chunk):
        part = list(texts[start:start + chunk])
        out.append(
            fn(part, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        )
        meter.update(start + len(part), force=start + chunk >= len(texts))
    if not out:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    vectors = np.vstack(out).astype(np.float32)
    # normalised again in float32: a bf16 model normalises in bf16 (norms off by ~1e-3)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def corpus_table_name(model_id: str, corpus: Corpus, max_seq_length: int, precision: str = "fp32") -> str:
    from flywheel.lib.registry.inference import table_suffix

    return f"corpus_{model_id}_{corpus.sha256[:10]}_{max_seq_length}{table_suffix(precision)}"


def replace_table(db, name: str, data):
    """Create or overwrite a table (overwriting a table that is not there makes Lance warn)."""
    return db.create_table(name, data=data, mode="overwrite" if name in db.list_tables().tables else "create")


def table_names(uri: Where) -> list[str]:
    return list(connect(uri).list_tables().tables)


def ensure_corpus_table(
    uri: Where,
    model,
    model_id: str,
    corpus: Corpus,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    table_name: str | None = None,
) -> str:
    """Embed the corpus with ``model`` into LanceDB unless a complete table already exists."""
    db = connect(uri)
    from flywheel.lib.registry.inference import precision_of

    name = table_name or corpus_table_name(model_id, corpus, model.max_seq_length, precision_of(model))
    if name in db.list_tables().tables and db.open_table(name).count_rows() == len(corpus):
        return name
    started = time.monotonic()
    vectors = encode(model, corpus.texts, batch_size=batch_size, label=f"embed corpus ({model_id})", progress=progress)
    dim = vectors.shape[1]
    data = pa.table({
        "id": pa.array(corpus.ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim),
    })
    replace_table(db, name, data)
    if progress:
        progress(f"embedded {len(corpus)} chunks into LanceDB table {name} in {time.monotonic() - started:.0f}s")
    return name


def table_vectors(uri: Where, name: str) -> tuple[list[str], np.ndarray]:
    """(chunk ids, float32 matrix) of a corpus table, in the table's order."""
    tbl = connect(uri).open_table(name).to_arrow()
    vectors = tbl.column("vector").combine_chunks()
    dim = vectors.type.list_size
    matrix = np.asarray(vectors.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    return tbl.column("id").to_pylist(), matrix


def write_named_table(uri: Where, name: str, source: str) -> None:
    """Copy a corpus table under another name (e.g. ``serving`` for the champion)."""
    db = connect(uri)
    replace_table(db, name, db.open_table(source).to_arrow())


def search(
    uri: Where, table: str, query_vectors: np.ndarray, k: int
) -> list[list[tuple[str, float]]]:
    """Top-k (chunk id, cosine score) per query, exact search (fast enough below ~1M chunks)."""
    if len(query_vectors) == 0:
        return []
    tbl = connect(uri).open_table(table)
    results: list[list[tuple[str, float]]] = [[] for _ in range(len(query_vectors))]
    for start in range(0, len(query_vectors), 256):
        block = query_vectors[start:start + 256]
        res = (
            tbl.search(block if len(block) > 1 else block[0])
            .distance_type("dot")
            .limit(k)
            .select(["id", "_distance"])
            .to_arrow()
        )
        qidx = res.column("query_index").to_pylist() if "query_index" in res.column_names else [0] * res.num_rows
        for qi, doc_id, dist in zip(qidx, res.column("id").to_pylist(), res.column("_distance").to_pylist()):
            results[start + qi].append((doc_id, 1.0 - float(dist)))
    for hits in results:
        hits.sort(key=lambda x: -x[1])
    return results


def set_torch_threads(n: int = 0) -> None:
    """Use ``n`` threads, or every core this process may run on (torch can undershoot in containers)."""
    import torch

    torch.set_num_threads(n or len(os.sched_getaffinity(0)) or 1)
