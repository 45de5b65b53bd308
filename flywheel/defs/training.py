"""trained_model and trained_reranker: fine-tune, track in MLflow, register as challengers.

Nothing here promotes: the benchmark report measures the challengers against the champion, the
blocking check ``challenger_beats_champion`` decides, and the ``champion`` asset moves the alias
(flywheel/defs/promotion.py).
"""


import json
from pathlib import Path

import dagster as dg

from flywheel.defs.datasets import labels_to_date
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import FlywheelPaths, MlflowResource, TrainingResource, VectorStoreResource
from flywheel.lib.registry import index
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.tiers import content_hash
from flywheel.lib.training.forgetting import GENERAL_PAIRS
from flywheel.lib.datasets.mining import MiningConfig, build_training_rows
from flywheel.lib.registry.promotion import serving_model
from flywheel.lib.training.reranker import RerankerConfig, train_reranker
from flywheel.lib.registry.tracking import Tracker
from flywheel.lib.training.embedder import TrainConfig, frozen_corpus, related_chunks, train_bi_encoder


def tracker(mlflow: MlflowResource) -> Tracker:
    return Tracker(mlflow.tracking_uri, mlflow.artifact_root, mlflow.experiment)


def model_dir(paths: FlywheelPaths, week: str, run_id: str, kind: str = "embedder") -> Path:
    """One folder per week *and* Dagster run: rematerializing a week never overwrites a version
    that may be serving (the champion's registry tag points at its folder)."""
    return paths.settings().models_dir / kind / f"{week}-{run_id[:8]}"


def rows_path(paths: FlywheelPaths, week: str) -> Path:
    return paths.settings().models_dir / "training_rows" / f"{week}.parquet"


def _info_path(paths: FlywheelPaths, week: str, kind: str) -> Path:
    return paths.settings().models_dir / kind / f"{week}.json"


def run_info(paths: FlywheelPaths, week: str, kind: str = "embedder") -> dict:
    """What trained_model / trained_reranker last recorded for a week: MLflow run, version, model path."""
    path = _info_path(paths, week, kind)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: materialize trained_{'model' if kind == 'embedder' else 'reranker'} for {week} first")
    return json.loads(path.read_text())


def _write_info(paths: FlywheelPaths, week: str, kind: str, info: dict) -> None:
    store.atomic_write_bytes(_info_path(paths, week, kind), json.dumps(info, indent=2).encode())


def _tags(context, week: str, kind: str) -> dict[str, str]:
    return {"dagster_run_id": context.run.run_id, "partition": week, "model_kind": kind}


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
    """The base bi-encoder fine-tuned on all labelled data to date (judged + mined hard negatives),
    registered as the ``challenger``; its corpus embeddings go into LanceDB."""
    week = context.partition_key
    data = store.read_table(store.asset_path(paths.assets_dir, "finetune_set", week))
    ds = load_beir(paths.dataset_dir)
    t = tracker(mlflow)

    # Hard negatives: judged (in finetune_set) + mined with the model that serves now. The corpus
    # loss needs no mining: every chunk of the corpus is scored as a negative at every step.
    miner_path, miner_label = serving_model(t, mlflow.embedder_name, training.base_model)
    query_only = training.train_loss == "corpus"
    if query_only:
        miner_label = "none (corpus loss: every chunk is a negative)"
    labels, _ = labels_to_date(paths, week)
    rows, neg_stats = build_training_rows(
        data, labels[["query_key", "chunk_id", "grade"]],
        miner_path if training.mine_negatives and not query_only else None,
        list(ds.corpus.ids), list(ds.corpus.texts),
        MiningConfig(range_max=training.mine_range_max, relative_margin=training.mine_relative_margin),
        max_seq_length=training.max_seq_length, device=training.device,
        cache_folder=str(paths.settings().cache_dir / "mining"), progress=context.log.info,
    )
    store.write_table(rows_path(paths, week), rows)
    cfg = TrainConfig(
        base_model=training.base_model,
        output_dir=model_dir(paths, week, context.run.run_id, "embedder"),
        epochs=training.epochs,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        max_seq_length=training.max_seq_length,
        max_steps=training.max_steps,
        validation_fraction=training.validation_fraction,
        time_budget_s=training.time_budget_s,
        merge_alpha=training.merge_alpha,
        forgetting_margin=training.forgetting_margin,
        seed=paths.seed,
        device=training.device,
        shuffle_labels=training.shuffle_labels,
        loss=training.train_loss,
        corpus_scale=training.train_corpus_scale,
    )
    dataset_sha = content_hash(data)
    rows_sha = content_hash(rows)
    general_sha = _file_sha(GENERAL_PAIRS)
    with t.run(f"embedder-{week}", _tags(context, week, "embedder")) as run_id:
        t.log_params(run_id, {
            **cfg.params(), "finetune_sha256": dataset_sha, "training_rows_sha256": rows_sha,
            "general_slice_sha256": general_sha, "finetune_rows": len(data), "mined_with": miner_label,
        })
        t.log_metrics(run_id, {f"negatives_{k}": v for k, v in neg_stats.items()})
        corpus, related = None, None
        if query_only:
            corpus = frozen_corpus(
                vector_store.uri, training.base_model, ds.corpus, max_seq_length=training.encode_max_seq_length,
                device=training.device, batch_size=training.encode_batch_size, progress=context.log.info,
            )
            related = related_chunks(labels)
            t.log_metrics(run_id, {"negatives_corpus_chunks": len(corpus.ids)})
        result = train_bi_encoder(rows, cfg, corpus=corpus, related=related, progress=context.log.info)
        for h in result.loss_history:
            t.log_metrics(run_id, {"train_loss": h["loss"]}, step=h["step"])
        for h in result.eval_history:
            t.log_metrics(run_id, {k: v for k, v in h.items() if k.startswith("eval_")}, step=h["step"])
        t.log_metrics(run_id, {f"validation_before_{k}": v for k, v in result.validation_before.items()})
        t.log_metrics(run_id, {f"validation_after_{k}": v for k, v in result.validation_after.items()})
        t.log_metrics(run_id, {
            "train_seconds": result.train_seconds, "train_steps": result.steps,
            "estimated_train_seconds": result.estimated_seconds,
            "general_ndcg_at_10_base": result.general_before, "general_ndcg_at_10_finetuned": result.general_finetuned,
            "general_ndcg_at_10_after": result.general_after, "merged_with_base": float(result.merged),
        })
        version = t.log_embedder(result.model_dir, mlflow.embedder_name, device=cfg.device)

    # Embed the corpus with the new model now, once: the report, the gate and serving reuse the
    # table. A query-only model reads its base's table: nothing to embed.
    model = index.load_embedder(result.model_dir, device=training.device, max_seq_length=training.encode_max_seq_length)
    model_id = index.model_fingerprint(result.model_dir)
    table = index.ensure_corpus_table(
        vector_store.uri, model, index.corpus_encoder_id(result.model_dir), ds.corpus,
        batch_size=training.encode_batch_size, progress=context.log.info,
    )
    info = {
        "week": week, "mlflow_run_id": run_id, "registered_model": mlflow.embedder_name,
        "version": version, "model_dir": str(result.model_dir), "model_id": model_id,
        "lancedb_table": table, "finetune_sha256": dataset_sha, "training_rows_sha256": rows_sha,
        "mined_with": miner_label, "negatives": neg_stats,
    }
    _write_info(paths, week, "embedder", info)
    before, after = result.validation_before, result.validation_after
    vkey = "validation_cosine_ndcg@10"
    return dg.MaterializeResult(metadata={
        "model_dir": dg.MetadataValue.path(str(result.model_dir)),
        "mlflow_run_id": run_id,
        "registered_model": f"{mlflow.embedder_name} v{version} (@challenger)",
        "version": version,
        "model_id": model_id,
        "lancedb_table": table,
        "train_rows": result.train_rows,
        "validation_rows": result.validation_rows,
        "train_steps": result.steps,
        "planned_steps": result.planned_steps,
        "best_step": result.best_step if result.best_step is not None else -1,
        "train_seconds": dg.MetadataValue.float(round(result.train_seconds, 1)),
        "estimated_train_seconds": dg.MetadataValue.float(round(result.estimated_seconds, 1)),
        "finetune_sha256": dataset_sha,
        "training_rows_sha256": rows_sha,
        "negatives_judged": neg_stats["judged_negatives"],
        "negatives_mined": neg_stats["mined_negatives"],
        "negatives_from_corpus": len(ds.corpus) if query_only else 0,
        "trained_towers": "query (documents: the base's corpus table)" if query_only else "shared",
        "mined_dropped_as_judged_relevant": neg_stats["mined_dropped_judged_relevant"],
        "mined_with": miner_label,
        "validation_ndcg@10_before": dg.MetadataValue.float(float(before.get(vkey, float("nan")))),
        "validation_ndcg@10_after": dg.MetadataValue.float(float(after.get(vkey, float("nan")))),
        "general_ndcg@10_base": dg.MetadataValue.float(result.general_before),
        "general_ndcg@10_finetuned": dg.MetadataValue.float(result.general_finetuned),
        "general_ndcg@10_after": dg.MetadataValue.float(result.general_after),
        "merged_with_base": result.merged,
    })


def _file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).exists() else ""


@dg.asset(
    partitions_def=weekly_partitions,
    deps=["trained_model"],
    group_name="training",
    kinds={"pytorch", "mlflow"},
    pool="training",
)
def trained_reranker(
    context: dg.AssetExecutionContext,
    paths: FlywheelPaths,
    training: TrainingResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """A cross-encoder fine-tuned on the same rows as the embedder (positives 1, hard negatives 0),
    logged as MLflow artifacts and registered as a ``flywheel-reranker`` challenger."""
    week = context.partition_key
    rows = store.read_table(rows_path(paths, week))
    cfg = RerankerConfig(
        base_model=training.base_model,
        output_dir=model_dir(paths, week, context.run.run_id, "reranker"),
        epochs=training.reranker_epochs,
        batch_size=training.reranker_batch_size,
        learning_rate=training.reranker_learning_rate,
        head_learning_rate=training.reranker_head_learning_rate,
        max_length=training.reranker_max_length,
        max_steps=training.reranker_max_steps,
        rerank_depth=training.rerank_depth,
        seed=paths.seed,
        device=training.device,
        shuffle_labels=training.shuffle_labels,
        init_model=run_info(paths, week, "embedder")["model_dir"] if training.reranker_init == "embedder" else None,
        loss=training.reranker_loss,
        num_negatives=training.reranker_num_negatives,
        fusion=training.reranker_fusion,
        fusion_weight=training.reranker_fusion_weight,
    )
    t = tracker(mlflow)
    rows_sha = content_hash(rows)
    with t.run(f"reranker-{week}", _tags(context, week, "reranker")) as run_id:
        t.log_params(run_id, {**cfg.params(), "training_rows_sha256": rows_sha})
        result = train_reranker(rows, cfg, progress=context.log.info)
        for h in result.loss_history:
            t.log_metrics(run_id, {"train_loss": h["loss"]}, step=h["step"])
        t.log_metrics(run_id, {
            "train_seconds": result.train_seconds, "train_steps": result.steps,
            "train_pairs": result.train_pairs, "positives": result.positives, "negatives": result.negatives,
        })
        version = t.log_reranker(run_id, result.model_dir, mlflow.reranker_name)
    info = {
        "week": week, "mlflow_run_id": run_id, "registered_model": mlflow.reranker_name, "version": version,
        "model_dir": str(result.model_dir), "training_rows_sha256": rows_sha, "max_length": cfg.max_length,
        "rerank_depth": cfg.rerank_depth, "fusion": cfg.fusion,
        "fusion_weight": cfg.fusion_weight,
    }
    _write_info(paths, week, "reranker", info)
    return dg.MaterializeResult(metadata={
        "model_dir": dg.MetadataValue.path(str(result.model_dir)),
        "mlflow_run_id": run_id,
        "registered_model": f"{mlflow.reranker_name} v{version} (@challenger)",
        "version": version,
        "train_pairs": result.train_pairs,
        "positives": result.positives,
        "negatives": result.negatives,
        "train_steps": result.steps,
        "train_seconds": dg.MetadataValue.float(round(result.train_seconds, 1)),
        "training_rows_sha256": rows_sha,
    })


defs = dg.Definitions(assets=[trained_model, trained_reranker])
