"""Base vs trained model, on the eval sets to date and on the dataset's held-out test split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

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
class Benchmark:
    per_query: dict[str, dict[str, pd.DataFrame]]  # model -> suite -> per-query metrics
    summaries: dict[str, dict[str, dict]] = field(default_factory=dict)  # suite -> model -> metrics

    def summary(self, suite: str, model: str) -> dict:
        return self.summaries[suite][model]


def run_benchmark(
    models: list[ModelSpec],
    ds: BeirDataset,
    suites: Mapping[str, tuple[Mapping[str, str], Mapping[str, set[str]]]],
    lancedb_uri: str | Path,
    *,
    max_seq_length: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Benchmark:
    per_query: dict[str, dict[str, pd.DataFrame]] = {}
    for spec in models:
        model = index.load_embedder(spec.path, device=device, max_seq_length=max_seq_length)
        model_id = spec.model_id or index.model_fingerprint(spec.path)
        per_query[spec.name] = evaluation.evaluate_model_on(
            model, model_id, ds.corpus, lancedb_uri, suites, batch_size=batch_size, progress=progress
        )
    bench = Benchmark(per_query=per_query)
    for suite in suites:
        bench.summaries[suite] = {m: evaluation.summarize(per_query[m][suite]) for m in per_query}
    return bench


def paired_delta(bench: Benchmark, suite: str, base: str, other: str, metric: str = "ndcg@10", seed: int = 0) -> dict:
    a = bench.per_query[base][suite].set_index("query_id")[metric]
    b = bench.per_query[other][suite].set_index("query_id")[metric].reindex(a.index)
    return evaluation.paired_bootstrap(a.to_numpy(), b.to_numpy(), seed=seed)


def render_report(bench: Benchmark, base: str, trained: str, *, title: str, decision: str) -> str:
    lines = [f"# {title}", "", f"**{decision}**", ""]
    for suite in bench.summaries:
        results = {m: bench.summaries[suite][m] for m in (base, trained)}
        n = results[base]["queries"]
        lines += [f"## {suite} ({n} queries)", "", evaluation.comparison_table(results, REPORT_METRICS), ""]
        ci = paired_delta(bench, suite, base, trained)
        lines.append(
            f"NDCG@10 change {ci['delta']:+.4f}, paired bootstrap 95% CI [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]"
        )
        mv = evaluation.rank_movement(bench.per_query[base][suite], bench.per_query[trained][suite])
        lines += [
            "",
            "First relevant chunk (rank, top 100; missing counts as 101): "
            f"median {mv['median_rank_before']:.0f} -> {mv['median_rank_after']:.0f}, "
            f"mean {mv['mean_rank_before']:.1f} -> {mv['mean_rank_after']:.1f}; "
            f"moved up for {mv['improved']} queries, down for {mv['worsened']}, unchanged {mv['unchanged']}; "
            f"in top 5: {mv['in_top5_before']} -> {mv['in_top5_after']}; "
            f"from below 10 into the top 5: {mv['moved_into_top5_from_below_10']}.",
            "",
        ]
    return "\n".join(lines)
