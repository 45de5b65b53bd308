"""Fine-tune the bi-encoder on the week's (query, positive, hard negative) triplets.

Reads like sentence-transformers' own training examples: model, data, loss, arguments,
evaluate the base, train, evaluate again, save.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from flywheel.lib import index
from flywheel.lib.judging import stable_uniform

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    base_model: str
    output_dir: Path
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_seq_length: int = 128
    warmup: float = 0.1
    max_steps: int = -1
    validation_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    shuffle_labels: bool = False  # a deliberately broken run, for showing the gate say no

    def params(self) -> dict:
        d = asdict(self)
        d["output_dir"] = str(d["output_dir"])
        return d


@dataclass
class TrainResult:
    model_dir: Path
    train_rows: int
    validation_rows: int
    steps: int
    train_seconds: float
    validation_before: dict
    validation_after: dict
    loss_history: list = field(default_factory=list)


def split_validation(df: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole training queries (never eval-set or test queries) for validation."""
    held = df["query_key"].map(lambda k: stable_uniform("validation", seed, k) < fraction)
    return df[~held].reset_index(drop=True), df[held].reset_index(drop=True)


def shuffled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Pair every query with another query's positive: labels that carry no signal."""
    out = df.copy()
    out["positive"] = df["positive"].sample(frac=1.0, random_state=seed).to_numpy()
    return out


def train_bi_encoder(
    finetune_set: pd.DataFrame, cfg: TrainConfig, *, progress: Callable[[str], None] | None = None
) -> TrainResult:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.evaluation import TripletEvaluator
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    if finetune_set.empty:
        raise ValueError("finetune_set is empty: nothing to train on")
    index.set_torch_threads()

    # 1. Model: the configured base, from a local folder
    model = index.load_embedder(cfg.base_model, device=cfg.device, max_seq_length=cfg.max_seq_length)

    # 2. Data: triplets, with whole queries held out for validation
    train_df, val_df = split_validation(finetune_set, cfg.validation_fraction, cfg.seed)
    if cfg.shuffle_labels:
        train_df = shuffled(train_df, cfg.seed)
    columns = ["query", "positive", "negative"]
    train_ds = Dataset.from_pandas(train_df[columns].rename(columns={"query": "anchor"}), preserve_index=False)
    evaluator = None
    if len(val_df):
        evaluator = TripletEvaluator(
            anchors=val_df["query"].tolist(),
            positives=val_df["positive"].tolist(),
            negatives=val_df["negative"].tolist(),
            name="validation",
        )

    # 3. Loss: in-batch negatives plus the judged hard negative of each row
    loss = MultipleNegativesRankingLoss(model)

    # 4. Arguments: no duplicate texts in a batch, or a positive could be another row's negative
    checkpoint_dir = Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + ".checkpoints")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(1, len(train_ds) // cfg.batch_size // 10),
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=index.resolve_device(cfg.device) == "cpu",
        disable_tqdm=True,
    )

    class _Progress(TrainerCallback):
        def __init__(self):
            self.start = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress and state.max_steps:
                elapsed = time.monotonic() - self.start
                left = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
                progress(
                    f"train: step {state.global_step}/{state.max_steps}, loss {logs.get('loss', float('nan')):.4f}, "
                    f"{state.global_step / max(elapsed, 1e-9):.2f} steps/s, ~{left:.0f}s left"
                )

    # 5. Evaluate the base model
    before = evaluator(model) if evaluator else {}

    # 6. Train
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train_ds, loss=loss, callbacks=[_Progress()]
    )
    started = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - started

    # 7. Evaluate again
    after = evaluator(model) if evaluator else {}

    # 8. Save as files (the model is logged to MLflow from these files, never pickled)
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    (out / "flywheel_training.json").write_text(json.dumps({
        "config": cfg.params(), "train_rows": len(train_df), "validation_rows": len(val_df),
        "validation_before": before, "validation_after": after,
    }, indent=2, default=str))
    losses = [
        {"step": h["step"], "loss": h["loss"], "epoch": h.get("epoch")}
        for h in trainer.state.log_history if "loss" in h
    ]
    return TrainResult(
        model_dir=out,
        train_rows=len(train_df),
        validation_rows=len(val_df),
        steps=trainer.state.global_step,
        train_seconds=train_seconds,
        validation_before={k: float(v) for k, v in before.items()},
        validation_after={k: float(v) for k, v in after.items()},
        loss_history=losses,
    )
