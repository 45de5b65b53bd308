"""Base, champion, challenger and challenger + reranker, on the eval sets to date and on the
dataset's held-out test split.

Per-query results are kept (and written to a file by the report) so that the promotion gate
pairs and bootstraps exactly the numbers the report shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from flywheel.lib import evaluation, index
from flywheel.lib.beir import BeirDataset

REPORT_METRICS = ["ndcg@10", "recall@1", "recall@5", "recall@10", "recall@20", "mrr@10"]


def test_split_suite(ds: BeirDataset) -> tuple[dict[str, str], dict[str, set[str]]]:
    qrels = {qid: {d for d, s in docs.items() if s > 0} for qid, docs in ds.qrels.get("test", {}).items()}
    return {qid: ds.queries[qid] for qid in qrels if qid in ds.queries}, qrels


@dataclass
class ModelSpec:
    name: str
    path: str
    model_id: str | None = None


@dataclass
class RerankSpec:
    name: str  # e.g. "challenger+reranker"
    path: str  # CrossEncoder folder
    on: str  # the ModelSpec name whose ranking it reranks
    depth: int = 40
    max_length: int = 128


@dataclass
class Benchmark:
    per_query: dict[str, dict[str, pd.DataFrame]]  # model -> suite -> per-query metrics
    summaries: dict[str, dict[str, dict]] = field(default_factory=dict)  # suite -> model -> metrics
    rerank_ms: list[float] = field(default_factory=list)

    def summary(self, suite: str, model: str) -> dict:
        return self.summaries[suite][model]

    def long_form(self) -> pd.DataFrame:
        """One row per (model, suite, query): what the gate reads back."""
        frames = [
            df.assign(model=model, suite=suite)
            for model, suites in self.per_query.items() for suite, df in suites.items()
        ]
        if not frames:
            return pd.DataFrame(columns=["model", "suite", "query_id"])
        out = pd.concat(frames, ignore_index=True)
        cols = ["model", "suite", "query_id"] + [c for c in out.columns if c not in ("model", "suite", "query_id")]
        return out[cols]


def run_benchmark(
    models: list[ModelSpec],
    ds: BeirDataset,
    suites: Mapping[str, tuple],
    lancedb_uri: str | Path,
    *,
    rerankers: list[RerankSpec] = (),
    max_seq_length: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Benchmark:
    per_query: dict[str, dict[str, pd.DataFrame]] = {}
    rankings_of: dict[str, dict[str, dict[str, list[str]]]] = {}
    by_id: dict[str, str] = {}  # model id -> first spec name (the same model is embedded once)
    for spec in models:
        model_id = spec.model_id or index.model_fingerprint(spec.path)
        if model_id in by_id:
            rankings_of[spec.name] = rankings_of[by_id[model_id]]
        else:
            by_id[model_id] = spec.name
            model = index.load_embedder(spec.path, device=device, max_seq_length=max_seq_length)
            rankings_of[spec.name] = evaluation.rank_model_on(
                model, model_id, ds.corpus, lancedb_uri, suites, batch_size=batch_size, progress=progress
            )
        per_query[spec.name] = {
            suite: evaluation.evaluate_rankings(rankings_of[spec.name][suite], s[1], judged=_judged(s))
            for suite, s in suites.items()
        }
    bench = Benchmark(per_query=per_query)
    if rerankers:
        from flywheel.lib.reranker import load_reranker, rerank

        texts = ds.corpus.text_by_id
        for rspec in rerankers:
            ce = load_reranker(rspec.path, device=device, max_length=rspec.max_length)
            per_query[rspec.name] = {}
            for suite, s in suites.items():
                reranked, ms = rerank(ce, s[0], rankings_of[rspec.on][suite], texts, depth=rspec.depth,
                                      batch_size=batch_size, progress=progress)
                bench.rerank_ms.extend(ms)
                per_query[rspec.name][suite] = evaluation.evaluate_rankings(reranked, s[1], judged=_judged(s))
    for suite in suites:
        bench.summaries[suite] = {m: evaluation.summarize(per_query[m][suite]) for m in per_query}
    return bench


def _judged(suite: tuple) -> Mapping[str, set[str]] | None:
    """A suite is (queries, qrels) or (queries, qrels, judged pool) for condensed-list evaluation."""
    return suite[2] if len(suite) > 2 else None


def paired_delta(bench: Benchmark, suite: str, base: str, other: str, metric: str = "ndcg@10", seed: int = 0) -> dict:
    a = bench.per_query[base][suite].set_index("query_id")[metric]
    b = bench.per_query[other][suite].set_index("query_id")[metric].reindex(a.index)
    return evaluation.paired_bootstrap(a.to_numpy(), b.to_numpy(), seed=seed)


def p50(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def render_report(
    bench: Benchmark, models: list[str], *, title: str, decision: str, details: list[str] = (),
    pairs: list[tuple[str, str]] = (),
) -> str:
    """Markdown: the decision line first, then one table per suite (change = last column vs first)."""
    lines = [f"# {title}", "", f"**{decision}**", ""] + list(details) + [""]
    for suite in bench.summaries:
        present = [m for m in models if m in bench.summaries[suite]]
        results = {m: bench.summaries[suite][m] for m in present}
        n = results[present[0]]["queries"]
        lines += [f"## {suite} ({n} queries)", "", evaluation.comparison_table(results, REPORT_METRICS), ""]
        for a, b in pairs:
            if a in present and b in present:
                ci = paired_delta(bench, suite, a, b)
                lines.append(
                    f"- NDCG@10 {b} vs {a}: {ci['delta']:+.4f}, paired bootstrap 95% CI "
                    f"[{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]"
                )
        if len(present) > 1:
            a, b = present[0], present[-1]
            mv = evaluation.rank_movement(bench.per_query[a][suite], bench.per_query[b][suite])
            lines += [
                "",
                f"First relevant chunk, {a} -> {b} (rank, top 100; missing counts as 101): "
                f"median {mv['median_rank_before']:.0f} -> {mv['median_rank_after']:.0f}, "
                f"mean {mv['mean_rank_before']:.1f} -> {mv['mean_rank_after']:.1f}; "
                f"moved up for {mv['improved']} queries, down for {mv['worsened']}, unchanged {mv['unchanged']}; "
                f"in top 5: {mv['in_top5_before']} -> {mv['in_top5_after']}; "
                f"from below 10 into the top 5: {mv['moved_into_top5_from_below_10']}.",
            ]
        lines.append("")
    return "\n".join(lines)
