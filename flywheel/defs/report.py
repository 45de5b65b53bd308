"""benchmark_report: base, champion, challenger and challenger + reranker, measured; and the
decision (promoted or not, and why) on its first line.

The per-query results it computes are written next to the report so that the blocking check
``challenger_beats_champion`` (flywheel/defs/promotion.py) decides from exactly these numbers.
"""


import json

import dagster as dg

from flywheel.defs.datasets import eval_sets_to_date
from flywheel.defs import promotion
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.promotion import EVAL_SUITE, TEST_SUITE, decision_path, per_query_path
from flywheel.defs.resources import FlywheelPaths, MlflowResource, TrainingResource, VectorStoreResource
from flywheel.defs.training import run_info, tracker
from flywheel.lib.evaluation import metrics as evaluation
from flywheel.lib import store
from flywheel.lib.evaluation import plots
from flywheel.lib.evaluation.benchmark import ModelSpec, RerankSpec, build_report, p50, p95, run_benchmark, test_split_suite
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.tiers import votes_description
from flywheel.lib.registry.promotion import gate_decision, serving_model


@dg.asset(
    partitions_def=weekly_partitions,
    deps=["trained_model", "trained_reranker", "eval_set"],
    group_name="report",
    kinds={"mlflow", "markdown"},
)
def benchmark_report(
    context: dg.AssetExecutionContext,
    paths: FlywheelPaths,
    training: TrainingResource,
    mlflow: MlflowResource,
    vector_store: VectorStoreResource,
) -> dg.MaterializeResult:
    """Base, champion, challenger and challenger+reranker on every eval set to date and on the
    held-out test split (human labels); the promotion decision first."""
    week = context.partition_key
    info = run_info(paths, week, "embedder")
    rinfo = run_info(paths, week, "reranker")
    t = tracker(mlflow)
    champion_path, champion_label = serving_model(t, mlflow.embedder_name, training.base_model)
    ds = load_beir(paths.dataset_dir)
    evals, eval_weeks = eval_sets_to_date(paths, week)
    # eval sets are judged on what the serving model retrieved: condensed lists (unjudged skipped)
    suites = {EVAL_SUITE: (*evaluation.eval_sets_to_qrels(evals), evaluation.eval_sets_judged(evals))}
    if ds.has_test_split:
        suites[TEST_SUITE] = test_split_suite(ds)
    bench = run_benchmark(
        [
            ModelSpec("base", training.base_model),
            ModelSpec("champion", champion_path),
            ModelSpec("challenger", info["model_dir"], info["model_id"]),
        ],
        ds, suites, vector_store.uri,
        rerankers=[RerankSpec("challenger+reranker", rinfo["model_dir"], on="challenger",
                              depth=rinfo.get("rerank_depth", training.rerank_depth),
                              max_length=rinfo.get("max_length", training.reranker_max_length),
                              fusion=rinfo.get("fusion", "none"),
                              fusion_weight=rinfo.get("fusion_weight", 0.5))],
        max_seq_length=training.encode_max_seq_length, batch_size=training.encode_batch_size,
        device=training.device, progress=context.log.info,
    )
    long = bench.long_form()
    store.write_table(per_query_path(paths, week), long)
    gate = gate_decision(long, EVAL_SUITE, margin=paths.regression_margin, champion_label=champion_label)
    challenger = f"challenger v{info['version']}"
    decision = (
        f"Week {week}: PROMOTE {challenger} to champion (replacing {champion_label}). {gate.reason}."
        if gate.promote else
        f"Week {week}: NOT PROMOTED: {challenger} stays a challenger, {champion_label} keeps serving. {gate.reason}."
    )
    decision_record = {"week": week, "champion_label": champion_label, "champion_path": champion_path,
                       "challenger_version": info["version"], **gate.as_dict()}
    store.atomic_write_bytes(decision_path(paths, week), json.dumps(decision_record, indent=2).encode())

    models = ["base"] + (["champion"] if champion_label != "base" else []) + ["challenger", "challenger+reranker"]
    details = [
        f"Eval sets: {len(eval_weeks)} weeks, judged labels ({votes_description(evals)}), condensed lists (chunks nobody judged are "
        f"skipped, not counted as misses: the judged pool is what the serving model retrieved). Champion: {champion_label}. "
        f"Gate margin: {paths.regression_margin} NDCG@10. Reranker: {mlflow.reranker_name} v{rinfo['version']} "
        f"on the challenger's top {rinfo.get('rerank_depth', training.rerank_depth)} "
        f"(median {p50(bench.rerank_ms):.0f} ms per query).",
    ]
    pairs = [("champion", "challenger"), ("base", "challenger"), ("challenger", "challenger+reranker"),
             ("champion", "challenger+reranker")]
    report = build_report(bench, models, title=f"flywheel benchmark, week {week}", decision=decision,
                          details=details, pairs=pairs)
    # the same report three ways: Markdown (self-contained), a standalone HTML page, and the PNGs
    reports_dir = paths.settings().reports_dir
    report_path = reports_dir / f"benchmark-{week}.md"
    html_path = reports_dir / f"benchmark-{week}.html"
    html = plots.markdown_to_html(report.markdown, f"flywheel benchmark, week {week}")
    store.atomic_write_bytes(report_path, report.markdown.encode("utf-8"))
    store.atomic_write_bytes(html_path, html.encode("utf-8"))
    for name, png in report.figures.items():
        store.atomic_write_bytes(reports_dir / f"benchmark-{week}-{name}", png)

    metrics = {}
    for suite_name, key in ((EVAL_SUITE, "eval"), (TEST_SUITE, "test")):
        if suite_name not in bench.summaries:
            continue
        for model in ("base", "champion", "challenger", "challenger+reranker"):
            label = {"challenger": "trained", "challenger+reranker": "reranked"}.get(model, model)
            for m, v in bench.summary(suite_name, model).items():
                if m != "queries":
                    metrics[f"{key}_{label}_{m}"] = v
    metrics["rerank_ms_p50"] = p50(bench.rerank_ms)
    metrics["rerank_ms_p95"] = p95(bench.rerank_ms)
    for model, ms in bench.latency_ms.items():
        if model not in ("challenger+reranker",):
            metrics[f"retrieval_ms_p50_{model}"] = p50(ms)
            metrics[f"retrieval_ms_p95_{model}"] = p95(ms)
    metrics["gate_promote"] = float(gate.promote)
    metrics["gate_ci_low_vs_champion"] = gate.vs_champion.get("ci_low", float("nan"))
    for run_id in (info["mlflow_run_id"], rinfo["mlflow_run_id"]):
        t.log_metrics(run_id, metrics)
        t.log_text(run_id, report.markdown, "report/benchmark_report.md")
        t.log_files(run_id, {"benchmark_report.html": html.encode("utf-8"), **report.figures}, "report")

    headline = TEST_SUITE if TEST_SUITE in bench.summaries else EVAL_SUITE
    s = {m: bench.summary(headline, m)["ndcg@10"] for m in ("base", "challenger", "challenger+reranker")}
    return dg.MaterializeResult(metadata={
        "decision": decision,
        "promote": gate.promote,
        "champion_before": champion_label,
        "report": dg.MetadataValue.md(report.markdown),
        "report_path": dg.MetadataValue.path(str(report_path)),
        "report_html": dg.MetadataValue.path(str(html_path)),
        "per_query_path": dg.MetadataValue.path(str(per_query_path(paths, week))),
        "mlflow_run_id": info["mlflow_run_id"],
        "ndcg@10_base": dg.MetadataValue.float(s["base"]),
        "ndcg@10_trained": dg.MetadataValue.float(s["challenger"]),
        "ndcg@10_reranked": dg.MetadataValue.float(s["challenger+reranker"]),
        "relative_change_pct": dg.MetadataValue.float((s["challenger"] - s["base"]) / s["base"] * 100 if s["base"] else float("nan")),
        "rerank_ms_p50": dg.MetadataValue.float(p50(bench.rerank_ms)),
        "rerank_ms_p95": dg.MetadataValue.float(p95(bench.rerank_ms)),
        "retrieval_ms_p50_challenger": dg.MetadataValue.float(p50(bench.latency_ms.get("challenger", []))),
    })


# the gate and the promotion live in flywheel/defs/promotion.py and load with the report
defs = dg.Definitions.merge(dg.Definitions(assets=[benchmark_report]), promotion.defs)
