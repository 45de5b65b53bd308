"""Keyword search (BM25) beside the vector index, and a hybrid of the two.

BM25 is LanceDB's own full-text index (``create_fts_index``: English stemming, stop words,
lower case) on a table of chunk texts, one table per corpus (``bm25_<corpus hash>``), shared by
every model: keyword search needs no training and no embedding. A hybrid retriever fuses, per
query, the dense model's top ``k`` (cosine) with BM25's top ``k``:

- ``"zscore"``: each list's scores are standardised over that query's list (mean 0, sd 1) and
  blended, ``(1 - w) * z(dense) + w * z(bm25)``, ``w = bm25_weight``. A chunk only one list
  found gets the other list's lowest z-score (it ranked below everything that list returned).
  BM25 scores have no fixed scale (they grow with query length and rare terms), cosine scores
  sit in a narrow band: standardising per query makes the two comparable.
- ``"rrf"``: reciprocal rank fusion, ``1/(60 + dense rank) + 1/(60 + bm25 rank)``; a chunk
  missing from a list gets no share from it.

The fusion runs on the (id, score) lists the benchmark already holds for every dense model, so
a hybrid costs one BM25 search per query and no second vector search.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from flywheel.lib.beir import Corpus
from flywheel.lib.registry import index
from flywheel.lib.registry.store import connect

Hits = list[tuple[str, float]]  # (chunk id, score), best first
FUSIONS = ("zscore", "rrf")
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)


def bm25_table_name(corpus: Corpus) -> str:
    return f"bm25_{corpus.sha256[:10]}"


def ensure_bm25_table(uri, corpus: Corpus, *, progress: Callable[[str], None] | None = None) -> str:
    """A LanceDB table of (id, text) with a BM25 full-text index on ``text``, built once per corpus."""
    from lancedb.index import FTS

    db = connect(uri)
    name = bm25_table_name(corpus)
    if name in db.list_tables().tables:
        tbl = db.open_table(name)
        if tbl.count_rows() == len(corpus) and any("text" in i.columns for i in tbl.list_indices()):
            return name
    started = time.monotonic()
    data = pa.table({"id": pa.array(corpus.ids, pa.string()), "text": pa.array(corpus.texts, pa.string())})
    tbl = index.replace_table(db, name, data)
    tbl.create_index("text", config=FTS(language="English", stem=True, remove_stop_words=True, lower_case=True,
                                        ascii_folding=True), replace=True)
    if progress:
        progress(f"BM25 index over {len(corpus)} chunks in LanceDB table {name} in {time.monotonic() - started:.1f}s")
    return name


def bm25_search(uri, table: str, queries: Sequence[str], k: int) -> list[Hits]:
    """Top-k (chunk id, BM25 score) per query. The query is matched as plain words (no query
    syntax), so quotes, colons or a leading minus in a user's question are just text."""
    from lancedb.query import MatchQuery

    tbl = connect(uri).open_table(table)
    out: list[Hits] = []
    for q in queries:
        if not q.strip():
            out.append([])
            continue
        res = tbl.search(MatchQuery(q, "text"), query_type="fts").limit(k).select(["id", "_score"]).to_arrow()
        out.append(list(zip(res.column("id").to_pylist(), (float(s) for s in res.column("_score").to_pylist()))))
    return out


def fuse(dense: Hits, lexical: Hits, *, fusion: str = "zscore", bm25_weight: float = 0.5, k: int | None = None) -> Hits:
    """One query's fused (chunk id, score) list, best first; ties keep the dense list's order."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown hybrid fusion {fusion!r}: use one of {FUSIONS}")
    if not 0.0 <= bm25_weight <= 1.0:
        raise ValueError(f"bm25_weight must be in [0, 1], got {bm25_weight}")
    ids = list(dict.fromkeys([d for d, _ in dense] + [d for d, _ in lexical]))
    if fusion == "rrf":
        score = dict.fromkeys(ids, 0.0)
        for hits, w in ((dense, 1.0 - bm25_weight), (lexical, bm25_weight)):
            for rank, (d, _) in enumerate(hits, 1):
                score[d] += 2.0 * w / (RRF_K + rank)  # w = 0.5: plain RRF
    else:
        zd, zl = _zscores(dense), _zscores(lexical)
        floor_d = min(zd.values(), default=0.0)
        floor_l = min(zl.values(), default=0.0)
        score = {d: (1.0 - bm25_weight) * zd.get(d, floor_d) + bm25_weight * zl.get(d, floor_l) for d in ids}
    order = sorted(range(len(ids)), key=lambda i: (-score[ids[i]], i))
    fused = [(ids[i], float(score[ids[i]])) for i in order]
    return fused[:k] if k else fused


def _zscores(hits: Hits) -> dict[str, float]:
    if not hits:
        return {}
    s = np.asarray([v for _, v in hits], dtype=np.float64)
    sd = s.std()
    z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    return {d: float(v) for (d, _), v in zip(hits, z)}


def fuse_all(
    dense: Mapping[str, Hits], lexical: Mapping[str, Hits], *, fusion: str = "zscore", bm25_weight: float = 0.5,
    k: int = 100,
) -> dict[str, Hits]:
    """``fuse`` for every query id in ``dense`` (a query BM25 found nothing for keeps its dense list)."""
    return {qid: fuse(hits, lexical.get(qid, []), fusion=fusion, bm25_weight=bm25_weight, k=k)
            for qid, hits in dense.items()}


def calibrate_weight(
    dense: Mapping[str, Hits], lexical: Mapping[str, Hits], qrels: Mapping[str, set[str]], *,
    fusion: str = "zscore", grid: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    judged: Mapping[str, set[str]] | None = None,
) -> tuple[float, dict[float, float]]:
    """The BM25 weight with the best mean NDCG@10 on labelled queries (e.g. the judged eval sets,
    never the test split), and the NDCG@10 of every weight tried. Ties go to the smaller weight."""
    from flywheel.lib.evaluation.metrics import evaluate_rankings

    found: dict[float, float] = {}
    for w in grid:
        fused = fuse_all(dense, lexical, fusion=fusion, bm25_weight=w)
        per_q = evaluate_rankings({q: [d for d, _ in h] for q, h in fused.items()}, qrels, judged=judged)
        found[float(w)] = float(per_q["ndcg@10"].mean()) if len(per_q) else float("nan")
    best = max(found, key=lambda w: (found[w], -w))
    return best, found


def hybrid_search(
    model, uri, vector_table: str, bm25_table: str, queries: Sequence[str], *, k: int = 100,
    fusion: str = "zscore", bm25_weight: float = 0.5,
) -> list[Hits]:
    """What an app serves: encode the queries, search the vectors and BM25, fuse per query."""
    dense = index.search(uri, vector_table, index.encode(model, list(queries), task="query"), k)
    lexical = bm25_search(uri, bm25_table, queries, k)
    return [fuse(d, l, fusion=fusion, bm25_weight=bm25_weight, k=k) for d, l in zip(dense, lexical)]


def bm25_latency_ms(uri, table: str, queries: Sequence[str], k: int = 100) -> list[float]:
    """Milliseconds per BM25 search, one query at a time (as an app calls it), after a warm-up."""
    queries = [q for q in queries if q.strip()]
    if not queries:
        return []
    bm25_search(uri, table, queries[:1], k)
    times = []
    for q in queries:
        started = time.perf_counter()
        bm25_search(uri, table, [q], k)
        times.append((time.perf_counter() - started) * 1000)
    return times
