"""A cross-encoder reranker fine-tuned on the same labelled pairs as the bi-encoder.

It starts from the local MiniLM folder: sentence-transformers' ``CrossEncoder`` adds a fresh
one-logit head on top of the encoder (it warns that the head is new). That head needs a higher
learning rate than the encoder usually gets (1e-4; 2e-5 stayed at chance, see FIELD-NOTES) and
enough steps. Training pairs: each (query, positive) labelled 1 and each of its hard negatives
(judged or mined) labelled 0, BinaryCrossEntropyLoss. At search time it rescores the
bi-encoder's top ``rerank_depth`` (40) chunks.

Loading a trained reranker: ``CrossEncoder(<folder>, local_files_only=True)``, where the folder
is the model's own directory, or ``mlflow.artifacts.download_artifacts(run_id=..., artifact_path="reranker")``
for the copy logged in MLflow (see ``load_reranker``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from flywheel.lib.registry import index
from flywheel.lib.labels.judges import stable_uniform


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)


@dataclass
class RerankerConfig:
    base_model: str
    output_dir: Path
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    # the scoring head (and the pooler under it) is new: it learns at its own, higher rate.
    # Listwise loss after 40 steps of batch 8 on the demo's rows (chance: ln 3 = 1.099): all at
    # 1e-4: 1.06; encoder 1e-4 + head 2e-3: 0.92; all at 3e-4: 0.86; encoder 3e-4 + head 2e-3: 0.72-0.93
    head_learning_rate: float | None = 2e-3
    max_length: int = 128
    warmup: float = 0.1
    max_steps: int = -1
    rerank_depth: int = 40
    seed: int = 0
    device: str = "auto"
    shuffle_labels: bool = False
    # weights to start from (None: base_model). The week's fine-tuned embedder already knows the
    # domain; only the one-logit head is new either way.
    init_model: str | None = None
    # "bce": (query, chunk, 1/0) pairs, binary cross-entropy. "listwise": each (query, positive,
    # hard negative) row scored against its negative and ``num_negatives`` in-batch ones,
    # cross-entropy over the list (sentence-transformers' cross-encoder MNRL).
    loss: str = "bce"
    num_negatives: int = 1
    # how the cross-encoder's scores are used (see ``rerank``): "zscore" blends them with the
    # bi-encoder's, "rrf" fuses the two orders by reciprocal rank, "none" takes the cross-encoder alone
    fusion: str = "rrf"
    fusion_weight: float = 0.5  # the cross-encoder's share in "zscore" fusion

    def params(self) -> dict:
        d = asdict(self)
        d["output_dir"] = str(d["output_dir"])
        return d


@dataclass
class RerankerResult:
    model_dir: Path
    train_pairs: int
    positives: int
    negatives: int
    steps: int
    train_seconds: float
    loss_history: list = field(default_factory=list)


def labelled_pairs(rows: pd.DataFrame, seed: int, shuffle_labels: bool = False) -> pd.DataFrame:
    """(query, text, label) from training rows: positives 1, hard negatives 0, deduplicated."""
    pos = rows[["query", "positive_id", "positive"]].rename(columns={"positive_id": "chunk_id", "positive": "text"})
    neg = rows[["query", "negative_id", "negative"]].rename(columns={"negative_id": "chunk_id", "negative": "text"})
    pairs = pd.concat([pos.assign(label=1.0), neg.assign(label=0.0)], ignore_index=True)
    # a chunk that is a positive for the query is never also its negative
    pairs = pairs.sort_values("label", ascending=False).drop_duplicates(["query", "chunk_id"]).reset_index(drop=True)
    if shuffle_labels:
        pairs["label"] = pairs["label"].sample(frac=1.0, random_state=seed).to_numpy()
    order = [stable_uniform("rerank-pairs", seed, q, c) for q, c in zip(pairs["query"], pairs["chunk_id"])]
    return pairs.assign(_o=order).sort_values("_o").drop(columns="_o").reset_index(drop=True)


def load_reranker(path: str | Path, *, device: str = "auto", max_length: int | None = None, precision: str = "fp32"):
    """A trained CrossEncoder for inference; ``precision`` as in ``flywheel.lib.registry.inference``."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from flywheel.lib.registry.inference import apply_precision

    device = index.resolve_device(device)
    model = CrossEncoder(str(path), device=device, local_files_only=True, max_length=max_length)
    return apply_precision(model, precision, device)


def train_reranker(
    rows: pd.DataFrame, cfg: RerankerConfig, *, progress: Callable[[str], None] | None = None
) -> RerankerResult:
    import logging

    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    say = progress or (lambda _m: None)
    if rows.empty:
        raise ValueError("no training rows: nothing to train the reranker on")
    index.set_torch_threads()

    # 1. Model: a local encoder with a fresh one-logit head (the "head is new" warning is expected)
    logging.getLogger("sentence_transformers.cross_encoder.model").setLevel(logging.ERROR)
    # (a query/document Router model starts the cross-encoder from its query-side transformer)
    model = CrossEncoder(
        str(index.transformer_dir(cfg.init_model)) if cfg.init_model else cfg.base_model, num_labels=1, max_length=cfg.max_length,
        device=index.resolve_device(cfg.device), local_files_only=True,
    )

    # 2. Data and 3. loss
    pairs = labelled_pairs(rows, cfg.seed, cfg.shuffle_labels)
    n_pos = int((pairs["label"] == 1).sum())
    n_neg = len(pairs) - n_pos
    if cfg.loss == "bce":
        # (query, chunk, 1/0) pairs; binary cross-entropy, positives up-weighted by the class ratio
        import torch

        ds = Dataset.from_dict({"query": pairs["query"].tolist(), "text": pairs["text"].tolist(), "label": pairs["label"].tolist()})
        loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(max(n_neg, 1) / max(n_pos, 1)))
    elif cfg.loss == "listwise":
        # (query, positive, hard negative) rows: pick the positive out of its negatives
        from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

        triples = rows[["query", "positive", "negative"]]
        if cfg.shuffle_labels:
            triples = triples.assign(positive=triples["positive"].sample(frac=1.0, random_state=cfg.seed).to_numpy())
        order = [stable_uniform("rerank-rows", cfg.seed, q, p, n) for q, p, n in triples.itertuples(index=False)]
        triples = triples.assign(_o=order).sort_values("_o").drop(columns="_o")
        ds = Dataset.from_dict({c: triples[c].tolist() for c in ("query", "positive", "negative")})
        loss = MultipleNegativesRankingLoss(model, num_negatives=cfg.num_negatives)
    else:
        raise ValueError(f"unknown reranker loss {cfg.loss!r}: use 'bce' or 'listwise'")

    # 4. Arguments
    checkpoint_dir = Path(cfg.output_dir).with_name(Path(cfg.output_dir).name + ".checkpoints")
    args = CrossEncoderTrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=max(1, len(ds) // cfg.batch_size // 10),
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
            if state.max_steps and logs and "loss" in logs:
                elapsed = time.monotonic() - self.start
                left = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
                say(f"reranker: step {state.global_step}/{state.max_steps}, loss {logs['loss']:.4f}, ~{left:.0f}s left")

    # 5. Train
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss, callbacks=[_Progress()],
                                  **_head_optimizer(model, cfg, len(ds)))
    started = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - started

    # 6. Save as files
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    (out / "flywheel_reranker.json").write_text(json.dumps({
        "config": cfg.params(), "train_examples": len(ds), "train_pairs": len(pairs), "positives": n_pos, "negatives": n_neg,
        "train_seconds": train_seconds,
    }, indent=2, default=str))
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return RerankerResult(
        model_dir=out, train_pairs=len(pairs), positives=n_pos, negatives=n_neg,
        steps=trainer.state.global_step, train_seconds=train_seconds, loss_history=losses,
    )


def _head_optimizer(model, cfg: RerankerConfig, n_examples: int) -> dict:
    """AdamW with the new head (classifier, pooler) at ``head_learning_rate``, the encoder at
    ``learning_rate``; linear warmup and decay over the run, like the trainer's own default."""
    if not cfg.head_learning_rate:
        return {}
    import math

    import torch
    from transformers import get_linear_schedule_with_warmup

    def is_head(name: str) -> bool:
        return name.startswith(("classifier", "bert.pooler", "pooler")) or ".pooler." in name or "classifier" in name

    named = list(model.model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not is_head(n)], "lr": cfg.learning_rate},
        {"params": [p for n, p in named if is_head(n)], "lr": cfg.head_learning_rate},
    ]
    if not groups[1]["params"]:
        return {}
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(n_examples / cfg.batch_size * cfg.epochs))
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    return {"optimizers": (optimizer, get_linear_schedule_with_warmup(optimizer, warmup, steps))}


def rerank(
    model,
    queries: Mapping[str, str],
    rankings: Mapping[str, Sequence[str]],
    texts: Mapping[str, str],
    *,
    depth: int = 40,
    batch_size: int = 64,
    fusion: str = "rrf",
    bi_scores: Mapping[str, Sequence[float]] | None = None,
    fusion_weight: float = 0.5,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[str]], list[float]]:
    """Rescore each query's top ``depth`` with the cross-encoder; the rest keeps its order below.

    A cross-encoder trained on a few thousand pairs should correct the bi-encoder, not replace it:
    - ``"zscore"``: each list's scores are standardised per query (mean 0, sd 1) and blended,
      ``(1 - w) * z(bi-encoder) + w * z(cross-encoder)`` with ``w = fusion_weight``; needs
      ``bi_scores`` (the bi-encoder's scores, aligned with ``rankings``). Scores keep how sure
      each model is, which orders alone lose.
    - ``"rrf"``: 1/(60 + bi-encoder rank) + 1/(60 + cross-encoder rank) (reciprocal rank fusion).
    - ``"none"``: the cross-encoder's order alone.
    Returns the new rankings and the milliseconds each query's rerank took.
    """
    if fusion not in ("zscore", "rrf", "none"):
        raise ValueError(f"unknown fusion {fusion!r}: use 'zscore', 'rrf' or 'none'")
    if fusion == "zscore" and bi_scores is None:
        raise ValueError("zscore fusion needs the bi-encoder's scores (bi_scores)")
    out: dict[str, list[str]] = {}
    times: list[float] = []
    meter = index.RateLogger("rerank", len(queries), progress, every_s=30.0)
    for n, (qid, query) in enumerate(queries.items(), 1):
        ranked = list(rankings.get(qid, []))
        head, tail = ranked[:depth], ranked[depth:]
        started = time.perf_counter()
        if head:
            scores = np.asarray(model.predict([(query, texts[d]) for d in head], batch_size=batch_size, show_progress_bar=False))
            if fusion == "zscore":
                bi = np.asarray(list(bi_scores[qid])[:len(head)], dtype=np.float64)
                scores = (1.0 - fusion_weight) * _standardised(bi) + fusion_weight * _standardised(scores)
            elif fusion == "rrf":
                ce_rank = np.empty(len(head))
                ce_rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(head) + 1)
                scores = 1.0 / (RRF_K + np.arange(1, len(head) + 1)) + 1.0 / (RRF_K + ce_rank)
            order = np.argsort(-scores, kind="stable")
            head = [head[i] for i in order]
        times.append((time.perf_counter() - started) * 1000)
        out[qid] = head + tail
        meter.update(n, force=n == len(queries))
    return out, times


def _standardised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
