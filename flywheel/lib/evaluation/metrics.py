"""Retrieval metrics, per query, so that every comparison can be paired and bootstrapped.

Rankings come from the same LanceDB search the app serves from. Relevance is a set of relevant
chunks (the judge's eval sets: grade >= 2, gain 1 each) or a mapping chunk -> gain (a dataset's
human qrels, graded where the dataset grades: NFCorpus 1-2, TREC-COVID 1-2). NDCG@10 follows
BEIR, which scores with pytrec_eval's ``ndcg_cut.10`` (trec_eval: gain = the qrel's level, log2
discount, ideal DCG from the qrels' levels), so the base model's figure can be checked against
the published one on graded datasets too. Recall and MRR count any level above 0 as relevant.
"""

from __future__ import annotations

import math
from typing import AbstractSet, Callable, Mapping, Sequence, Union

import numpy as np
import pandas as pd

from flywheel.lib.registry import index

RECALL_KS = (1, 2, 3, 5, 10, 20, 40)  # the report's Recall@k curve
SEARCH_DEPTH = 100  # how deep we look for the first relevant chunk


Relevant = Union[AbstractSet[str], Mapping[str, float]]  # relevant chunks (gain 1), or chunk -> gain > 0


def gains(relevant: Relevant) -> Mapping[str, float]:
    """chunk -> gain: a set's chunks gain 1 each; a mapping's levels are the gains."""
    return relevant if isinstance(relevant, Mapping) else dict.fromkeys(relevant, 1.0)


def query_metrics(ranked: Sequence[str], relevant: Relevant, *, recall_ks=RECALL_KS) -> dict:
    gain = gains(relevant)
    rel_flags = [doc in gain for doc in ranked]
    dcg = sum(gain[doc] / math.log2(i + 2) for i, doc in enumerate(ranked[:10]) if doc in gain)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gain.values(), reverse=True)[:10]))
    first = next((i + 1 for i, r in enumerate(rel_flags) if r), None)
    out = {
        "ndcg@10": dcg / idcg if idcg else 0.0,
        "mrr@10": 1.0 / first if first and first <= 10 else 0.0,
        "first_relevant_rank": float(first) if first else float("nan"),
    }
    for k in recall_ks:
        out[f"recall@{k}"] = sum(rel_flags[:k]) / len(relevant) if relevant else 0.0
    return out


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Relevant],
    *,
    recall_ks=RECALL_KS,
    judged: Mapping[str, set[str]] | None = None,
    ignore_identical_ids: bool = True,
) -> pd.DataFrame:
    """Per-query metrics. With ``judged``, rankings are condensed first: chunks nobody judged for the
    query are skipped instead of counted as irrelevant (Sakai, SIGIR 2007). Eval sets are judged
    only on what the serving model retrieved, so without condensing, any model that surfaces
    other chunks is penalised for the pool, not for its ranking.

    ``ignore_identical_ids`` drops a retrieved document whose id is the query's own id, as BEIR's
    ``EvaluateRetrieval.evaluate`` does by default: in datasets whose queries are documents of the
    corpus (ArguAna, Quora) every model finds the query itself first, which is not a result."""
    rows = []
    for qid, relevant in qrels.items():
        if not relevant:
            continue
        ranked = rankings.get(qid, [])
        if ignore_identical_ids:
            ranked = [d for d in ranked if d != qid]
        if judged is not None:
            pool = judged.get(qid, set())
            ranked = [d for d in ranked if d in pool]
        rows.append({"query_id": qid, **query_metrics(ranked, relevant, recall_ks=recall_ks)})
    return pd.DataFrame(rows)


def retrieve(
    model, queries: Mapping[str, str], lancedb_uri, table: str, *, k: int = SEARCH_DEPTH, batch_size: int = 64,
    scores_out: dict[str, list[float]] | None = None,
) -> dict[str, list[str]]:
    """Top-k chunk ids per query; with ``scores_out``, their cosine scores are stored there too."""
    qids = list(queries)
    vecs = index.encode(model, [queries[q] for q in qids], batch_size=batch_size, task="query")
    hits = index.search(lancedb_uri, table, vecs, k)
    if scores_out is not None:
        scores_out.update({qid: [score for _, score in h] for qid, h in zip(qids, hits)})
    return {qid: [doc for doc, _ in h] for qid, h in zip(qids, hits)}


def summarize(per_query: pd.DataFrame) -> dict:
    metrics = [c for c in per_query.columns if c not in ("query_id", "first_relevant_rank")]
    out = {m: float(per_query[m].mean()) if len(per_query) else float("nan") for m in metrics}
    out["queries"] = int(len(per_query))
    return out


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict:
    """Mean of (b - a) over queries with a percentile confidence interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0:
        return {"delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    diff = b - a
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(diff), size=(n_resamples, len(diff)))
    means = diff[samples].mean(axis=1)
    return {
        "delta": float(diff.mean()),
        "ci_low": float(np.quantile(means, alpha / 2)),
        "ci_high": float(np.quantile(means, 1 - alpha / 2)),
        "n": int(len(diff)),
    }


def rank_movement(before: pd.DataFrame, after: pd.DataFrame, depth: int = SEARCH_DEPTH) -> dict:
    """How far the first relevant chunk moved ("from position 20 to position 5")."""
    merged = before[["query_id", "first_relevant_rank"]].merge(
        after[["query_id", "first_relevant_rank"]], on="query_id", suffixes=("_before", "_after")
    )
    miss = depth + 1  # not in the top ``depth``: counted as just below it
    b = merged["first_relevant_rank_before"].fillna(miss)
    a = merged["first_relevant_rank_after"].fillna(miss)
    return {
        "queries": int(len(merged)),
        "improved": int((a < b).sum()),
        "worsened": int((a > b).sum()),
        "unchanged": int((a == b).sum()),
        "median_rank_before": float(b.median()) if len(b) else float("nan"),
        "median_rank_after": float(a.median()) if len(a) else float("nan"),
        "mean_rank_before": float(b.mean()) if len(b) else float("nan"),
        "mean_rank_after": float(a.mean()) if len(a) else float("nan"),
        "in_top5_before": int((b <= 5).sum()),
        "in_top5_after": int((a <= 5).sum()),
        "moved_into_top5_from_below_10": int(((b > 10) & (a <= 5)).sum()),
    }


def comparison_table(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> str:
    """Markdown table: one row per metric, one column per model; the change is last vs first."""
    names = list(results)
    header = "| metric | " + " | ".join(names) + (" | change |" if len(names) > 1 else " |")
    sep = "|---" * (len(names) + 1 + (len(names) > 1)) + "|"
    lines = [header, sep]
    for m in metrics:
        vals = [results[n].get(m, float("nan")) for n in names]
        row = f"| {m} | " + " | ".join(f"{v:.4f}" for v in vals)
        if len(names) > 1:
            base, last = vals[0], vals[-1]
            rel = f"{(last - base) / base * 100:+.1f}%" if base else "from 0"
            row += f" | {last - base:+.4f} ({rel})"
        lines.append(row + " |")
    return "\n".join(lines)


def eval_sets_judged(eval_sets: pd.DataFrame) -> dict[str, set[str]]:
    """Every chunk judged (any grade) per eval query: the pool for condensed-list evaluation."""
    judged = eval_sets[eval_sets["grade"].notna()] if "grade" in eval_sets else eval_sets
    return {key: set(group["chunk_id"]) for key, group in judged.groupby("query_key")}


def eval_sets_to_qrels(eval_sets: pd.DataFrame) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Queries and judged-relevant chunks from eval sets (keyed by normalised query text)."""
    queries, qrels = {}, {}
    for key, group in eval_sets.groupby("query_key"):
        queries[key] = group["query"].iloc[0]
        qrels[key] = set(group.loc[group["relevant"], "chunk_id"])
    return queries, qrels


def rank_model_on(
    model,
    model_id: str,
    corpus,
    lancedb_uri,
    suites: Mapping[str, tuple[Mapping[str, str], Mapping[str, set[str]]]],
    *,
    batch_size: int = 64,
    depth: int = SEARCH_DEPTH,
    progress: Callable[[str], None] | None = None,
    scores_out: dict[str, dict[str, list[float]]] | None = None,
    units: float = 0.0,
) -> dict[str, dict[str, list[str]]]:
    """Rankings (top ``depth`` chunk ids per query) of one model on several suites.

    ``model_id`` names the corpus table: the id of the model's document encoder
    (``index.corpus_encoder_id``); ``units``: the weight of sentence units (0: chunks only)."""
    table = index.ensure_corpus_table(lancedb_uri, model, model_id, corpus, batch_size=batch_size, progress=progress,
                                      units=units)
    out = {}
    for name, suite in suites.items():
        scores = scores_out.setdefault(name, {}) if scores_out is not None else None
        out[name] = retrieve(model, suite[0], lancedb_uri, table, k=depth, batch_size=batch_size, scores_out=scores)
    return out


def retrieval_latency_ms(
    model, queries: Sequence[str], lancedb_uri, table: str, *, k: int = SEARCH_DEPTH, sample: int = 50
) -> list[float]:
    """Milliseconds per query as the app would see it: encode one query, then search LanceDB.

    Timed one query at a time (not batched) on the first ``sample`` queries, after one warm-up."""
    import time

    picked = list(queries)[:sample]
    if not picked:
        return []
    index.search(lancedb_uri, table, index.encode(model, picked[:1], task="query"), k)  # warm-up
    times = []
    for q in picked:
        started = time.perf_counter()
        index.search(lancedb_uri, table, index.encode(model, [q], task="query"), k)
        times.append((time.perf_counter() - started) * 1000)
    return times
