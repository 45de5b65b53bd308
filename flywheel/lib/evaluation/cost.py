"""What a model costs to run, beside what it is worth: query latency, corpus encode rate, size.

A team choosing between models (or precisions of one model) needs both columns: a reranker that
adds 2% NDCG@10 at 600 ms per query is a different offer from one that adds it at 100 ms. Every
figure here is measured on the machine that runs it, one query at a time for latency (as an app
calls it), after a warm-up; the sample sizes are returned with the figures so a report can say
how much was timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from flywheel.config import RerankerSettings, default_of
from flywheel.lib.registry import index
from flywheel.lib.registry.inference import (
    precision_of, query_precision_of, runtime_weights_mb, sides_label, state_dict_mb,
)

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".onnx", ".xml"}


@dataclass
class ModelCost:
    name: str
    precision: str
    query_ms_p50: float  # embedder: encode one query (+ search); reranker: score one query's candidates
    query_ms_p95: float
    queries_timed: int
    passages_per_s: float  # embedder: corpus passages encoded per second; reranker: pairs scored per second
    passages_timed: int
    size_on_disk_mb: float  # the model's folder as saved (weights at the precision they were saved in)
    weights_mb: float  # the weights at the precision it runs at (what a saved copy at that precision holds)
    query_precision: str = ""  # an embedder's queries, where they run at another precision than its corpus

    def as_dict(self) -> dict:
        return asdict(self)


def size_on_disk_mb(path: str | Path) -> float:
    """Megabytes of the weight files in a model folder (training checkpoints excluded)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES and "checkpoint" not in str(p)]
    return sum(p.stat().st_size for p in files) / 1e6


def weights_mb(model) -> float:
    """Megabytes of the model's state dict as it runs now (bf16 halves it; int8 packs Linear weights).

    A model running on OpenVINO holds its weights outside torch: the size of its network as saved."""
    if (mb := runtime_weights_mb(model)) is not None:
        return mb
    return state_dict_mb(model)


def query_latency_ms(
    model, queries: Sequence[str], *, search: Callable[[np.ndarray], object] | None = None,
) -> list[float]:
    """Milliseconds per query: encode it alone (and run ``search`` on its vector), after a warm-up."""
    queries = [q for q in queries if q.strip()]
    if not queries:
        return []
    warm = index.encode(model, queries[:1], task="query")
    if search:
        search(warm)
    times = []
    for q in queries:
        started = time.perf_counter()
        vec = index.encode(model, [q], task="query")
        if search:
            search(vec)
        times.append((time.perf_counter() - started) * 1000)
    return times


def encode_rate(model, passages: Sequence[str], *, batch_size: int = 64) -> float:
    """Passages encoded per second as a corpus is (batched, at the model's max_seq_length)."""
    passages = list(passages)
    if not passages:
        raise ValueError("encode_rate needs at least one passage")
    index.encode(model, passages[: min(len(passages), 8)], batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    index.encode(model, passages, batch_size=batch_size)
    return len(passages) / (time.perf_counter() - started)


def rerank_latency_ms(
    model, queries: Mapping[str, str], candidates: Mapping[str, Sequence[str]], *, batch_size: int = 64,
    read: str = "head",
) -> tuple[list[float], float]:
    """(ms per query to score its candidate texts, pairs scored per second), after a warm-up
    on the first query (a reranker on OpenVINO compiles its shape then). ``read``: what the
    reranker reads of a long chunk (``RerankerSettings.passages``); for ``"focused"`` the
    per-query selection is timed too, each chunk's sentences split beforehand (once per chunk,
    as an index stores them), so every precision timed is charged the same."""
    from flywheel.lib.training.reranker import passages_as_read, score_pairs

    items = [(q, list(candidates[qid])) for qid, q in queries.items() if candidates.get(qid)]
    if not items:
        return [], float("nan")
    for q, cands in items:  # each chunk's sentences split and counted once (kept by focused_passages)
        passages_as_read(model, q, cands, read)
    q0, c0 = items[0]
    score_pairs(model, q0, c0, batch_size=batch_size, read=read)
    times, pairs = [], 0
    for q, cands in items:
        started = time.perf_counter()
        score_pairs(model, q, cands, batch_size=batch_size, read=read)
        times.append((time.perf_counter() - started) * 1000)
        pairs += len(cands)
    return times, pairs / (sum(times) / 1000)


def embedder_cost(
    name: str, path: str | Path, model, queries: Sequence[str], passages: Sequence[str], *,
    search: Callable[[np.ndarray], object] | None = None, batch_size: int = 64,
) -> ModelCost:
    """Query latency (encode + ``search``), corpus encode rate and size of one loaded embedder."""
    ms = query_latency_ms(model, queries, search=search)
    return ModelCost(
        name=name, precision=precision_of(model), query_ms_p50=_pct(ms, 50), query_ms_p95=_pct(ms, 95),
        queries_timed=len(ms), passages_per_s=encode_rate(model, passages, batch_size=batch_size),
        passages_timed=len(passages), size_on_disk_mb=size_on_disk_mb(path), weights_mb=weights_mb(model),
        query_precision=query_precision_of(model) if query_precision_of(model) != precision_of(model) else "",
    )


def reranker_cost(
    name: str, path: str | Path, model, queries: Mapping[str, str], candidates: Mapping[str, Sequence[str]], *,
    batch_size: int = 64, read: str = "head",
) -> ModelCost:
    """Per-query rerank latency over the given candidate texts, pairs/s and size of one reranker
    (``read`` as in :func:`rerank_latency_ms`)."""
    ms, rate = rerank_latency_ms(model, queries, candidates, batch_size=batch_size, read=read)
    return ModelCost(
        name=name, precision=precision_of(model), query_ms_p50=_pct(ms, 50), query_ms_p95=_pct(ms, 95),
        queries_timed=len(ms), passages_per_s=rate, passages_timed=sum(len(candidates[q]) for q in queries if q in candidates),
        size_on_disk_mb=size_on_disk_mb(path), weights_mb=weights_mb(model),
    )


def cost_table_markdown(costs: Sequence[ModelCost]) -> str:
    """One row per (model, precision): what the report shows beside quality."""
    lines = ["| model | precision | query p50 ms | query p95 ms | passages (or pairs) / s | size on disk MB | weights MB |",
             "|---|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c.name} | {sides_label(c.precision, c.query_precision)} | {c.query_ms_p50:.1f} | {c.query_ms_p95:.1f} | "
                     f"{c.passages_per_s:.1f} | {c.size_on_disk_mb:.1f} | {c.weights_mb:.1f} |")
    return "\n".join(lines)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def precision_costs(
    embedder_path: str | Path, passages: Sequence[str], queries: Sequence[str], *,
    reranker_path: str | Path | None = None, candidates: Mapping[str, Sequence[str]] | None = None,
    precisions: Sequence[str] = ("fp32", "bf16"), max_seq_length: int = 256,
    rerank_max_length: int = default_of(RerankerSettings, "max_length"),
    rerank_passages: str = default_of(RerankerSettings, "passages"), batch_size: int = 64, device: str = "cpu",
    search: Callable[[np.ndarray], object] | None = None,
    query_precision: str = "auto", progress: Callable[[str], None] | None = None,
) -> list[ModelCost]:
    """The same embedder (and reranker) at each precision, measured side by side in one run.

    ``candidates`` maps a query (text) to the passages the reranker scores for it (e.g. a first
    stage's top 40); a fresh copy of each model is loaded per precision (its queries at
    ``query_precision``, resolved against each: see ``registry.inference``)."""
    from flywheel.lib.training.reranker import load_reranker

    out = []
    for precision in precisions:
        model = index.load_embedder(embedder_path, device=device, max_seq_length=max_seq_length, precision=precision,
                                    query_precision=query_precision)
        out.append(embedder_cost("embedder", embedder_path, model, queries, passages, search=search,
                                 batch_size=batch_size))
        if progress:
            progress(f"embedder at {sides_label(precision, out[-1].query_precision)}: {out[-1].passages_per_s:.1f} passages/s (seq {max_seq_length}), "
                     f"query p50 {out[-1].query_ms_p50:.1f} ms")
        if reranker_path is not None and candidates:
            ce = load_reranker(reranker_path, device=device, max_length=rerank_max_length, precision=precision)
            out.append(reranker_cost("reranker", reranker_path, ce, {q: q for q in candidates}, candidates,
                                     batch_size=batch_size, read=rerank_passages))
            if progress:
                progress(f"reranker at {precision}: p50 {out[-1].query_ms_p50:.0f} ms, p95 {out[-1].query_ms_p95:.0f} ms "
                         f"per query ({max(len(c) for c in candidates.values())} candidates, seq {rerank_max_length})")
    return out
