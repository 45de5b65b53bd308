"""trained_model and trained_reranker: fine-tune, track in MLflow, register as challengers.

Wiring only: the work is in ``flywheel.lib.training.week`` (``train_week``,
``train_reranker_week``). Nothing here promotes: the benchmark report measures the challengers
against the champion, the blocking check ``challenger_beats_champion`` decides, and the
``champion`` asset moves the alias (flywheel/defs/promotion.py).
"""

import dagster as dg

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import (
    GateResource, PathsResource, RerankerResource, TiersResource, TrainingResource, tracker_for,
)
from flywheel.layout import EMBEDDER, FINETUNE_SET, RERANKER, TRAINED_MODEL
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.weekly import labels_to_date
from flywheel.lib.registry.promotion import serving_model
from flywheel.lib.registry.runs import read_run_info, write_run_info
from flywheel.lib.training.week import log_to_mlflow, train_reranker_week, train_week


def _tags(context, week: str, kind: str) -> dict[str, str]:
    return {"dagster_run_id": context.run.run_id, "partition": week, "model_kind": kind}


def _metadata(out, run_id: str, registered: str, version: str) -> dict:
    """The lib result's metadata, with the MLflow run and registered version; figures as floats."""
    md = {k: dg.MetadataValue.float(v) if isinstance(v, float) else v for k, v in out.metadata().items()}
    return {"model_dir": dg.MetadataValue.path(str(out.model_dir)), "mlflow_run_id": run_id,
            "registered_model": f"{registered} v{version} (@challenger)", "version": version, **md}


@dg.asset(
    partitions_def=weekly_partitions,
    deps=[FINETUNE_SET],
    group_name="training",
    kinds={"pytorch", "mlflow", "lancedb"},
    pool="training",  # one training run at a time (dagster.yaml sets the pool's limit)
)
def trained_model(
    context: dg.AssetExecutionContext,
    paths: PathsResource,
    tiers: TiersResource,
    training: TrainingResource,
    gate: GateResource,
) -> dg.MaterializeResult:
    """The base bi-encoder fine-tuned on all labelled data to date (judged + mined hard negatives),
    registered as the ``challenger``; its corpus embeddings go into LanceDB."""
    week, layout, p, g = context.partition_key, paths.layout(), paths.settings(), gate.settings()
    t = tracker_for(paths, gate)
    finetune = store.read_table(layout.asset(FINETUNE_SET, week))
    labels, _ = labels_to_date(layout, week)
    with t.run(f"embedder-{week}", _tags(context, week, EMBEDDER)) as run_id:
        out = train_week(
            finetune, labels, load_beir(p.dataset).corpus, training.settings(), base_model=p.base_model,
            seed=tiers.settings().seed, output_dir=layout.model_dir(EMBEDDER, week, context.run.run_id),
            lancedb_uri=layout.lancedb, serving=serving_model(t, g.embedder_name, p.base_model),
            mining_cache=layout.mining_cache, openvino_cache=layout.openvino_cache, progress=context.log.info,
        )
        store.write_table(layout.training_rows(week), out.rows)
        log_to_mlflow(t, run_id, out)
        version = t.log_embedder(out.model_dir, g.embedder_name, device=out.config.settings.device)
    write_run_info(layout, week, EMBEDDER, out.run_info(week, run_id, g.embedder_name, version))
    return dg.MaterializeResult(metadata=_metadata(out, run_id, g.embedder_name, version))


@dg.asset(
    partitions_def=weekly_partitions,
    deps=[TRAINED_MODEL],
    group_name="training",
    kinds={"pytorch", "mlflow"},
    pool="training",
)
def trained_reranker(
    context: dg.AssetExecutionContext,
    paths: PathsResource,
    tiers: TiersResource,
    training: TrainingResource,
    reranker: RerankerResource,
    gate: GateResource,
) -> dg.MaterializeResult:
    """A cross-encoder fine-tuned on the same rows as the embedder (positives 1, hard negatives 0;
    the graded loss ranks each of those queries' judged lists by grade), logged as MLflow artifacts
    and registered as a ``flywheel-reranker`` challenger."""
    week, layout, p, g = context.partition_key, paths.layout(), paths.settings(), gate.settings()
    t = tracker_for(paths, gate)
    rows, rs = store.read_table(layout.training_rows(week)), reranker.settings()
    labels = labels_to_date(layout, week)[0] if rs.loss == "graded" else None  # only the graded loss ranks them
    with t.run(f"reranker-{week}", _tags(context, week, RERANKER)) as run_id:
        out = train_reranker_week(
            rows, rs, training.settings(), base_model=p.base_model, seed=tiers.settings().seed,
            output_dir=layout.model_dir(RERANKER, week, context.run.run_id),
            embedder_dir=read_run_info(layout, week, EMBEDDER)["model_dir"], labels=labels,
            corpus=load_beir(p.dataset).corpus if rs.ict_lists else None,  # only the warm-up reads it
            lancedb_uri=layout.lancedb, progress=context.log.info,
        )
        log_to_mlflow(t, run_id, out)
        version = t.log_reranker(run_id, out.model_dir, g.reranker_name)
    write_run_info(layout, week, RERANKER, out.run_info(week, run_id, g.reranker_name, version))
    return dg.MaterializeResult(metadata=_metadata(out, run_id, g.reranker_name, version))


defs = dg.Definitions(assets=[trained_model, trained_reranker])
