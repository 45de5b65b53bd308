"""trained_model and trained_reranker: fine-tune, track in MLflow, register as challengers.

Nothing here promotes: the benchmark report measures the challengers against the champion, the
blocking check ``challenger_beats_champion`` decides, and the ``champion`` asset moves the alias
(flywheel/defs/promotion.py).
"""


from pathlib import Path

import dagster as dg

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import (
    GateResource, PathsResource, RerankerResource, TiersResource, TrainingResource, tracker_for,
)
from flywheel.layout import EMBEDDER, FINETUNE_SET, RERANKER, TRAINED_MODEL
from flywheel.lib.registry import index
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.tiers import content_hash
from flywheel.lib.datasets.weekly import labels_to_date
from flywheel.lib.training.forgetting import GENERAL_PAIRS
from flywheel.lib.datasets.mining import MiningConfig, build_training_rows
from flywheel.lib.registry.promotion import serving_model
from flywheel.lib.registry.runs import read_run_info, write_run_info
from flywheel.lib.training.reranker import RerankerConfig, train_reranker
from flywheel.lib.training.embedder import TrainConfig, frozen_corpus, related_chunks, train_bi_encoder


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
    paths: PathsResource,
    tiers: TiersResource,
    training: TrainingResource,
    gate: GateResource,
) -> dg.MaterializeResult:
    """The base bi-encoder fine-tuned on all labelled data to date (judged + mined hard negatives),
    registered as the ``challenger``; its corpus embeddings go into LanceDB."""
    week, layout, p, tr, g = context.partition_key, paths.layout(), paths.settings(), training.settings(), gate.settings()
    data = store.read_table(layout.asset(FINETUNE_SET, week))
    ds = load_beir(p.dataset)
    t = tracker_for(paths, gate)

    # Hard negatives: judged (in finetune_set) + mined with the model that serves now. The corpus
    # loss needs no mining: every chunk of the corpus is scored as a negative at every step.
    miner_path, miner_label = serving_model(t, g.embedder_name, p.base_model)
    query_only = tr.loss == "corpus"
    if query_only:
        miner_label = "none (corpus loss: every chunk is a negative)"
    labels, _ = labels_to_date(layout, week)
    rows, neg_stats = build_training_rows(
        data, labels[["query_key", "chunk_id", "grade"]],
        miner_path if tr.mine_negatives and not query_only else None,
        list(ds.corpus.ids), list(ds.corpus.texts),
        MiningConfig(range_max=tr.mine_range_max, relative_margin=tr.mine_relative_margin),
        max_seq_length=tr.max_seq_length, device=tr.device,
        cache_folder=str(layout.mining_cache), progress=context.log.info,
    )
    store.write_table(layout.training_rows(week), rows)
    cfg = TrainConfig(
        base_model=p.base_model,
        output_dir=layout.model_dir(EMBEDDER, week, context.run.run_id),
        epochs=tr.epochs,
        batch_size=tr.batch_size,
        learning_rate=tr.learning_rate,
        max_seq_length=tr.max_seq_length,
        max_steps=tr.max_steps,
        validation_fraction=tr.validation_fraction,
        time_budget_s=tr.time_budget_s,
        merge_alpha=tr.merge_alpha,
        forgetting_margin=tr.forgetting_margin,
        seed=tiers.settings().seed,
        device=tr.device,
        shuffle_labels=tr.shuffle_labels,
        loss=tr.loss,
        corpus_scale=tr.corpus_scale,
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
                layout.lancedb_dir, p.base_model, ds.corpus, max_seq_length=tr.encode_max_seq_length,
                device=tr.device, batch_size=tr.encode_batch_size, progress=context.log.info,
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
        version = t.log_embedder(result.model_dir, g.embedder_name, device=cfg.device)

    # Embed the corpus with the new model now, once: the report, the gate and serving reuse the
    # table. A query-only model reads its base's table: nothing to embed.
    model = index.load_embedder(result.model_dir, device=tr.device, max_seq_length=tr.encode_max_seq_length)
    model_id = index.model_fingerprint(result.model_dir)
    table = index.ensure_corpus_table(
        layout.lancedb_dir, model, index.corpus_encoder_id(result.model_dir), ds.corpus,
        batch_size=tr.encode_batch_size, progress=context.log.info,
    )
    info = {
        "week": week, "mlflow_run_id": run_id, "registered_model": g.embedder_name,
        "version": version, "model_dir": str(result.model_dir), "model_id": model_id,
        "lancedb_table": table, "finetune_sha256": dataset_sha, "training_rows_sha256": rows_sha,
        "mined_with": miner_label, "negatives": neg_stats,
    }
    write_run_info(layout, week, EMBEDDER, info)
    before, after = result.validation_before, result.validation_after
    vkey = "validation_cosine_ndcg@10"
    return dg.MaterializeResult(metadata={
        "model_dir": dg.MetadataValue.path(str(result.model_dir)),
        "mlflow_run_id": run_id,
        "registered_model": f"{g.embedder_name} v{version} (@challenger)",
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
    paths: PathsResource,
    tiers: TiersResource,
    training: TrainingResource,
    reranker: RerankerResource,
    gate: GateResource,
) -> dg.MaterializeResult:
    """A cross-encoder fine-tuned on the same rows as the embedder (positives 1, hard negatives 0),
    logged as MLflow artifacts and registered as a ``flywheel-reranker`` challenger."""
    week, layout, p, tr, rr, g = (context.partition_key, paths.layout(), paths.settings(), training.settings(),
                                  reranker.settings(), gate.settings())
    rows = store.read_table(layout.training_rows(week))
    cfg = RerankerConfig(
        base_model=p.base_model,
        output_dir=layout.model_dir(RERANKER, week, context.run.run_id),
        epochs=rr.epochs,
        batch_size=rr.batch_size,
        learning_rate=rr.learning_rate,
        head_learning_rate=rr.head_learning_rate,
        max_length=rr.max_length,
        max_steps=rr.max_steps,
        rerank_depth=rr.depth,
        seed=tiers.settings().seed,
        device=tr.device,
        shuffle_labels=tr.shuffle_labels,
        init_model=read_run_info(layout, week, EMBEDDER)["model_dir"] if rr.init == "embedder" else None,
        loss=rr.loss,
        num_negatives=rr.num_negatives,
        fusion=rr.fusion,
        fusion_weight=rr.fusion_weight,
    )
    t = tracker_for(paths, gate)
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
        version = t.log_reranker(run_id, result.model_dir, g.reranker_name)
    info = {
        "week": week, "mlflow_run_id": run_id, "registered_model": g.reranker_name, "version": version,
        "model_dir": str(result.model_dir), "training_rows_sha256": rows_sha, "max_length": cfg.max_length,
        "rerank_depth": cfg.rerank_depth, "fusion": cfg.fusion,
        "fusion_weight": cfg.fusion_weight,
    }
    write_run_info(layout, week, RERANKER, info)
    return dg.MaterializeResult(metadata={
        "model_dir": dg.MetadataValue.path(str(result.model_dir)),
        "mlflow_run_id": run_id,
        "registered_model": f"{g.reranker_name} v{version} (@challenger)",
        "version": version,
        "train_pairs": result.train_pairs,
        "positives": result.positives,
        "negatives": result.negatives,
        "train_steps": result.steps,
        "train_seconds": dg.MetadataValue.float(round(result.train_seconds, 1)),
        "training_rows_sha256": rows_sha,
    })


defs = dg.Definitions(assets=[trained_model, trained_reranker])
