"""Fine-tune the bi-encoder on (query, positive, hard negative) rows.

Reads like sentence-transformers' own training examples: model, data, loss, arguments,
evaluate the base, train, merge with the base (WiSE-FT), evaluate again (and guard against forgetting), save.

Every week trains from the configured base on all labelled data to date, with a fixed seed, so a
week's model is reproducible from its finetune_set. Early stopping watches NDCG@10 on a
validation slice of the *training* queries (never an eval-set or test-split query).

Two recipes (``TrainingSettings.loss``):

- ``corpus`` (default): only the query encoder trains, against the frozen corpus the app serves
  (``corpus.py``, ``losses.CorpusSoftmaxLoss``): no re-embedding, cheap steps, several epochs
  fit in minutes.
- ``gist`` / ``mnrl``: both sides train as one tower on (query, positive, hard negative) with
  in-batch negatives (GIST: the base guides, masking negatives it ranks above the positive). The
  corpus must then be re-embedded for every new model.

Measured figures for the recipes are in ``benchmarks/training.py``'s output and the README.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from flywheel.config import TrainingSettings
from flywheel.lib.labels.judges import stable_uniform
from flywheel.lib.registry import index
from flywheel.lib.registry.inference import training_bf16
from flywheel.lib.training.corpus import (
    CorpusEmbeddings, corpus_targets, graded_targets, query_document_model, write_towers_file,
)

TRAINING_FILE = "flywheel_training.json"


@dataclass
class TrainConfig:
    """One bi-encoder run: the training settings (flywheel.config) and what belongs to this run.

    The run mechanics below are not settings (the pipeline never changes them; tests do)."""

    settings: TrainingSettings
    base_model: str
    output_dir: Path
    seed: int
    evaluations: int = 3  # validation evaluations over the run (early stopping keeps the best)
    early_stopping_patience: int = 2
    validation_distractors: int = 100  # extra training passages in the validation corpus
    warmup: float = 0.1  # share of the steps spent warming the learning rate up

    @property
    def query_only(self) -> bool:
        return self.settings.loss == "corpus"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir).with_name(Path(self.output_dir).name + ".checkpoints")

    def params(self) -> dict:
        run = {k: v for k, v in asdict(self).items() if k != "settings"}
        s = self.settings
        return {**s.model_dump(mode="json"), **run, "output_dir": str(self.output_dir),
                "bf16": training_bf16(s.precision, index.resolve_device(s.device))}  # what "auto" chose


@dataclass
class TrainResult:
    model_dir: Path
    train_rows: int
    validation_rows: int
    steps: int
    planned_steps: int
    train_seconds: float
    estimated_seconds: float
    validation_before: dict
    validation_after: dict
    general_before: float
    general_after: float
    general_finetuned: float
    merged: bool
    best_step: int | None
    loss_history: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)
    merge_alpha: float = 1.0  # the fine-tuned weight kept when merging with the base (1.0: not merged)
    validation_unmerged: float = float("nan")  # validation NDCG@10 before that merge

    def summary(self) -> dict:
        d = asdict(self)
        d["model_dir"] = str(d["model_dir"])
        d.pop("loss_history")
        d.pop("eval_history")
        return d


def split_validation(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole training queries (never eval-set or test queries) for validation."""
    held = df["query_key"].map(lambda k: stable_uniform("validation", seed, k) < fraction)
    return df[~held].reset_index(drop=True), df[held].reset_index(drop=True)


def shuffled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Pair every query with another query's positive: labels that carry no signal."""
    out = df.copy()
    order = df.sample(frac=1.0, random_state=seed).index
    out["positive"] = df.loc[order, "positive"].to_numpy()
    out["positive_id"] = df.loc[order, "positive_id"].to_numpy()
    return out


@dataclass
class TrainingData:
    """The rows split for training and validation, as the trainer's dataset, and the corpus
    loss's per-row targets (empty for the shared-tower losses)."""

    train_df: pd.DataFrame
    val_df: pd.DataFrame
    dataset: object  # datasets.Dataset
    targets: list = field(default_factory=list)
    masked: list = field(default_factory=list)
    soft: list | None = None  # graded target distributions (corpus_targets = "graded")


def load_model(cfg: TrainConfig):
    """The configured base from a local folder (every week starts from it: reproducible); for the
    corpus loss, a query encoder beside the base's frozen document encoder."""
    s = cfg.settings
    if cfg.query_only:
        return query_document_model(cfg.base_model, device=s.device, max_seq_length=s.max_seq_length)
    return index.load_embedder(cfg.base_model, device=s.device, max_seq_length=s.max_seq_length)


def prepare_data(rows: pd.DataFrame, cfg: TrainConfig, corpus: CorpusEmbeddings | None,
                 related: dict | None, say: Callable[[str], None], grades: dict | None = None) -> TrainingData:
    """Whole training queries held out for validation; the rest trains (shuffled on request).
    ``grades`` (query_key -> {chunk_id: grade >= 1}) makes the corpus loss's targets graded when
    ``corpus_targets`` asks for it (a shuffled-labels run keeps its one shuffled positive)."""
    from datasets import Dataset

    train_df, val_df = split_validation(rows, cfg.settings.validation_fraction, cfg.seed)
    if cfg.settings.shuffle_labels:
        train_df = shuffled(train_df, cfg.seed)
    if not cfg.query_only:
        columns = train_df[["query", "positive", "negative"]].rename(columns={"query": "anchor"})
        return TrainingData(train_df, val_df, Dataset.from_pandas(columns, preserve_index=False))
    targets, masked, missing = corpus_targets(train_df, corpus.ids, related)
    if missing:
        say(f"train: {missing} rows skipped: their positive chunk is not in the corpus table")
        train_df = train_df[[t >= 0 for t in targets]].reset_index(drop=True)
        targets, masked, _ = corpus_targets(train_df, corpus.ids, related)
    dataset = Dataset.from_dict({"anchor": list(train_df["query"]), "label": list(range(len(train_df)))})
    if cfg.settings.corpus_targets == "graded" and not cfg.settings.shuffle_labels:
        if grades is None:
            raise ValueError("FLYWHEEL_TRAIN_CORPUS_TARGETS=graded needs the judged grades (relevance_labels to date)")
        soft = graded_targets(train_df, corpus.ids, grades)
        return TrainingData(train_df, val_df, dataset, targets, [[] for _ in targets], soft)
    return TrainingData(train_df, val_df, dataset, targets, masked)


def set_widget_examples(model, rows: pd.DataFrame, n: int = 5) -> None:
    """The model card's widget examples, picked here (the first rows' query, positive, negative).
    Left empty, every trainer samples its own behind a tqdm bar ("Computing widget examples")."""
    head = rows[["query", "positive", "negative"]].head(n).itertuples(index=False)
    model.model_card_data.widget = [{"source_sentence": q, "sentences": [p, ng]} for q, p, ng in head]


def make_evaluator(data: TrainingData, cfg: TrainConfig, corpus: CorpusEmbeddings | None, related: dict | None):
    from flywheel.lib.training.evaluators import CorpusValidationEvaluator, validation_evaluator

    if cfg.query_only:
        return CorpusValidationEvaluator.from_rows(data.val_df, corpus.ids, corpus.vectors, related)
    return validation_evaluator(data.val_df, data.train_df, cfg.validation_distractors, cfg.seed)


def make_loss(model, cfg: TrainConfig, data: TrainingData | None = None, corpus: CorpusEmbeddings | None = None):
    """A softmax over the whole corpus (query encoder only), or in-batch negatives plus each row's
    hard negative (judged or mined)."""
    from flywheel.lib.training.losses import bi_encoder_loss

    if cfg.query_only:
        return bi_encoder_loss(model, cfg, corpus=corpus.vectors, targets=data.targets, masked=data.masked, soft=data.soft)
    return bi_encoder_loss(model, cfg)


def planned_steps(cfg: TrainConfig, rows: int) -> int:
    """Optimizer steps the settings ask for (``max_steps`` when set, else epochs over the rows)."""
    s = cfg.settings
    per_epoch = max(1, -(-rows // s.batch_size))
    return s.max_steps if s.max_steps > 0 else max(1, int(round(per_epoch * s.epochs)))


def training_args(cfg: TrainConfig, max_steps: int, planned: int, evaluator=None):
    """No duplicate texts in a batch (a positive must never be another row's negative); evaluate
    a few times, keep the best checkpoint (early stopping decides when to stop)."""
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    s = cfg.settings
    evaluate = evaluator is not None
    eval_steps = max(1, planned // max(cfg.evaluations, 1))
    return SentenceTransformerTrainingArguments(
        output_dir=str(cfg.checkpoint_dir), num_train_epochs=s.epochs, max_steps=max_steps,
        per_device_train_batch_size=s.batch_size, learning_rate=s.learning_rate, warmup_steps=cfg.warmup,
        batch_sampler=BatchSamplers.NO_DUPLICATES, router_mapping={"anchor": "query"} if cfg.query_only else None,
        eval_strategy="steps" if evaluate else "no", save_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps, save_steps=eval_steps, save_total_limit=2, load_best_model_at_end=evaluate,
        metric_for_best_model=f"eval_{evaluator.primary_metric}" if evaluate else None, greater_is_better=True,
        logging_steps=max(1, planned // 10), report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=index.resolve_device(s.device) == "cpu", disable_tqdm=True,
        bf16=training_bf16(s.precision, index.resolve_device(s.device)),
    )


def probe_seconds_per_step(model, cfg: TrainConfig, data: TrainingData, corpus, probe_steps: int = 3) -> float:
    """Seconds per optimizer step, measured on a throwaway copy of the model (steps 2..n)."""
    import copy

    from sentence_transformers import SentenceTransformerTrainer

    from flywheel.lib.training.callbacks import StepTimer, progress_lines

    timer = StepTimer()
    probe_model = copy.deepcopy(model)
    trainer = SentenceTransformerTrainer(
        model=probe_model, args=training_args(cfg, probe_steps, probe_steps), train_dataset=data.dataset,
        loss=make_loss(probe_model, cfg, data, corpus),
    )
    progress_lines(trainer, timer).train()
    return timer.seconds_per_step


def fit_budget(cfg: TrainConfig, planned: int, per_step: float, eval_seconds: float, evaluations: int,
               say: Callable[[str], None]) -> tuple[int, float]:
    """(max_steps, estimated seconds): the planned steps, cut to fit the time budget when the
    estimate (measured seconds per step, plus the validation runs) exceeds it."""
    budget = cfg.settings.time_budget_s
    estimate = per_step * planned + eval_seconds * evaluations
    if estimate <= budget:
        say(f"train: estimated {estimate:.0f}s for {planned} steps (budget {budget:.0f}s)")
        return planned, estimate
    steps = max(1, int((budget - eval_seconds * evaluations) / per_step))
    say(f"train: estimated {estimate:.0f}s for {planned} steps exceeds the {budget:.0f}s budget: cut to {steps} steps")
    return steps, estimate


def run_trainer(model, cfg: TrainConfig, data: TrainingData, corpus, evaluator, max_steps: int, planned: int,
                say: Callable[[str], None]):
    """Train with progress lines (no bars, no raw log dicts) and early stopping; the trainer."""
    from sentence_transformers import SentenceTransformerTrainer
    from transformers import EarlyStoppingCallback

    from flywheel.lib.training.callbacks import ProgressLinesCallback, progress_lines

    callbacks = [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)] if evaluator else []
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args(cfg, max_steps, planned, evaluator), train_dataset=data.dataset,
        loss=make_loss(model, cfg, data, corpus), evaluator=evaluator, callbacks=callbacks,
    )
    progress_lines(trainer, ProgressLinesCallback("train", say, budget_s=cfg.settings.time_budget_s)).train()
    return trainer


def histories(trainer) -> tuple[list[dict], list[dict]]:
    """(losses, validation evaluations) per logged step, from the trainer's log history."""
    log = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"], "epoch": h.get("epoch")} for h in log if "loss" in h]
    evals = [
        {"step": h["step"], "epoch": h.get("epoch"), **{k: v for k, v in h.items() if k.startswith("eval_validation")}}
        for h in log if any(k.startswith("eval_validation") for k in h)
    ]
    return losses, evals


def best_step(trainer) -> int | None:
    checkpoint = trainer.state.best_model_checkpoint
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def save_model(model, cfg: TrainConfig, result: TrainResult) -> None:
    """Save as files (the model is logged to MLflow from these files, never pickled), with the
    run's config and figures beside it; a query-only model records whose documents it reads."""
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    if cfg.query_only:
        write_towers_file(out, cfg.base_model)
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    (out / TRAINING_FILE).write_text(json.dumps(
        {"config": cfg.params(), **result.summary(), "eval_history": result.eval_history}, indent=2, default=str
    ))


def evaluate_base(model, evaluator, general, say: Callable[[str], None]) -> tuple[dict, float, float]:
    """(validation metrics, seconds one validation takes, general-slice NDCG@10) of the base."""
    from flywheel.lib.training import forgetting
    from flywheel.lib.training.evaluators import primary_value

    started = time.monotonic()
    before = evaluator(model) if evaluator else {}
    seconds = time.monotonic() - started
    general_before = forgetting.ndcg10(general, model)
    say(f"base: validation NDCG@10 {primary_value(before, evaluator):.4f}, general NDCG@10 {general_before:.4f}")
    return before, seconds, general_before


def _check_inputs(rows: pd.DataFrame, cfg: TrainConfig, corpus: CorpusEmbeddings | None) -> None:
    """Refuse to start without training rows, or the corpus loss without the corpus embeddings."""
    if rows.empty:
        raise ValueError("no training rows: nothing to train on")
    if cfg.query_only and corpus is None:
        raise ValueError("loss 'corpus' needs the base model's corpus embeddings (corpus=CorpusEmbeddings(...))")


def _plan(model, cfg: TrainConfig, data: TrainingData, corpus, evaluator, eval_seconds: float,
          say: Callable[[str], None]) -> tuple[int, int, float]:
    """(planned steps, max steps within the time budget, estimated seconds)."""
    planned = planned_steps(cfg, len(data.dataset))
    per_step = probe_seconds_per_step(model, cfg, data, corpus)
    n_evals = min(cfg.evaluations, planned) if evaluator else 0
    max_steps, estimate = fit_budget(cfg, planned, per_step, eval_seconds, n_evals, say)
    return planned, max_steps, estimate


def _merge_guard_and_evaluate(model, cfg: TrainConfig, evaluator, general, general_before: float,
                              train_seconds: float, say: Callable[[str], None]):
    """Merge with the base (WiSE-FT), merge further if the general slice forgot too much, then
    validate again: (the merge, the guard's outcome, validation metrics after training)."""
    from flywheel.lib.training import forgetting
    from flywheel.lib.training.evaluators import primary_value

    s = cfg.settings
    score = (lambda m: primary_value(evaluator(m), evaluator)) if evaluator else None  # noqa: E731
    merge = forgetting.wise_ft(model, cfg.base_model, s.wise_ft_alpha, score, say=say)
    guarded = forgetting.guard(model, cfg.base_model, general, general_before,
                               margin=s.forgetting_margin, alpha=s.merge_alpha, say=say)
    after = evaluator(model) if evaluator else {}
    say(f"trained: validation NDCG@10 {primary_value(after, evaluator):.4f}, "
        f"general NDCG@10 {guarded.after:.4f}, {train_seconds:.0f}s")
    return merge, guarded, after


def train_bi_encoder(
    rows: pd.DataFrame,
    cfg: TrainConfig,
    *,
    corpus: CorpusEmbeddings | None = None,
    related: dict[str, set[str]] | None = None,
    grades: dict[str, dict[str, int]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.base_model`` on rows with query, query_key, positive(_id), negative(_id).

    The ``corpus`` loss also needs ``corpus`` (the base's corpus embeddings, as served) and takes
    ``related`` (query_key -> chunk ids judged relevant or related) to keep them out of its
    negatives, or ``grades`` (query_key -> {chunk_id: grade}) for its graded targets."""
    from flywheel.lib.training import forgetting

    say = progress or (lambda _m: None)
    _check_inputs(rows, cfg, corpus)
    index.set_torch_threads()
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)

    # 1. Model, 2. data and validation (held-out training queries; the general-domain slice)
    model = load_model(cfg)
    data = prepare_data(rows, cfg, corpus, related, say, grades)
    set_widget_examples(model, data.train_df)
    evaluator = make_evaluator(data, cfg, corpus, related)
    general = forgetting.general_evaluator(forgetting.load_general_pairs())

    # 3. Evaluate the base (this also names the evaluator's primary metric for the trainer)
    before, eval_seconds, general_before = evaluate_base(model, evaluator, general, say)

    # 4. Plan: steps from the settings, cut to the time budget by the measured cost of a step
    planned, max_steps, estimate = _plan(model, cfg, data, corpus, evaluator, eval_seconds, say)

    # 5. Train (the loss: a softmax over the corpus, or in-batch plus hard negatives; see losses.py)
    started = time.monotonic()
    trainer = run_trainer(model, cfg, data, corpus, evaluator, max_steps, planned, say)
    train_seconds = time.monotonic() - started

    # 6. Merge with the base (WiSE-FT), guard against forgetting (merge further), evaluate again
    merge, guarded, after = _merge_guard_and_evaluate(model, cfg, evaluator, general, general_before,
                                                      train_seconds, say)

    # 7. Save as files, with what this run measured
    losses, evals = histories(trainer)
    result = TrainResult(
        model_dir=Path(cfg.output_dir), train_rows=len(data.train_df), validation_rows=len(data.val_df),
        steps=trainer.state.global_step, planned_steps=planned, train_seconds=train_seconds,
        estimated_seconds=estimate, validation_before={k: float(v) for k, v in before.items()},
        validation_after={k: float(v) for k, v in after.items()}, general_before=general_before,
        general_after=guarded.after, general_finetuned=guarded.finetuned, merged=guarded.merged,
        best_step=best_step(trainer), loss_history=losses, eval_history=evals,
        merge_alpha=merge.alpha, validation_unmerged=merge.validation_finetuned,
    )
    save_model(model, cfg, result)
    return result
