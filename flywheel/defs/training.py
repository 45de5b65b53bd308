"""trained_model: fine-tune the bi-encoder, track it in MLflow, and gate it against the base."""


import json
from pathlib import Path

import dagster as dg

from flywheel.defs.datasets import eval_sets_to_date
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import FlywheelPaths, MlflowResource, TrainingResource, VectorStoreResource
from flywheel.lib import evaluation, index, store
from flywheel.lib.benchmark import ModelSpec, paired_delta, run_benchmark
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets import content_hash
from flywheel.lib.tracking import Tracker
from flywheel.lib.training import TrainConfig, train_bi_encoder


def tracker(mlflow: MlflowResource) -> Tracker:
    return Tracker(mlflow.tracking_uri, mlflow.artifact_root, mlflow.experiment)


def model_dir(paths: FlywheelPaths, week: str) -> Path:
    return paths.settings().models_dir / "embedder" / week


def run_info(paths: FlywheelPaths, week: str) -> dict:
    """What trained_model recorded for a week: MLflow run id, registered version, model path."""
    path = model_dir(paths, week) / "flywheel_run.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize trained_model for {week} first")
    return json.loads(path.read_text())


@dg.asset(
    partitions_def=weekly_partitions,
    deps=["finetune_set"],
    group_name="training",
    kinds={"pytorch", "mlflow", "lancedb"},
    pool="training",  # one training run at a time (dagster.yaml sets the pool's limit)
)
def trained_model(
    context: dg.AssetExecutionContext,
    paths: FlywheelPaths,
    training: TrainingResource,
    mlflow: MlflowResource,
    vector_store: VectorStoreResource,
) -> dg.MaterializeResult:
    """The base bi-encoder fine-tuned on this week's finetune_set, saved as files and registered."""
    week = context.partition_key
    data = store.read_table(store.asset_path(paths.assets_dir, "finetune_set", week))
    cfg = TrainConfig(
        base_model=training.base_model,
        output_dir=model_dir(paths, week),
        epochs=training.epochs,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        max_seq_length=training.max_seq_length,
        max_steps=training.max_steps,
        seed=paths.seed,
        device=training.device,
        shuffle_labels=training.shuffle_labels,
    )
    dataset_sha = content_hash(data)
    t = tracker(mlflow)
    tags = {"dagster_run_id": context.run_id, "partition": week, "model_kind": "embedder"}
    with t.run(f"embedder-{week}", tags) as run_id:
        import mlflow as mlf

        mlf.log_params({**cfg.params(), "finetune_sha256": dataset_sha, "finetune_rows": len(data)})
        result = train_bi_encoder(data, cfg, progress=context.log.info)
        for h in result.loss_history:
            t.log_metrics(run_id, {"train_loss": h["loss"]}, step=h["step"])
        t.log_metrics(run_id, {f"validation_before_{k}": v for k, v in result.validation_before.items()})
        t.log_metrics(run_id, {f"validation_after_{k}": v for k, v in result.validation_after.items()})
        t.log_metrics(run_id, {"train_seconds": result.train_seconds, "train_steps": result.steps})
        version = t.log_embedder(result.model_dir, mlflow.embedder_name, device=cfg.device)

    # Embed the corpus with the new model now, once: the gate and the report reuse the table.
    model = index.load_embedder(result.model_dir, device=training.device, max_seq_length=training.encode_max_seq_length)
    model_id = index.model_fingerprint(result.model_dir)
    table = index.ensure_corpus_table(
        vector_store.uri, model, model_id, load_beir(paths.dataset_dir).corpus,
        batch_size=training.encode_batch_size, progress=context.log.info,
    )
    info = {
        "week": week, "mlflow_run_id": run_id, "registered_model": mlflow.embedder_name,
        "version": version, "model_dir": str(result.model_dir), "model_id": model_id,
        "lancedb_table": table, "finetune_sha256": dataset_sha,
    }
    (result.model_dir / "flywheel_run.json").write_text(json.dumps(info, indent=2))
    before, after = result.validation_before, result.validation_after
    return dg.MaterializeResult(metadata={
        "model_dir": dg.MetadataValue.path(str(result.model_dir)),
        "mlflow_run_id": run_id,
        "registered_model": f"{mlflow.embedder_name} v{version} (@challenger)",
        "model_id": model_id,
        "lancedb_table": table,
        "train_rows": result.train_rows,
        "validation_rows": result.validation_rows,
        "train_steps": result.steps,
        "train_seconds": dg.MetadataValue.float(round(result.train_seconds, 1)),
        "finetune_sha256": dataset_sha,
        "validation_accuracy_before": dg.MetadataValue.float(float(before.get("validation_cosine_accuracy", float("nan")))),
        "validation_accuracy_after": dg.MetadataValue.float(float(after.get("validation_cosine_accuracy", float("nan")))),
    })


@dg.asset_check(asset=trained_model, blocking=True, partitions_def=weekly_partitions)
def not_worse_than_base_on_eval_sets(
    context: dg.AssetCheckExecutionContext,
    paths: FlywheelPaths,
    training: TrainingResource,
    vector_store: VectorStoreResource,
) -> dg.AssetCheckResult:
    """The line stops if the trained model scores below the base on the eval sets to date."""
    week = context.partition_key
    info = run_info(paths, week)
    evals, weeks = eval_sets_to_date(paths, week)
    if evals.empty:
        return dg.AssetCheckResult(passed=False, description="no eval sets to date: nothing proves the model")
    suite = {"eval sets": evaluation.eval_sets_to_qrels(evals)}
    bench = run_benchmark(
        [ModelSpec("base", training.base_model), ModelSpec("trained", info["model_dir"], info["model_id"])],
        load_beir(paths.dataset_dir), suite, vector_store.uri,
        max_seq_length=training.encode_max_seq_length, batch_size=training.encode_batch_size,
        device=training.device, progress=context.log.info,
    )
    base = bench.summary("eval sets", "base")["ndcg@10"]
    trained = bench.summary("eval sets", "trained")["ndcg@10"]
    ci = paired_delta(bench, "eval sets", "base", "trained")
    passed = trained >= base - paths.regression_margin
    return dg.AssetCheckResult(
        passed=bool(passed),
        metadata={
            "ndcg@10_base": base, "ndcg@10_trained": trained,
            "delta": ci["delta"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
            "eval_queries": ci["n"], "eval_weeks": len(weeks), "margin": paths.regression_margin,
        },
        description=(
            f"NDCG@10 on {ci['n']} eval queries: base {base:.4f}, trained {trained:.4f} "
            f"({'passes' if passed else 'fails'}: margin {paths.regression_margin})"
        ),
    )


defs = dg.Definitions(assets=[trained_model], asset_checks=[not_worse_than_base_on_eval_sets])
