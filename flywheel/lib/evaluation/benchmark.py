"""Base, champion, challenger and challenger + reranker, on the eval sets to date and on the
dataset's held-out test split.

Per-query results are kept (and written to a file by the report) so that the promotion gate
pairs and bootstraps exactly the numbers the report shows.

Candidates: dense first stages (``ModelSpec``, each at its inference ``precision``), keyword and
hybrid first stages (``HybridSpec``: BM25 alone, or BM25 fused with a dense stage's ranking; see
``flywheel.lib.registry.hybrid``), and rerankers over any first stage (``RerankSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from flywheel.config import RerankerSettings, default_of
import numpy as np
import pandas as pd

from flywheel.lib.evaluation import metrics as evaluation
from flywheel.lib.registry import index
from flywheel.lib.registry.inference import precision_of
from flywheel.lib.beir import BeirDataset

# model -> suite -> query id -> ranked ids, and the suites; returns the suites with judgments extended
Pool = Callable[[Mapping[str, Mapping[str, Mapping[str, list[str]]]], Mapping[str, tuple]], Mapping[str, tuple]]

REPORT_METRICS = ["ndcg@10", "recall@1", "recall@5", "recall@10", "recall@20", "recall@40", "mrr@10"]


def test_split_suite(ds: BeirDataset) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The human-labelled test split: queries, and per query its relevant chunks with their qrel
    levels as gains (a level of 0 is judged irrelevant), as BEIR scores them."""
    qrels = {qid: {d: s for d, s in docs.items() if s > 0} for qid, docs in ds.qrels.get("test", {}).items()}
    return {qid: ds.queries[qid] for qid in qrels if qid in ds.queries}, qrels


@dataclass
class ModelSpec:
    name: str
    path: str
    model_id: str | None = None
    precision: str = "fp32"  # of the corpus encoder, and of the query encoder unless query_precision says otherwise
    query_precision: str = "auto"  # see flywheel.lib.registry.inference.resolve_query_precision
    units: float = 0.0  # weight of each chunk's best sentence unit in its score (index.sentence_units); 0: chunks only


@dataclass
class RerankSpec:
    name: str  # e.g. "challenger+reranker"
    path: str  # CrossEncoder folder
    on: str  # the ModelSpec name whose ranking it reranks
    depth: int = default_of(RerankerSettings, "depth")
    max_length: int = default_of(RerankerSettings, "max_length")
    fusion: str = "rrf"  # see flywheel.lib.training.reranker.rerank
    fusion_weight: float = default_of(RerankerSettings, "fusion_weight")
    precision: str = "fp32"  # see flywheel.lib.registry.inference
    passages: str = "head"  # what it reads of each chunk, as it was trained (RerankerSettings.passages)


@dataclass
class HybridSpec:
    """A keyword first stage: BM25 alone (``on=None``), or BM25 fused with a ModelSpec's ranking."""

    name: str  # e.g. "bm25", "hybrid"
    on: str | None = None  # the ModelSpec name whose dense top 100 is fused with BM25's
    fusion: str = "zscore"  # see flywheel.lib.registry.hybrid.fuse
    bm25_weight: float = 0.5


@dataclass
class Benchmark:
    per_query: dict[str, dict[str, pd.DataFrame]]  # model -> suite -> per-query metrics
    summaries: dict[str, dict[str, dict]] = field(default_factory=dict)  # suite -> model -> metrics
    rerank_ms: list[float] = field(default_factory=list)
    # per model: retrieval ms per query (encode + LanceDB search), or for a reranker its rerank ms
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    queries: dict[str, dict[str, str]] = field(default_factory=dict)  # suite -> query id -> text
    suites: dict[str, tuple] = field(default_factory=dict)  # suite -> (queries, qrels[, judged pool])
    rankings: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict)  # model -> suite -> qid -> ids
    scores: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)  # first stages' scores
    stages: dict[str, str] = field(default_factory=dict)  # candidate -> what its latency times

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
    hybrids: list[HybridSpec] = (),
    max_seq_length: int = 256,
    batch_size: int = 64,
    device: str = "auto",
    latency_sample: int = 50,
    pool: Pool | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Benchmark:
    """Rank every first stage on every suite, rerank, and score (after ``pool`` has judged what
    the models retrieved that the suite's judgments lack; see ``flywheel.lib.evaluation.pooling``).
    ``cache_dir``: where OpenVINO networks are kept between processes (``Layout.openvino_cache``)."""
    bench = Benchmark(per_query={}, queries={name: dict(s[0]) for name, s in suites.items()}, suites=dict(suites))
    rank_first_stages(bench, models, ds, lancedb_uri, max_seq_length=max_seq_length, batch_size=batch_size,
                      device=device, latency_sample=latency_sample, cache_dir=cache_dir, progress=progress)
    if hybrids:
        rank_hybrids(bench, hybrids, ds, lancedb_uri, latency_sample=latency_sample, progress=progress)
    if rerankers:
        rerank_candidates(bench, rerankers, ds, batch_size=batch_size, device=device, cache_dir=cache_dir,
                          progress=progress)
    score(bench, [m.name for m in models] + [h.name for h in hybrids] + [r.name for r in rerankers], pool=pool)
    return bench


def rank_first_stages(bench: Benchmark, models: list[ModelSpec], ds: BeirDataset, lancedb_uri: str | Path, *,
                      max_seq_length: int = 256, batch_size: int = 64, device: str = "auto",
                      latency_sample: int = 50, cache_dir: str | Path | None = None,
                      progress: Callable[[str], None] | None = None) -> None:
    """Top-100 rankings (and bi-encoder scores) of each first stage on each suite; the same model
    under two names (the champion is the base before any promotion) is searched once."""
    by_id: dict[str, str] = {}
    timed_queries = [q for s in bench.suites.values() for q in s[0].values()]
    for spec in models:
        model_id = spec.model_id or index.model_fingerprint(spec.path)
        bench.stages[spec.name] = "retrieval (encode query + LanceDB search)"
        key = (model_id, spec.precision, spec.query_precision, spec.units)
        if key in by_id:
            first = by_id[key]
            bench.rankings[spec.name], bench.scores[spec.name] = bench.rankings[first], bench.scores[first]
            bench.latency_ms[spec.name] = bench.latency_ms[first]
            continue
        by_id[key] = spec.name
        model = index.load_embedder(spec.path, device=device, max_seq_length=max_seq_length, precision=spec.precision,
                                    query_precision=spec.query_precision, cache_dir=cache_dir)
        corpus_id = index.corpus_encoder_id(spec.path)  # a query-only fine-tune reads its base's table
        bench.scores[spec.name] = {}
        bench.rankings[spec.name] = evaluation.rank_model_on(
            model, corpus_id, ds.corpus, lancedb_uri, bench.suites, batch_size=batch_size, progress=progress,
            scores_out=bench.scores[spec.name], units=spec.units,
        )
        table = index.corpus_table_name(corpus_id, ds.corpus, model.max_seq_length, precision_of(model), spec.units)
        bench.latency_ms[spec.name] = evaluation.retrieval_latency_ms(
            model, timed_queries, lancedb_uri, table, sample=latency_sample
        )


def rerank_candidates(bench: Benchmark, rerankers: list[RerankSpec], ds: BeirDataset, *, batch_size: int = 64,
                      device: str = "auto", cache_dir: str | Path | None = None,
                      progress: Callable[[str], None] | None = None) -> None:
    """Each reranker over the top ``depth`` of the first stage it sits ``on``."""
    from flywheel.lib.training.reranker import load_reranker, rerank

    texts = ds.corpus.text_by_id
    for rspec in rerankers:
        ce = load_reranker(rspec.path, device=device, max_length=rspec.max_length, precision=rspec.precision,
                           cache_dir=cache_dir)
        bench.stages[rspec.name] = "rerank (cross-encoder)"
        bench.rankings[rspec.name] = {}
        for suite, s in bench.suites.items():
            reranked, ms = rerank(ce, s[0], bench.rankings[rspec.on][suite], texts, depth=rspec.depth,
                                  batch_size=batch_size, fusion=rspec.fusion, progress=progress,
                                  bi_scores=bench.scores[rspec.on][suite], fusion_weight=rspec.fusion_weight,
                                  passages=rspec.passages)
            bench.rankings[rspec.name][suite] = reranked
            bench.rerank_ms.extend(ms)
            bench.latency_ms.setdefault(rspec.name, []).extend(ms)


def rank_hybrids(bench: Benchmark, specs: list[HybridSpec], ds: BeirDataset, lancedb_uri: str | Path, *,
                 latency_sample: int = 50, progress: Callable[[str], None] | None = None) -> None:
    """BM25 (LanceDB's full-text index) alone, or fused per query with a dense first stage's top
    100 (its scores are in ``bench.scores``). A hybrid's latency is its dense stage's plus BM25's,
    timed on the same queries."""
    from flywheel.lib.registry import hybrid

    table = hybrid.ensure_bm25_table(lancedb_uri, ds.corpus, progress=progress)
    depth = evaluation.SEARCH_DEPTH
    lexical = {suite: dict(zip(s[0], hybrid.bm25_search(lancedb_uri, table, list(s[0].values()), depth)))
               for suite, s in bench.suites.items()}
    timed = [q for s in bench.suites.values() for q in s[0].values()][:latency_sample]
    bm25_ms = hybrid.bm25_latency_ms(lancedb_uri, table, timed, depth)
    for spec in specs:
        fused = {}
        for suite in bench.suites:
            if spec.on is None:
                fused[suite] = lexical[suite]
                continue
            ranks, scores = bench.rankings[spec.on][suite], bench.scores[spec.on][suite]
            dense = {qid: list(zip(ranks[qid], scores[qid])) for qid in ranks}
            fused[suite] = hybrid.fuse_all(dense, lexical[suite], fusion=spec.fusion, bm25_weight=spec.bm25_weight,
                                           k=depth)
        bench.rankings[spec.name] = {s: {q: [d for d, _ in h] for q, h in f.items()} for s, f in fused.items()}
        bench.scores[spec.name] = {s: {q: [v for _, v in h] for q, h in f.items()} for s, f in fused.items()}
        if spec.on is None:
            bench.latency_ms[spec.name] = bm25_ms
            bench.stages[spec.name] = "retrieval (BM25 search)"
        else:
            bench.latency_ms[spec.name] = [a + b for a, b in zip(bench.latency_ms[spec.on], bm25_ms)]
            bench.stages[spec.name] = "retrieval (encode query + LanceDB search + BM25 search)"


def score(bench: Benchmark, names: list[str], *, pool: Pool | None = None) -> None:
    """Per-query metrics of the named candidates; ``pool`` first extends each suite's judgments."""
    if pool is not None:
        bench.suites = dict(pool({n: bench.rankings[n] for n in names}, bench.suites))
    for name in names:
        bench.per_query[name] = {
            suite: evaluation.evaluate_rankings(bench.rankings[name][suite], s[1], judged=_judged(s))
            for suite, s in bench.suites.items()
        }
    for suite in bench.suites:
        bench.summaries[suite] = {m: evaluation.summarize(bench.per_query[m][suite]) for m in bench.per_query}


def _judged(suite: tuple) -> Mapping[str, set[str]] | None:
    """A suite is (queries, qrels) or (queries, qrels, judged pool) for condensed-list evaluation."""
    return suite[2] if len(suite) > 2 else None


def paired_delta(bench: Benchmark, suite: str, base: str, other: str, metric: str = "ndcg@10", seed: int = 0) -> dict:
    a = bench.per_query[base][suite].set_index("query_id")[metric]
    b = bench.per_query[other][suite].set_index("query_id")[metric].reindex(a.index)
    return evaluation.paired_bootstrap(a.to_numpy(), b.to_numpy(), seed=seed)


def p50(values) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def p95(values) -> float:
    return float(np.percentile(values, 95)) if len(values) else float("nan")


def wins_losses(bench: Benchmark, suite: str, a: str, b: str, metric: str = "ndcg@10", tol: float = 1e-9) -> dict:
    """Per query: how many queries ``b`` does better than ``a`` on, worse on, and the same."""
    x = bench.per_query[a][suite].set_index("query_id")[metric]
    y = bench.per_query[b][suite].set_index("query_id")[metric].reindex(x.index)
    d = (y - x).to_numpy()
    return {"wins": int((d > tol).sum()), "losses": int((d < -tol).sum()), "ties": int((np.abs(d) <= tol).sum())}


@dataclass
class Report:
    markdown: str  # self-contained: the figures are embedded as data URIs
    figures: dict[str, bytes]  # file name -> PNG, for MLflow and a reports folder


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _biggest_moves(bench: Benchmark, suite: str, a: str, b: str, n: int = 3) -> list[str]:
    """The queries that gained and lost the most NDCG@10 from ``a`` to ``b``, with their text."""
    x = bench.per_query[a][suite].set_index("query_id")
    y = bench.per_query[b][suite].set_index("query_id").reindex(x.index)
    d = (y["ndcg@10"] - x["ndcg@10"]).sort_values()
    texts = bench.queries.get(suite, {})

    def row(qid: str) -> str:
        q = texts.get(qid, qid).replace("|", "/")
        q = q if len(q) <= 90 else q[:87] + "..."
        rank = lambda v: "-" if v != v else f"{v:.0f}"  # noqa: E731 (NaN: not in the top 100)
        return (f"| {q} | {x.at[qid, 'ndcg@10']:.3f} -> {y.at[qid, 'ndcg@10']:.3f} | "
                f"{rank(x.at[qid, 'first_relevant_rank'])} -> {rank(y.at[qid, 'first_relevant_rank'])} |")

    wins = [q for q in d.index[::-1][:n] if d[q] > 1e-9]
    losses = [q for q in d.index[:n] if d[q] < -1e-9]
    if not wins and not losses:
        return []
    lines = [f"| query ({a} -> {b}) | NDCG@10 | first relevant rank |", "|---|---|---|"]
    lines += [row(q) for q in wins] + [row(q) for q in losses]
    return lines


def _paired_comparison_lines(
    bench: Benchmark, suite: str, present: list[str], pairs: list[tuple[str, str]],
) -> list[str]:
    """The paired-comparisons table of one suite (empty when no pair has both models present)."""
    rows = []
    for a, b in pairs:
        if a in present and b in present:
            nd, rc = paired_delta(bench, suite, a, b), paired_delta(bench, suite, a, b, metric="recall@10")
            wl = wins_losses(bench, suite, a, b)
            rows.append(f"| {b} vs {a} | {nd['delta']:+.4f} [{nd['ci_low']:+.4f}, {nd['ci_high']:+.4f}] | "
                        f"{rc['delta']:+.4f} [{rc['ci_low']:+.4f}, {rc['ci_high']:+.4f}] | "
                        f"{wl['wins']} / {wl['losses']} / {wl['ties']} |")
    if not rows:
        return []
    return ["Paired comparisons (95% CI from a paired bootstrap over queries; wins / losses / ties "
            "count queries by NDCG@10):", "",
            "| comparison | NDCG@10 change [95% CI] | Recall@10 change [95% CI] | wins / losses / ties |",
            "|---|---|---|---|", *rows, ""]


def _rank_movement_lines(
    bench: Benchmark, suite: str, present: list[str], pairs: list[tuple[str, str]],
) -> list[str]:
    """Where the first relevant chunk moved from the first to the last model, and the largest
    per-query wins and losses (empty with fewer than two models)."""
    if len(present) <= 1:
        return []
    a, b = present[0], present[-1]
    mv = evaluation.rank_movement(bench.per_query[a][suite], bench.per_query[b][suite])
    lines = [
        f"First relevant chunk, {a} -> {b} (rank, top 100; missing counts as 101): "
        f"median {mv['median_rank_before']:.0f} -> {mv['median_rank_after']:.0f}, "
        f"mean {mv['mean_rank_before']:.1f} -> {mv['mean_rank_after']:.1f}; "
        f"moved up for {mv['improved']} queries, down for {mv['worsened']}, unchanged {mv['unchanged']}; "
        f"in top 5: {mv['in_top5_before']} -> {mv['in_top5_after']}; "
        f"from below 10 into the top 5: {mv['moved_into_top5_from_below_10']}.",
        "",
    ]
    moves = _biggest_moves(bench, suite, pairs[0][0] if pairs and pairs[0][0] in present else a,
                           pairs[0][1] if pairs and pairs[0][1] in present else b)
    if moves:
        lines += ["Largest per-query wins and losses:", "", *moves, ""]
    return lines


def _suite_plot_lines(
    bench: Benchmark, suite: str, present: list[str], results: dict, figures: dict[str, bytes],
) -> list[str]:
    """Render the suite's two plots into ``figures`` and return their embedded markdown images."""
    from flywheel.lib.evaluation import plots

    rank_png = plots.rank_distribution_plot(
        {m: bench.per_query[m][suite]["first_relevant_rank"].tolist() for m in present},
        f"{suite}: rank of the first relevant chunk",
    )
    ks = [k for k in evaluation.RECALL_KS if f"recall@{k}" in results[present[0]]]
    curve_png = plots.recall_curve_plot(
        {m: {k: results[m][f"recall@{k}"] for k in ks} for m in present}, f"{suite}: Recall@k",
    )
    figures[f"{_slug(suite)}-first-relevant-rank.png"] = rank_png
    figures[f"{_slug(suite)}-recall-at-k.png"] = curve_png
    return [plots.markdown_image(rank_png, f"{suite}: rank of the first relevant chunk"), "",
            plots.markdown_image(curve_png, f"{suite}: Recall@k"), ""]


def _latency_lines(bench: Benchmark, models: list[str]) -> list[str]:
    """The latency table (empty when no model was timed)."""
    timed = [m for m in models if bench.latency_ms.get(m)]
    if not timed:
        return []
    lines = ["## Latency per query (this machine)", "",
             "| model | stage | p50 ms | p95 ms | queries timed |", "|---|---|---|---|---|"]
    for m in timed:
        v = bench.latency_ms[m]
        stage = bench.stages.get(m) or ("rerank (cross-encoder)" if "+" in m else "retrieval (encode query + LanceDB search)")
        lines.append(f"| {m} | {stage} | {p50(v):.1f} | {p95(v):.1f} | {len(v)} |")
    lines.append("")
    return lines


def build_report(
    bench: Benchmark, models: list[str], *, title: str, decision: str, details: list[str] = (),
    pairs: list[tuple[str, str]] = (),
) -> Report:
    """Markdown with the decision line first; per suite a metrics table, paired comparisons with
    bootstrap CIs and per-query wins/losses, where the first relevant chunk landed (plot) and
    Recall@k curves (plot); then latency. Figures are also returned as PNG files."""
    figures: dict[str, bytes] = {}
    lines = [f"# {title}", "", f"**{decision}**", ""] + list(details) + [""]
    for suite in bench.summaries:
        present = [m for m in models if m in bench.summaries[suite]]
        results = {m: bench.summaries[suite][m] for m in present}
        n = results[present[0]]["queries"]
        lines += [f"## {suite} ({n} queries)", "", evaluation.comparison_table(results, REPORT_METRICS), ""]
        lines += _paired_comparison_lines(bench, suite, present, pairs)
        lines += _rank_movement_lines(bench, suite, present, pairs)
        lines += _suite_plot_lines(bench, suite, present, results, figures)
    lines += _latency_lines(bench, models)
    return Report(markdown="\n".join(lines), figures=figures)

