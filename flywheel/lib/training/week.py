"""The training stage for one week: what the ``trained_model`` and ``trained_reranker`` assets do.

:func:`train_week` turns a week's fine-tuning set into a trained embedder: hard negatives (judged,
plus mined with the serving model for the shared-tower losses; the corpus loss needs none: every
chunk is a negative), training with early stopping and the forgetting guard, and the corpus
table the new model searches. :func:`train_reranker_week` trains the cross-encoder on the same
rows. Both return a result that says what to record: MLflow params and metrics, the asset's
metadata and the run info the report and the gate read. The Dagster assets and
``benchmarks/training.py`` call these two functions, so the decisions live here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from flywheel.config import RerankerSettings, TrainingSettings
from flywheel.lib.beir import Corpus
from flywheel.lib.datasets.mining import MiningConfig, build_training_rows
from flywheel.lib.datasets.tiers import content_hash
from flywheel.lib.registry import hybrid, index
from flywheel.lib.training import forgetting
from flywheel.lib.training.corpus import frozen_corpus, judged_grades, related_chunks
from flywheel.lib.training.cross_encoder import InverseClozeLists, RerankerConfig, RerankerResult, train_reranker
from flywheel.lib.training.embedder import TrainConfig, TrainResult, train_bi_encoder

Say = Optional[Callable[[str], None]]
NOT_MINED = "none (corpus loss: every chunk is a negative)"
VALIDATION_KEY = "validation_cosine_ndcg@10"


def mines_negatives(settings: TrainingSettings) -> bool:
    """Mine hard negatives with the serving model? Only for the shared-tower losses (the corpus
    loss scores every chunk of the corpus as a negative at every step)."""
    return settings.mine_negatives and settings.loss != "corpus"


@dataclass
class EmbedderWeek:
    """A week's trained embedder and everything recorded about it."""

    config: TrainConfig
    result: TrainResult
    rows: pd.DataFrame  # the training rows (finetune_set with mined negatives)
    negatives: dict  # counts of judged / mined negatives (mining.NegativeStats and seconds)
    mined_with: str
    corpus_chunks: int  # negatives per query for the corpus loss (0: in-batch + hard negatives)
    lancedb_table: str
    model_id: str
    finetune_rows: int
    finetune_sha256: str
    training_rows_sha256: str
    general_slice_sha256: str

    @property
    def model_dir(self) -> Path:
        return self.result.model_dir

    def mlflow_params(self) -> dict:
        return {**self.config.params(), "finetune_sha256": self.finetune_sha256,
                "training_rows_sha256": self.training_rows_sha256, "general_slice_sha256": self.general_slice_sha256,
                "finetune_rows": self.finetune_rows, "mined_with": self.mined_with}

    def mlflow_metrics(self) -> dict:
        r = self.result
        out = {f"negatives_{k}": v for k, v in self.negatives.items()}
        if self.corpus_chunks:
            out["negatives_corpus_chunks"] = self.corpus_chunks
        out.update({f"validation_before_{k}": v for k, v in r.validation_before.items()})
        out.update({f"validation_after_{k}": v for k, v in r.validation_after.items()})
        out.update({
            "train_seconds": r.train_seconds, "train_steps": r.steps, "estimated_train_seconds": r.estimated_seconds,
            "general_ndcg_at_10_base": r.general_before, "general_ndcg_at_10_finetuned": r.general_finetuned,
            "general_ndcg_at_10_after": r.general_after, "merged_with_base": float(r.merged),
            "merge_alpha": r.merge_alpha, "validation_ndcg_at_10_before_merge": r.validation_unmerged,
        })
        return out

    def step_metrics(self) -> list[tuple[int, dict]]:
        """(step, metrics) for the loss curve and the validation evaluations."""
        losses = [(h["step"], {"train_loss": h["loss"]}) for h in self.result.loss_history]
        evals = [(h["step"], {k: v for k, v in h.items() if k.startswith("eval_")}) for h in self.result.eval_history]
        return losses + evals

    def metadata(self) -> dict:
        """The asset's metadata, as plain values (the report and the UI read these keys)."""
        r, n = self.result, self.negatives
        return {
            "model_id": self.model_id, "lancedb_table": self.lancedb_table,
            "train_rows": r.train_rows, "validation_rows": r.validation_rows, "train_steps": r.steps,
            "planned_steps": r.planned_steps, "best_step": r.best_step if r.best_step is not None else -1,
            "train_seconds": round(r.train_seconds, 1), "estimated_train_seconds": round(r.estimated_seconds, 1),
            "finetune_sha256": self.finetune_sha256, "training_rows_sha256": self.training_rows_sha256,
            "negatives_judged": n["judged_negatives"], "negatives_mined": n["mined_negatives"],
            "negatives_from_corpus": self.corpus_chunks,
            "trained_towers": "query (documents: the base's corpus table)" if self.config.query_only else "shared",
            "mined_dropped_as_judged_relevant": n["mined_dropped_judged_relevant"], "mined_with": self.mined_with,
            "validation_ndcg@10_before": float(r.validation_before.get(VALIDATION_KEY, float("nan"))),
            "validation_ndcg@10_after": float(r.validation_after.get(VALIDATION_KEY, float("nan"))),
            "general_ndcg@10_base": r.general_before, "general_ndcg@10_finetuned": r.general_finetuned,
            "general_ndcg@10_after": r.general_after, "merged_with_base": r.merged,
            "merge_alpha": r.merge_alpha, "validation_ndcg@10_before_merge": r.validation_unmerged,
        }

    def run_info(self, week: str, run_id: str, registered_model: str, version: str) -> dict:
        """What the report, the gate and the promotion read back (``registry.runs``)."""
        return {
            "week": week, "mlflow_run_id": run_id, "registered_model": registered_model, "version": version,
            "model_dir": str(self.model_dir), "model_id": self.model_id, "lancedb_table": self.lancedb_table,
            "finetune_sha256": self.finetune_sha256, "training_rows_sha256": self.training_rows_sha256,
            "mined_with": self.mined_with, "negatives": self.negatives,
        }


def train_week(
    finetune_set: pd.DataFrame,
    labels: pd.DataFrame,
    corpus: Corpus,
    settings: TrainingSettings,
    *,
    base_model: str,
    seed: int,
    output_dir: Path,
    lancedb_uri: index.Where,  # a folder or a LanceStore (Layout.lancedb)
    serving: tuple[str, str] | None = None,
    mining_cache: Path | None = None,
    openvino_cache: Path | None = None,
    progress: Say = None,
) -> EmbedderWeek:
    """Train the week's embedder from ``base_model`` on ``finetune_set`` (all weeks to date).

    ``labels``: every judged pair to date (query_key, chunk_id, grade); ``serving``: (folder, label)
    of the model that serves now, the miner of hard negatives (default: the base);
    ``openvino_cache``: where OpenVINO networks are kept between processes (``Layout.openvino_cache``)."""
    miner_path, miner_label = serving or (str(base_model), "base")
    cfg = TrainConfig(settings=settings, base_model=str(base_model), output_dir=Path(output_dir), seed=seed)

    # 1. Negatives: judged (in finetune_set), plus mined with the serving model (shared towers only)
    mine = mines_negatives(settings)
    rows, negatives = build_training_rows(
        finetune_set, labels[["query_key", "chunk_id", "grade"]], miner_path if mine else None,
        list(corpus.ids), list(corpus.texts), MiningConfig.from_settings(settings),
        cache_folder=str(mining_cache) if mining_cache else None, progress=progress,
    )

    # 2. The corpus loss's negatives: the base's corpus embeddings as served, minus related chunks
    frozen, related, grades = None, None, None
    if cfg.query_only:
        frozen = frozen_corpus(lancedb_uri, cfg.base_model, corpus, max_seq_length=settings.encode_max_seq_length,
                               device=settings.device, batch_size=settings.encode_batch_size,
                               precision=settings.inference_precision, cache_dir=openvino_cache, progress=progress)
        related = related_chunks(labels)
        grades = judged_grades(labels) if settings.corpus_targets == "graded" else None

    # 3. Train: early stopping on held-out training queries, the forgetting guard, saved as files
    result = train_bi_encoder(rows, cfg, corpus=frozen, related=related, grades=grades, progress=progress)

    # 4. The corpus table the new model searches, embedded once here (the report, the gate and
    #    serving reuse it); a query-only model reads its base's table: nothing to embed. With
    #    sentence units, that table holds each chunk's units too (index.sentence_units). Documents
    #    only, and the model is loaded only if its table must be built
    model = index.EmbedderToLoad(result.model_dir, settings.encode_max_seq_length, settings.inference_precision,
                                 device=settings.device, cache_dir=openvino_cache)
    table = index.ensure_corpus_table(lancedb_uri, model, index.corpus_encoder_id(result.model_dir), corpus,
                                      batch_size=settings.encode_batch_size, progress=progress,
                                      units=settings.sentence_units)
    return EmbedderWeek(
        config=cfg, result=result, rows=rows, negatives=negatives,
        mined_with=miner_label if mine else NOT_MINED if cfg.query_only else "none (mining off)",
        corpus_chunks=len(frozen.ids) if frozen else 0, lancedb_table=table,
        model_id=index.model_fingerprint(result.model_dir), finetune_rows=len(finetune_set),
        finetune_sha256=content_hash(finetune_set), training_rows_sha256=content_hash(rows),
        general_slice_sha256=forgetting.general_slice_sha256(),
    )


@dataclass
class RerankerWeek:
    """A week's trained reranker and everything recorded about it."""

    config: RerankerConfig
    result: RerankerResult
    training_rows_sha256: str

    @property
    def model_dir(self) -> Path:
        return self.result.model_dir

    def mlflow_params(self) -> dict:
        return {**self.config.params(), "training_rows_sha256": self.training_rows_sha256}

    def mlflow_metrics(self) -> dict:
        r = self.result
        return {"train_seconds": r.train_seconds, "train_steps": r.steps, "train_examples": r.examples,
                "train_pairs": r.train_pairs, "positives": r.positives, "negatives": r.negatives,
                "warmup_lists": r.warmup_lists, "warmup_steps": r.warmup_steps, "warmup_seconds": r.warmup_seconds}

    def step_metrics(self) -> list[tuple[int, dict]]:
        return [(h["step"], {"train_loss": h["loss"]}) for h in self.result.loss_history]

    def metadata(self) -> dict:
        r = self.result
        return {"loss": self.config.settings.loss, "train_examples": r.examples,
                "train_pairs": r.train_pairs, "positives": r.positives, "negatives": r.negatives,
                "train_steps": r.steps, "train_seconds": round(r.train_seconds, 1),
                "warmup_lists": r.warmup_lists, "warmup_steps": r.warmup_steps,
                "warmup_seconds": round(r.warmup_seconds, 1), "training_rows_sha256": self.training_rows_sha256}

    def run_info(self, week: str, run_id: str, registered_model: str, version: str) -> dict:
        s = self.config.settings
        return {
            "week": week, "mlflow_run_id": run_id, "registered_model": registered_model, "version": version,
            "model_dir": str(self.model_dir), "training_rows_sha256": self.training_rows_sha256,
            "max_length": s.max_length, "rerank_depth": s.depth, "fusion": s.fusion, "fusion_weight": s.fusion_weight,
            "passages": s.passages,
        }


def train_reranker_week(
    rows: pd.DataFrame,
    settings: RerankerSettings,
    training: TrainingSettings,
    *,
    base_model: str,
    seed: int,
    output_dir: Path,
    embedder_dir: str | Path | None = None,
    labels: pd.DataFrame | None = None,
    corpus: Corpus | None = None,
    lancedb_uri: index.Where | None = None,
    progress: Say = None,
) -> RerankerWeek:
    """Train the week's cross-encoder on the embedder's training rows, starting from the week's
    embedder (``settings.init == "embedder"``; ``embedder_dir``) or from the base. ``labels``:
    every judged pair to date, which the graded loss ranks query by query. ``corpus`` and
    ``lancedb_uri`` (its BM25 table) give the inverse-cloze warm-up its lists (``settings.ict_lists``)."""
    if settings.init == "embedder" and not embedder_dir:
        raise ValueError("FLYWHEEL_RERANKER_INIT=embedder needs the week's trained embedder (embedder_dir)")
    cfg = RerankerConfig(
        settings=settings, training=training, base_model=str(base_model), output_dir=Path(output_dir), seed=seed,
        init_model=str(embedder_dir) if settings.init == "embedder" else None,
    )
    warmup = None
    if settings.ict_lists:
        if corpus is None or lancedb_uri is None:
            raise ValueError("FLYWHEEL_RERANKER_ICT_LISTS > 0 needs the corpus and its LanceDB folder (for BM25's "
                             "negatives); set it to 0 to train on the judged rows alone")
        table = hybrid.ensure_bm25_table(lancedb_uri, corpus, progress=progress)
        lists = InverseClozeLists(corpus, lambda queries, k: hybrid.bm25_search(lancedb_uri, table, queries, k),
                                  list_size=settings.list_size)
        # no more lists than the warm-up's steps can take (at most as many steps as the judged rows get)
        wanted = settings.ict_lists if settings.max_steps <= 0 else min(
            settings.ict_lists, settings.max_steps * settings.graded_queries_per_step)
        warmup = lists.build(wanted, seed)
        if progress:
            progress(f"reranker warm-up: {len(warmup)} inverse-cloze lists from the corpus (asked {wanted})")
    result = train_reranker(rows, cfg, judged=labels, warmup=warmup, progress=progress)
    return RerankerWeek(config=cfg, result=result, training_rows_sha256=content_hash(rows))


def log_to_mlflow(tracker, run_id: str, week_result: EmbedderWeek | RerankerWeek) -> None:
    """Params, summary metrics and per-step curves of a week's training, into its MLflow run."""
    tracker.log_params(run_id, week_result.mlflow_params())
    for step, metrics in week_result.step_metrics():
        tracker.log_metrics(run_id, metrics, step=step)
    tracker.log_metrics(run_id, week_result.mlflow_metrics())
