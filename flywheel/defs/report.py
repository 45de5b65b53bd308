"""benchmark_report: did this week's model beat the base? Measured, in numbers."""


import dagster as dg

from flywheel.defs.datasets import eval_sets_to_date
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import FlywheelPaths, MlflowResource, TrainingResource, VectorStoreResource
from flywheel.defs.training import run_info, tracker
from flywheel.lib import evaluation, store
from flywheel.lib.benchmark import ModelSpec, paired_delta, render_report, run_benchmark, test_split_suite
from flywheel.lib.beir import load_beir


@dg.asset(
    partitions_def=weekly_partitions,
    deps=["trained_model", "eval_set"],
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
    """Base vs trained on every eval set to date and on the held-out test split (human labels)."""
    week = context.partition_key
    info = run_info(paths, week)
    ds = load_beir(paths.dataset_dir)
    evals, eval_weeks = eval_sets_to_date(paths, week)
    suites = {f"eval sets to date ({len(eval_weeks)} weeks, judged labels)": evaluation.eval_sets_to_qrels(evals)}
    if ds.has_test_split:
        suites["test split (human labels)"] = test_split_suite(ds)
    bench = run_benchmark(
        [ModelSpec("base", training.base_model), ModelSpec("trained", info["model_dir"], info["model_id"])],
        ds, suites, vector_store.uri,
        max_seq_length=training.encode_max_seq_length, batch_size=training.encode_batch_size,
        device=training.device, progress=context.log.info,
    )
    headline = list(suites)[-1]
    base, trained = (bench.summary(headline, m)["ndcg@10"] for m in ("base", "trained"))
    ci = paired_delta(bench, headline, "base", "trained")
    verdict = "better" if ci["ci_low"] > 0 else ("worse" if ci["ci_high"] < 0 else "not distinguishable")
    decision = (
        f"Week {week}: the trained model is {verdict} than the base on the {headline}: "
        f"NDCG@10 {base:.4f} -> {trained:.4f} ({(trained - base) / base * 100:+.1f}%), "
        f"95% CI of the change [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]."
    )
    report = render_report(bench, "base", "trained", title=f"flywheel benchmark, week {week}", decision=decision)
    report_path = paths.settings().reports_dir / f"benchmark-{week}.md"
    store.atomic_write_bytes(report_path, report.encode("utf-8"))

    t = tracker(mlflow)
    metrics = {}
    for suite_name, key in zip(suites, ("eval", "test")):
        for model in ("base", "trained"):
            for m, v in bench.summary(suite_name, model).items():
                if m != "queries":
                    metrics[f"{key}_{model}_{m}"] = v
    t.log_metrics(info["mlflow_run_id"], metrics)
    t.log_text(info["mlflow_run_id"], report, "benchmark_report.md")
    return dg.MaterializeResult(metadata={
        "decision": decision,
        "report": dg.MetadataValue.md(report),
        "report_path": dg.MetadataValue.path(str(report_path)),
        "mlflow_run_id": info["mlflow_run_id"],
        "ndcg@10_base": dg.MetadataValue.float(base),
        "ndcg@10_trained": dg.MetadataValue.float(trained),
        "relative_change_pct": dg.MetadataValue.float((trained - base) / base * 100),
    })


defs = dg.Definitions(assets=[benchmark_report])
