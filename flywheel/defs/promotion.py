"""The gate and the promotion: ``challenger_beats_champion`` (blocking check on benchmark_report)
and the ``champion`` asset, which carries out the week's decisions component by component.

Wiring only: the rule is ``flywheel.lib.evaluation.gate``; the moves are
``flywheel.lib.registry.promotion.promote_week``.
"""

import json

import dagster as dg

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import GateResource, PathsResource, tracker_for
from flywheel.layout import BENCHMARK_REPORT, EMBEDDER, RERANKER, SERVING_TABLE
from flywheel.lib.registry import index
from flywheel.lib.registry.promotion import changes, promote_week, read_serving
from flywheel.lib.registry.runs import read_run_info


@dg.asset_check(asset=BENCHMARK_REPORT, blocking=True, partitions_def=weekly_partitions)
def challenger_beats_champion(context: dg.AssetCheckExecutionContext, paths: PathsResource) -> dg.AssetCheckResult:
    """Passes when some component beats what serves now on the pooled eval sets (the rule in
    flywheel/lib/evaluation/gate.py); fails, and so stops the promotion, when nothing does."""
    layout, week = paths.layout(), context.partition_key
    path = layout.decision(week)
    if not path.exists():
        return dg.AssetCheckResult(passed=False, description=f"{path.name} missing: materialize benchmark_report first")
    record = json.loads(path.read_text())
    moves = changes(record, read_serving(layout.serving_record))
    first = record["first_stage"]
    return dg.AssetCheckResult(
        passed=bool(moves),
        metadata={
            "changes": ", ".join(moves) or "none",
            "champion": record["champion_label"],
            "challenger_version": record["challenger_version"],
            "delta_vs_champion": dg.MetadataValue.float(float(first["vs_incumbent"]["delta"])),
            "ci_low_vs_champion": dg.MetadataValue.float(float(first["vs_incumbent"]["ci_low"])),
            "ci_high_vs_champion": dg.MetadataValue.float(float(first["vs_incumbent"]["ci_high"])),
            "min_detectable_change": dg.MetadataValue.float(float(record["min_detectable_change"])),
            "eval_queries": record["eval_queries"],
            "margin": first["margin"],
            "keyword_fusion": (record.get("hybrid") or {}).get("reason", "off"),
            "reranker": (record["reranker"] or {}).get("reason", "no reranker beats its first stage alone"),
        },
        description=first["reason"] if not moves or record["promote"] else "; ".join(moves),
    )


@dg.asset(partitions_def=weekly_partitions, deps=[BENCHMARK_REPORT], group_name="report", kinds={"mlflow", "lancedb"})
def champion(context: dg.AssetExecutionContext, paths: PathsResource, gate: GateResource) -> dg.MaterializeResult:
    """The week's decisions carried out: the first stage and the reranker each move their registry
    alias ``champion`` when they passed (the replaced one keeps ``previous-champion``), the
    ``serving`` LanceDB table follows the first stage, and serving.json records the pipeline.

    Runs only when ``challenger_beats_champion`` passed."""
    layout, week, g = paths.layout(), context.partition_key, gate.settings()
    record = json.loads(layout.decision(week).read_text())
    info, rinfo = read_run_info(layout, week, EMBEDDER), read_run_info(layout, week, RERANKER)
    moved = promote_week(
        tracker_for(paths, gate), record, info, rinfo, layout.serving_record,
        embedder_name=g.embedder_name, reranker_name=g.reranker_name,
        write_serving_table=lambda table: index.write_named_table(layout.lancedb, SERVING_TABLE, table),
    )
    serving = moved["serving"]
    return dg.MaterializeResult(metadata={
        "serving_embedder": f"{g.embedder_name} v{serving['embedder']['version']}" if serving["embedder"] else "base",
        "serving_version": serving["embedder"]["version"] if serving["embedder"] else "base",
        "serving_keyword_fusion": (f"BM25 {serving['hybrid']['fusion']}, weight {serving['hybrid']['bm25_weight']}"
                                   if serving.get("hybrid") else "off"),
        "serving_reranker": f"{g.reranker_name} v{serving['reranker']['version']}" if serving["reranker"] else "none",
        "previous_champion": ((moved["embedder"] or {}).get("previous_champion")) or "unchanged",
        "reranker_retired": moved["reranker_retired"] or "none",
        "serving_table": SERVING_TABLE,
        "serving_record": dg.MetadataValue.path(str(layout.serving_record)),
    })


defs = dg.Definitions(assets=[champion], asset_checks=[challenger_beats_champion])
