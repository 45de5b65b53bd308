"""Embedding models and their corpus tables in LanceDB.

Each model version gets its own table of corpus embeddings, named by a fingerprint of the
model's weights, the corpus and the sequence length, so embedding the corpus (minutes on CPU)
happens once per model and every later search, benchmark or rerun reuses it.

Sentence units (``units`` > 0): a chunk is also represented by each of its sentences
(:func:`sentence_units`), one row per unit, whose vector is
``(1 - units) * chunk + units * unit``. A search takes each chunk's best row, so a chunk scores
``(1 - units) * cos(query, chunk) + units * max over its units of cos(query, unit)``: the passage
that answers the query counts, not only the average of the whole chunk (Dai and Callan, 2019,
"MaxP"; Chen et al., 2023, "Dense X Retrieval"). One vector per chunk cannot hold a long chunk's
every claim, and the encoder truncates what exceeds its sequence length; units cover all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from flywheel.lib.beir import Corpus
from flywheel.lib.progress import Progress as ProgressMeter
from flywheel.lib.registry.store import Where, connect, search_connection

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
    texts = list(texts)
    # longest first over the whole list (sentence-transformers sorts only within one call), so a
    # batch pads little; the vectors are put back in the texts' order
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = []
    meter = ProgressMeter(label, len(texts), progress)
    chunk = max(batch_size * 8, 1)
    total_chars, chars = max(sum(len(t) for t in texts), 1), 0  # time left by characters: the longest go first
    for start in range(0, len(texts), chunk):
        part = [texts[i] for i in order[start:start + chunk]]
        out.append(
            fn(part, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        )
        chars += sum(len(t) for t in part)
        meter.update(start + len(part), force=start + chunk >= len(texts), work=chars / total_chars)
    if not out:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    vectors = np.empty((len(texts), out[0].shape[1]), dtype=np.float32)
    vectors[order] = np.vstack(out)
    # normalised again in float32: a bf16 model normalises in bf16 (norms off by ~1e-3)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


UNITS_KEY = b"flywheel_sentence_units"  # schema metadata of a table with sentence units: their weight
PARTITIONS_KEY = b"flywheel_ivf_partitions"  # and its IVF_FLAT index's partitions (0: none), all probed
UNITS_INDEX_MIN_ROWS = 10_000  # below this an exact flat scan is fast enough: no index
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")  # end mark, space, then a capital, digit or bracket


def split_sentences(text: str) -> list[str]:
    """``text``'s sentences in order (a fragment of three characters or fewer is dropped)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 3]


def sentence_units(text: str) -> list[str]:
    """A chunk's sentences; none for a chunk of one sentence (its own vector already is that
    sentence's). Pairs of adjacent sentences as units too would triple the tokens to embed (every
    sentence twice more) for a small gain in the dense stage alone."""
    parts = split_sentences(text)
    return parts if len(parts) > 1 else []


def corpus_table_name(model_id: str, corpus: Corpus, max_seq_length: int, precision: str = "fp32",
                      units: float = 0.0) -> str:
    from flywheel.lib.registry.inference import table_suffix

    suffix = f"_units{units:g}".replace(".", "p") if units else ""
    return f"corpus_{model_id}_{corpus.sha256[:10]}_{max_seq_length}{table_suffix(precision)}{suffix}"


def replace_table(db, name: str, data):
    """Create or overwrite a table (overwriting a table that is not there makes Lance warn)."""
    return db.create_table(name, data=data, mode="overwrite" if name in db.list_tables().tables else "create")


def table_names(uri: Where) -> list[str]:
    return list(connect(uri).list_tables().tables)


@dataclass
class EmbedderToLoad:
    """An embedder that is loaded only if its corpus table must be built.

    A corpus table is named by the model's id, the sequence length and the precision, so a caller
    that only needs the table (a query-only model reads its base's; a rerun finds it built) gives
    this instead of a loaded model, and :func:`ensure_corpus_table` loads it (documents only, at
    ``precision``) only when it embeds. Loading converts and quantizes a new model's network for
    OpenVINO, which is wasted when nothing is embedded."""

    path: str | Path
    max_seq_length: int
    precision: str = "fp32"
    device: str = "auto"
    cache_dir: str | Path | None = None
    _model: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def table_precision(self) -> str:
        """The precision the loaded model would run its documents at (``auto`` resolved)."""
        from flywheel.lib.registry.inference import resolve_precision

        return resolve_precision(self.precision, resolve_device(self.device))

    def load(self):
        if self._model is None:
            self._model = load_embedder(self.path, device=self.device, max_seq_length=self.max_seq_length,
                                        precision=self.precision, query_precision=self.precision,
                                        cache_dir=self.cache_dir)
        return self._model


def _table_key(model) -> tuple[int, str]:
    """(sequence length, precision) that name a model's corpus table, without loading an ``EmbedderToLoad``."""
    from flywheel.lib.registry.inference import precision_of

    if isinstance(model, EmbedderToLoad):
        return model.max_seq_length, model.table_precision()
    return model.max_seq_length, precision_of(model)


def _loaded(model):
    return model.load() if isinstance(model, EmbedderToLoad) else model


def ensure_corpus_table(
    uri: Where,
    model,
    model_id: str,
    corpus: Corpus,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    table_name: str | None = None,
    units: float = 0.0,
) -> str:
    """Embed the corpus with ``model`` into LanceDB unless a complete table already exists; with
    ``units`` (their weight, 0 < units <= 1), the table of sentence units (built from the chunks' table).
    ``model``: a loaded embedder, or an :class:`EmbedderToLoad`, loaded only if it must embed."""
    if units:
        return _ensure_units_table(uri, model, model_id, corpus, units, batch_size=batch_size, progress=progress,
                                   table_name=table_name)
    db = connect(uri)
    name = table_name or corpus_table_name(model_id, corpus, *_table_key(model))
    if name in db.list_tables().tables and db.open_table(name).count_rows() == len(corpus):
        return name
    started = time.monotonic()
    vectors = encode(_loaded(model), corpus.texts, batch_size=batch_size, label=f"embed corpus ({model_id})", progress=progress)
    dim = vectors.shape[1]
    data = pa.table({
        "id": pa.array(corpus.ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim),
    })
    replace_table(db, name, data)
    if progress:
        progress(f"embedded {len(corpus)} chunks into LanceDB table {name} in {time.monotonic() - started:.0f}s")
    return name


def _ensure_units_table(uri: Where, model, model_id: str, corpus: Corpus, units: float, *, batch_size: int,
                        progress: Progress | None, table_name: str | None) -> str:
    """The sentence-unit table: one row per unit of each chunk (a chunk without units: its own
    vector), from the chunks' table (embedded first if missing) and the units' embeddings."""
    if not 0.0 < units <= 1.0:
        raise ValueError(f"sentence units' weight must be in (0, 1], got {units}")
    db = connect(uri)
    name = table_name or corpus_table_name(model_id, corpus, *_table_key(model), units)
    per_chunk = [sentence_units(t) for t in corpus.texts]
    rows = sum(max(1, len(u)) for u in per_chunk)
    if name in db.list_tables().tables:
        tbl = db.open_table(name)
        if tbl.count_rows() == rows and PARTITIONS_KEY in (tbl.schema.metadata or {}):
            return name
    ids, chunk_vectors = table_vectors(uri, ensure_corpus_table(uri, model, model_id, corpus, batch_size=batch_size,
                                                                progress=progress))
    at = {cid: i for i, cid in enumerate(ids)}
    started = time.monotonic()
    flat = [u for us in per_chunk for u in us]
    unit_vectors = encode(_loaded(model), flat, batch_size=batch_size, label=f"embed sentence units ({model_id})", progress=progress)
    out_ids, out = [], []
    i = 0
    for cid, us in zip(corpus.ids, per_chunk):
        chunk = chunk_vectors[at[cid]]
        if not us:
            out_ids.append(cid)
            out.append(chunk[None, :])
            continue
        out_ids += [cid] * len(us)
        out.append((1.0 - units) * chunk[None, :] + units * unit_vectors[i:i + len(us)])
        i += len(us)
    vectors = np.vstack(out).astype(np.float32)
    data = pa.table({
        "id": pa.array(out_ids, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1]),
    }).replace_schema_metadata({UNITS_KEY: str(units).encode(), PARTITIONS_KEY: str(_partitions(len(out_ids))).encode()})
    _index_units(replace_table(db, name, data))
    if progress:
        progress(f"embedded {len(flat)} sentence units of {len(corpus)} chunks into LanceDB table {name} "
                 f"in {time.monotonic() - started:.0f}s")
    return name


def _partitions(rows: int) -> int:
    return 0 if rows < UNITS_INDEX_MIN_ROWS else min(256, rows // 1500)


def _index_units(tbl) -> None:
    """An IVF_FLAT index on a sentence-unit table (LanceDB's flat scan reads every row per query;
    the index keeps the vectors as they are, and :func:`search` probes every partition, so the
    search stays exact)."""
    from lancedb.index import IvfFlat

    partitions = int((tbl.schema.metadata or {}).get(PARTITIONS_KEY, b"0"))
    if partitions:
        tbl.create_index("vector", config=IvfFlat(distance_type="dot", num_partitions=partitions), replace=True)


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
    _index_units(replace_table(db, name, db.open_table(source).to_arrow()))


def search(
    uri: Where, table: str, query_vectors: np.ndarray, k: int
) -> list[list[tuple[str, float]]]:
    """Top-k (chunk id, score) per query, exact search (fast enough below ~1M rows). The score is
    the cosine, or in a table of sentence units the chunk's best unit row (see the module's doc)."""
    if len(query_vectors) == 0:
        return []
    tbl = search_connection(uri).open_table(table)
    meta = tbl.schema.metadata or {}
    has_units, partitions = UNITS_KEY in meta, int(meta.get(PARTITIONS_KEY, b"0"))
    total = tbl.count_rows() if has_units else 0
    results: list[list[tuple[str, float]]] = [[] for _ in range(len(query_vectors))]
    for start in range(0, len(query_vectors), 256):
        block = query_vectors[start:start + 256]
        limit = k * 8 if has_units else k  # a chunk's units crowd the top rows
        while True:
            found = _best_rows(tbl, block, limit, partitions)
            if not has_units or limit >= total or all(len(h) >= k for h in found):
                break
            limit *= 4  # a query's top rows held fewer than k chunks: look deeper
        for qi, hits in enumerate(found):
            results[start + qi] = sorted(hits.items(), key=lambda x: -x[1])[:k]
    return results


def _best_rows(tbl, block: np.ndarray, limit: int, partitions: int = 0) -> list[dict[str, float]]:
    """Per query of ``block``: chunk id -> its best score among the top ``limit`` rows (an indexed
    table: every one of its ``partitions`` probed, so the result is exact)."""
    query = tbl.search(block if len(block) > 1 else block[0]).distance_type("dot")
    if partitions:
        query = query.nprobes(partitions)
    res = query.limit(limit).select(["id", "_distance"]).to_arrow()
    found: list[dict[str, float]] = [{} for _ in range(len(block))]
    qidx = res.column("query_index").to_pylist() if "query_index" in res.column_names else [0] * res.num_rows
    for qi, doc_id, dist in zip(qidx, res.column("id").to_pylist(), res.column("_distance").to_pylist()):
        score = 1.0 - float(dist)
        if score > found[qi].get(doc_id, -np.inf):
            found[qi][doc_id] = score
    return found


def set_torch_threads(n: int = 0) -> None:
    """Use ``n`` threads, or every core this process may run on (torch can undershoot in containers)."""
    import torch

    torch.set_num_threads(n or len(os.sched_getaffinity(0)) or 1)
