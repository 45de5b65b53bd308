"""benchmark_report: every candidate measured on pooled eval sets and the test split, and the
decision (per component: first stage, reranker) on its first line.

Wiring only: the work is ``flywheel.lib.evaluation.weekly.benchmark_week`` and
``flywheel.lib.evaluation.report.week_report``. The decision record it writes is what the
blocking check ``challenger_beats_champion`` and the ``champion`` asset read (defs/promotion.py).
"""

import json

import dagster as dg

from flywheel.defs import promotion
from flywheel.defs.labels import build_judge
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import (
    GateResource, JudgeResource, PathsResource, RerankerResource, TiersResource, TrainingResource, tracker_for,
)
from flywheel.layout import BENCHMARK_REPORT, EMBEDDER, EVAL_SET, RELEVANCE_LABELS, RERANKER, TRAINED_MODEL, TRAINED_RERANKER
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.evaluation import plots
from flywheel.lib.evaluation.report import week_report
from flywheel.lib.evaluation.weekly import TEST_SUITE, Candidates, benchmark_week
from flywheel.lib.registry.promotion import read_serving, serving_model
from flywheel.lib.registry.runs import read_run_info


@dg.asset(partitions_def=weekly_partitions, deps=[TRAINED_MODEL, TRAINED_RERANKER, EVAL_SET],
          group_name="report", kinds={"mlflow", "markdown"})
def benchmark_report(context: dg.AssetExecutionContext, paths: PathsResource, tiers: TiersResource,
                     judge: JudgeResource, training: TrainingResource, reranker: RerankerResource,
                     gate: GateResource) -> dg.MaterializeResult:
    """Base, champion, challenger and rerankers on every eval set to date (pooled) and on the
    held-out test split; the promotion decision, per component, first."""
    week, layout, p, g = context.partition_key, paths.layout(), paths.settings(), gate.settings()
    t = tracker_for(paths, gate)
    info, rinfo = read_run_info(layout, week, EMBEDDER), read_run_info(layout, week, RERANKER)
    champion_path, champion_label = serving_model(t, g.embedder_name, p.base_model)
    serving = read_serving(layout.serving_record)
    cand = Candidates(p.base_model, champion_path, champion_label, info, rinfo, serving.get("reranker"), serving.get("hybrid"))
    voters = [build_judge(judge, paths, tiers, vote=v) for v in range(tiers.settings().eval_votes)]
    wb = benchmark_week(layout, load_beir(p.dataset), week, cand, layout.lancedb, voters=voters,
                        training=training.settings(), rer=reranker.settings(), g=g, tiers=tiers.settings(),
                        progress=context.log.info)
    labels = store.read_table(layout.asset(RELEVANCE_LABELS, week))
    out = week_report(week, wb, cand, week_label_calls=int(labels[["query_key", "chunk_id"]].drop_duplicates().shape[0]))
    store.write_table(layout.per_query(week), wb.long)
    store.atomic_write_bytes(layout.decision(week), json.dumps(out.record, indent=2).encode())
    html = plots.markdown_to_html(out.report.markdown, f"flywheel benchmark, week {week}")
    store.atomic_write_bytes(layout.report(week), out.report.markdown.encode("utf-8"))
    store.atomic_write_bytes(layout.report(week, ".html"), html.encode("utf-8"))
    for name, png in out.report.figures.items():
        store.atomic_write_bytes(layout.report(week, f"-{name}"), png)
    for run_id in (info["mlflow_run_id"], rinfo["mlflow_run_id"]):
        t.log_metrics(run_id, out.metrics)
        t.log_text(run_id, out.report.markdown, "report/benchmark_report.md")
        t.log_files(run_id, {"benchmark_report.html": html.encode("utf-8"), **out.report.figures}, "report")
    return dg.MaterializeResult(metadata=_metadata(out, wb, layout, week, info))


def _metadata(out, wb, layout, week: str, info: dict) -> dict:
    headline = TEST_SUITE if TEST_SUITE in wb.bench.summaries else next(iter(wb.bench.summaries))
    nd = {m: wb.bench.summary(headline, m)["ndcg@10"] for m in wb.bench.per_query}
    reranked = nd.get(f"{wb.serving_retriever}+reranker", float("nan"))
    f = lambda v: dg.MetadataValue.float(float(v))  # noqa: E731
    return {
        "decision": out.decision,
        "promote": wb.first_stage.promote,
        "keyword_fusion_serves": wb.serving_hybrid or "no",
        "reranker_serves": wb.serving_reranker or "none",
        "champion_before": out.record["champion_label"],
        "report": dg.MetadataValue.md(out.report.markdown),
        "report_path": dg.MetadataValue.path(str(layout.report(week))),
        "report_html": dg.MetadataValue.path(str(layout.report(week, ".html"))),
        "per_query_path": dg.MetadataValue.path(str(layout.per_query(week))),
        "mlflow_run_id": info["mlflow_run_id"],
        "headline_suite": headline,
        "ndcg@10_base": f(nd["base"]),
        "ndcg@10_champion": f(nd["champion"]),
        "ndcg@10_trained": f(nd["challenger"]),
        "ndcg@10_reranked": f(reranked),
        "ndcg@10_serving_after": f(nd[wb.serving_name]),
        "relative_change_pct": f((nd["challenger"] - nd["base"]) / nd["base"] * 100 if nd["base"] else float("nan")),
        "eval_queries": wb.first_stage.queries,
        "min_detectable_change": f(wb.first_stage.vs_incumbent.mde),
        "pooled_pairs": wb.pool.pairs_added,
        "pooled_judge_requests": wb.pool.judge_requests,
        "rerank_ms_p50": f(out.metrics["rerank_ms_p50"]),
        "rerank_ms_p95": f(out.metrics["rerank_ms_p95"]),
    }


defs = dg.Definitions.merge(dg.Definitions(assets=[benchmark_report]), promotion.defs)
__all__ = ["benchmark_report", "defs", "TEST_SUITE", "BENCHMARK_REPORT"]
