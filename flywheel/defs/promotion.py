"""The gate and the promotion: ``challenger_beats_champion`` (blocking check on benchmark_report)
and the ``champion`` asset, which moves the registry aliases and builds the ``serving`` table."""


import json
from pathlib import Path

import dagster as dg

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import FlywheelPaths, MlflowResource, TrainingResource, VectorStoreResource
from flywheel.defs.training import run_info, tracker
from flywheel.lib.evaluation import metrics as evaluation
from flywheel.lib.registry import index
from flywheel.lib import store
from flywheel.lib.registry.promotion import CHAMPION, gate_decision, promote

SERVING_TABLE = "serving"
EVAL_SUITE = "eval sets to date"
TEST_SUITE = "test split (human labels)"


def per_query_path(paths: FlywheelPaths, week: str) -> Path:
    """Per-query results benchmark_report computed (long form: model, suite, query_id, metrics)."""
    return paths.settings().reports_dir / f"benchmark-{week}-per-query.parquet"


def decision_path(paths: FlywheelPaths, week: str) -> Path:
    return paths.settings().reports_dir / f"benchmark-{week}-decision.json"


@dg.asset_check(asset="benchmark_report", blocking=True, partitions_def=weekly_partitions)
def challenger_beats_champion(context: dg.AssetCheckExecutionContext, paths: FlywheelPaths) -> dg.AssetCheckResult:
    """Paired bootstrap on every eval set to date: promote only when the 95% CI of the challenger's
    NDCG@10 change excludes a regression larger than the margin, vs the champion and vs the base."""
    week = context.partition_key
    pq, dp = per_query_path(paths, week), decision_path(paths, week)
    if not pq.exists() or not dp.exists():
        return dg.AssetCheckResult(passed=False, description=f"{pq.name} missing: materialize benchmark_report first")
    recorded = json.loads(dp.read_text())
    gate = gate_decision(store.read_table(pq), EVAL_SUITE, margin=paths.regression_margin,
                         champion_label=recorded["champion_label"])
    return dg.AssetCheckResult(
        passed=gate.promote,
        metadata={
            "champion": gate.champion_label,
            "challenger_version": recorded["challenger_version"],
            "ndcg@10_challenger": gate.challenger_ndcg,
            "ndcg@10_champion": gate.champion_ndcg,
            "ndcg@10_base": gate.base_ndcg,
            "delta_vs_champion": gate.vs_champion.get("delta", float("nan")),
            "ci_low_vs_champion": gate.vs_champion.get("ci_low", float("nan")),
            "ci_high_vs_champion": gate.vs_champion.get("ci_high", float("nan")),
            "ci_low_vs_base": gate.vs_base.get("ci_low", float("nan")),
            "eval_queries": gate.queries,
            "margin": gate.margin,
        },
        description=gate.reason,
    )


@dg.asset(
    partitions_def=weekly_partitions,
    deps=["benchmark_report"],
    group_name="report",
    kinds={"mlflow", "lancedb"},
)
def champion(
    context: dg.AssetExecutionContext,
    paths: FlywheelPaths,
    training: TrainingResource,
    mlflow: MlflowResource,
    vector_store: VectorStoreResource,
) -> dg.MaterializeResult:
    """Promotion: the challenger becomes ``champion`` (the one it replaces stays as
    ``previous-champion``), and the ``serving`` LanceDB table holds its corpus embeddings.

    Runs only when ``challenger_beats_champion`` passed. The reranker is promoted with it when it
    does not make the challenger's eval-set ranking worse (same bootstrap and margin).
    """
    week = context.partition_key
    info = run_info(paths, week, "embedder")
    rinfo = run_info(paths, week, "reranker")
    t = tracker(mlflow)
    moved = promote(t, mlflow.embedder_name, info["version"])

    long = store.read_table(per_query_path(paths, week))
    rows = long[long["suite"] == EVAL_SUITE]
    a = rows[rows["model"] == "challenger"].set_index("query_id")["ndcg@10"]
    b = rows[rows["model"] == "challenger+reranker"].set_index("query_id")["ndcg@10"].reindex(a.index)
    rerank_ci = evaluation.paired_bootstrap(a.to_numpy(), b.to_numpy())
    reranker_promoted = bool(rerank_ci["ci_low"] > -paths.regression_margin)
    reranker_moved = promote(t, mlflow.reranker_name, rinfo["version"]) if reranker_promoted else None

    index.write_named_table(vector_store.uri, SERVING_TABLE, info["lancedb_table"])
    return dg.MaterializeResult(metadata={
        "serving_embedder": f"{mlflow.embedder_name} v{info['version']} (@{CHAMPION})",
        "serving_version": info["version"],
        "previous_champion": moved["previous_champion"] or "base",
        "serving_table": SERVING_TABLE,
        "copied_from_table": info["lancedb_table"],
        "model_dir": dg.MetadataValue.path(info["model_dir"]),
        "reranker": (f"{mlflow.reranker_name} v{rinfo['version']} (@{CHAMPION})" if reranker_promoted
                     else f"{mlflow.reranker_name} v{rinfo['version']} not promoted: reranking lowered eval NDCG@10 "
                          f"(CI low {rerank_ci['ci_low']:+.4f})"),
        "reranker_previous_champion": (reranker_moved or {}).get("previous_champion") or "none",
        "reranker_ci_low_vs_embedder": dg.MetadataValue.float(rerank_ci["ci_low"]),
    })


defs = dg.Definitions(assets=[champion], asset_checks=[challenger_beats_champion])
