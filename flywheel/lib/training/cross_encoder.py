"""Fine-tune the cross-encoder reranker on the same labelled rows as the bi-encoder.

It starts from a local MiniLM folder (the base, or the week's fine-tuned embedder, which already
knows the domain): sentence-transformers' ``CrossEncoder`` adds a fresh one-logit head on top of
the encoder. That head learns at its own, higher rate (``head_learning_rate``; see
:func:`head_optimizer`). Three losses (``RerankerSettings.loss``):

- ``listwise``: each (query, positive, hard negative) row scored against its negative and
  ``num_negatives`` in-batch ones, cross-entropy over the list (sentence-transformers'
  cross-encoder MultipleNegativesRankingLoss).
- ``bce``: (query, chunk, 1/0) pairs, positives 1 and hard negatives 0, binary cross-entropy with
  positives up-weighted by the class ratio.
- ``graded``: each training query's judged list (:func:`graded_lists`) with the judge's grades 0-3
  as targets, through sentence-transformers' cross-encoder ``ListNetLoss``: cross-entropy between
  the softmax of the scores and the softmax of the grades (Cao et al., ICML 2007, "Learning to
  Rank: From Pairwise Approach to Listwise Approach"). A "perfect" chunk should outscore a
  "relevant" one, a "related" one sit between relevant and irrelevant: the other two losses see
  only relevant vs irrelevant and never see a related chunk at all. (sentence-transformers'
  ``LambdaLoss`` takes the same lists; at this project's step budget it learned less.)

Scoring with a trained reranker (``load_reranker``, ``rerank``) lives in ``reranker.py``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from flywheel.config import RerankerSettings, TrainingSettings
from flywheel.lib.datasets.tiers import latest_usable
from flywheel.lib.labels.judges import stable_uniform
from flywheel.lib.registry import index
from flywheel.lib.registry.inference import training_bf16

RERANKER_FILE = "flywheel_reranker.json"


@dataclass
class RerankerConfig:
    """One reranker run: the reranker settings, the training settings it shares (device,
    shuffled labels) and what belongs to this run."""

    settings: RerankerSettings
    training: TrainingSettings
    base_model: str
    output_dir: Path
    seed: int
    # weights to start from (None: base_model); only the one-logit head is new either way
    init_model: str | None = None
    warmup: float = 0.1  # share of the steps spent warming the learning rate up

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir).with_name(Path(self.output_dir).name + ".checkpoints")

    def params(self) -> dict:
        run = {k: v for k, v in asdict(self).items() if k not in ("settings", "training")}
        t = self.training
        return {**self.settings.model_dump(mode="json"), "device": t.device, "shuffle_labels": t.shuffle_labels,
                "bf16": training_bf16(t.precision, index.resolve_device(t.device)), **run,
                "output_dir": str(self.output_dir)}


@dataclass
class RerankerResult:
    model_dir: Path
    train_pairs: int
    positives: int
    negatives: int
    steps: int
    train_seconds: float
    loss_history: list = field(default_factory=list)
    examples: int = 0  # the trainer's dataset rows: triples, pairs, or (graded) one list per query
    warmup_lists: int = 0  # inverse-cloze lists learned first (InverseClozeLists), and its steps and time
    warmup_steps: int = 0
    warmup_seconds: float = 0.0


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


def listwise_rows(rows: pd.DataFrame, seed: int, shuffle_labels: bool = False) -> pd.DataFrame:
    """(query, positive, negative) rows in a stable seeded order (positives shuffled on request)."""
    triples = rows[["query", "positive", "negative"]]
    if shuffle_labels:
        triples = triples.assign(positive=triples["positive"].sample(frac=1.0, random_state=seed).to_numpy())
    order = [stable_uniform("rerank-rows", seed, q, p, n) for q, p, n in triples.itertuples(index=False)]
    return triples.assign(_o=order).sort_values("_o").drop(columns="_o").reset_index(drop=True)


def graded_lists(rows: pd.DataFrame, judged: pd.DataFrame, *, list_size: int, seed: int,
                 shuffle_labels: bool = False) -> tuple[pd.DataFrame, int]:
    """(query, docs, labels) per training query, and how many queries had nothing to rank.

    The queries are the training rows' own (so held-out queries never enter). Each list holds the
    query's judged chunks graded >= 1 (highest grade first), then its grade-0 chunks, best-ranked
    (hardest) first: judged ones, then the rows' mined negatives, up to ``list_size``. A list
    whose chunks all share one grade teaches a ranking loss nothing and is left out (counted).
    ``judged``: every judged pair to date (query_key, chunk_id, chunk_text, grade, rank, week).
    """
    keys = rows.drop_duplicates("query_key").set_index("query_key")["query"]
    pool = latest_usable(judged)
    pool = pool[pool["query_key"].isin(keys.index)]
    pool = pool.assign(grade=pool["grade"].astype(int), rank=pd.to_numeric(pool["rank"], errors="coerce"))
    mined = rows[["query_key", "negative_id", "negative"]].rename(columns={"negative_id": "chunk_id", "negative": "chunk_text"})
    mined = mined.assign(grade=0, rank=float("inf"), _mined=1)
    everything = pd.concat([pool[["query_key", "chunk_id", "chunk_text", "grade", "rank"]].assign(_mined=0), mined],
                           ignore_index=True)
    everything = everything.drop_duplicates(["query_key", "chunk_id"], keep="first")  # a judged grade wins
    everything["_r"] = everything["rank"].fillna(float("inf"))
    out, flat, skipped = [], [], 0
    for key, group in everything.groupby("query_key", sort=True):
        graded = group[group["grade"] >= 1].sort_values(["grade", "_r", "chunk_id"], ascending=[False, True, True])
        zeros = group[group["grade"] == 0].sort_values(["_mined", "_r", "chunk_id"])
        chosen = pd.concat([graded.head(list_size - 1), zeros]).head(list_size)
        if chosen["grade"].nunique() < 2:
            skipped += 1
            continue
        out.append({"query": keys[key], "docs": chosen["chunk_text"].tolist(),
                    "labels": [float(g) for g in chosen["grade"]]})
        flat.extend(out[-1]["labels"])
    lists = pd.DataFrame(out, columns=["query", "docs", "labels"])
    if shuffle_labels and len(lists):
        permuted = iter(np.random.default_rng(seed).permutation(np.array(flat)).tolist())
        lists["labels"] = [[next(permuted) for _ in labels] for labels in lists["labels"]]
    order = [stable_uniform("rerank-lists", seed, q) for q in lists["query"]]
    return lists.assign(_o=order).sort_values("_o").drop(columns="_o").reset_index(drop=True), skipped


class InverseClozeLists:
    """Ranking lists made from the corpus alone, for the cross-encoder to learn before the judged rows.

    The inverse cloze task (Lee, Chang and Toutanova, ACL 2019, "Latent Retrieval for Weakly
    Supervised Open Domain Question Answering"): a sentence taken out of a chunk is a query, and the
    rest of that chunk is its positive. Its negatives are BM25's best hits for the sentence among the
    other chunks, so the cross-encoder learns to tell the chunk a statement comes from from chunks
    that merely share its words. A new scoring head learns from a few hundred judged lists; these
    lists cost no judge call and give it the domain's vocabulary first.

    - A chunk's first sentence (its title, where the chunk has one) is never the query, and
      sentences shorter than ``min_words`` are not either.
    - The positive is graded ``POSITIVE_GRADE``, as a "perfect" judged chunk; the negatives 0.
    - Chunks are drawn by a seeded permutation, one sentence each, until ``n`` lists are made; a
      chunk with no such sentence, or whose sentence BM25 finds nothing else for, is passed over.
    """

    POSITIVE_GRADE = 3.0

    def __init__(self, corpus, search: Callable[[Sequence[str], int], list], *, list_size: int,
                 min_words: int = 8):
        self.corpus, self.search, self.list_size, self.min_words = corpus, search, list_size, min_words

    def build(self, n: int, seed: int) -> pd.DataFrame:
        """Up to ``n`` lists: (query, docs, labels), the positive first."""
        columns = ["query", "docs", "labels"]
        if n <= 0:
            return pd.DataFrame(columns=columns)
        rng = np.random.default_rng(seed)
        ids, texts = self.corpus.ids, self.corpus.texts
        queries, sources, positives = [], [], []
        for i in rng.permutation(len(ids)):
            sentences = index.split_sentences(texts[i])
            eligible = [k for k in range(1, len(sentences)) if len(sentences[k].split()) >= self.min_words]
            if not eligible:
                continue
            k = eligible[int(rng.integers(len(eligible)))]
            queries.append(sentences[k])
            sources.append(int(i))
            positives.append(" ".join(sentences[:k] + sentences[k + 1:]))
            if len(queries) == n:
                break
        out, text = [], self.corpus.text_by_id
        for query, i, positive, hits in zip(queries, sources, positives, self.search(queries, self.list_size + 4)):
            # the source chunk, and any copy of it elsewhere in the corpus, is no negative
            negatives = [text[j] for j, _ in hits if j != ids[i] and text[j] != texts[i]][: self.list_size - 1]
            if negatives:
                out.append({"query": query, "docs": [positive, *negatives],
                            "labels": [self.POSITIVE_GRADE] + [0.0] * len(negatives)})
        return pd.DataFrame(out, columns=columns)


def rows_per_step(s: RerankerSettings) -> int:
    """Dataset rows per optimizer step: queries (each a list) for the graded loss, rows otherwise."""
    return s.graded_queries_per_step if s.loss == "graded" else s.batch_size


def load_model(cfg: RerankerConfig):
    """A local encoder with a fresh one-logit head (a query/document Router model starts the
    cross-encoder from its query-side transformer)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    logging.getLogger("sentence_transformers.cross_encoder.model").setLevel(logging.ERROR)  # "the head is new"
    start = str(index.transformer_dir(cfg.init_model)) if cfg.init_model else cfg.base_model
    device = index.resolve_device(cfg.training.device)
    # on a CPU, the default attention (sdpa) runs its backward pass through a flash-attention kernel
    # that is slow there; the eager attention computes the same scores and trains faster
    eager = {"model_kwargs": {"attn_implementation": "eager"}} if device == "cpu" else {}
    return CrossEncoder(start, num_labels=1, max_length=cfg.settings.max_length, device=device,
                        local_files_only=True, **eager)


def focused(model, cfg: RerankerConfig, queries, passages):
    """``passages`` (one list per query) as the cross-encoder reads them (``RerankerSettings.passages``):
    unchanged for ``head``, else each query's list through ``focused_passages``, as reranking does."""
    from flywheel.lib.training.reranker import focused_passages

    if cfg.settings.passages == "head":
        return [list(p) for p in passages]
    return [focused_passages(q, list(p), model.tokenizer, cfg.settings.max_length) for q, p in zip(queries, passages)]


def dataset_and_loss(model, rows: pd.DataFrame, pairs: pd.DataFrame, cfg: RerankerConfig,
                     judged: pd.DataFrame | None = None):
    """The trainer's dataset and the loss ``cfg.settings.loss`` names (``graded`` needs ``judged``);
    every passage as the cross-encoder will read it when reranking (:func:`focused`)."""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder.losses import (
        BinaryCrossEntropyLoss, ListNetLoss, MultipleNegativesRankingLoss,
    )

    loss = cfg.settings.loss
    if loss == "bce":
        n_pos = int((pairs["label"] == 1).sum())
        n_neg = len(pairs) - n_pos
        queries, lists = zip(*[(q, g.tolist()) for q, g in pairs.groupby("query", sort=False)["text"]])
        texts = dict(zip(queries, focused(model, cfg, queries, lists)))
        position = pairs.groupby("query", sort=False).cumcount()
        pairs = pairs.assign(text=[texts[q][i] for q, i in zip(pairs["query"], position)])
        ds = Dataset.from_dict({c: pairs[c].tolist() for c in ("query", "text", "label")})
        return ds, BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(max(n_neg, 1) / max(n_pos, 1)))
    if loss == "listwise":
        triples = listwise_rows(rows, cfg.seed, cfg.training.shuffle_labels)
        both = focused(model, cfg, triples["query"], zip(triples["positive"], triples["negative"]))
        triples = triples.assign(positive=[b[0] for b in both], negative=[b[1] for b in both])
        ds = Dataset.from_dict({c: triples[c].tolist() for c in ("query", "positive", "negative")})
        return ds, MultipleNegativesRankingLoss(model, num_negatives=cfg.settings.num_negatives)
    if loss == "graded":
        if judged is None:
            raise ValueError("FLYWHEEL_RERANKER_LOSS=graded needs the judged labels (relevance_labels to date)")
        lists, _ = graded_lists(rows, judged, list_size=cfg.settings.list_size, seed=cfg.seed,
                                shuffle_labels=cfg.training.shuffle_labels)
        if lists.empty:
            raise ValueError("FLYWHEEL_RERANKER_LOSS=graded: no training query has chunks of two different grades")
        lists = lists.assign(docs=focused(model, cfg, lists["query"], lists["docs"]))
        ds = Dataset.from_dict({c: lists[c].tolist() for c in ("query", "docs", "labels")})
        # every pair of a step in one forward pass (a step is graded_queries_per_step x list_size pairs):
        # -1 is ListNetLoss's documented "the whole batch at once"; it reads 0 as unset, and then splits
        # a step into forward passes of as many pairs as the step has queries
        return ds, ListNetLoss(model, mini_batch_size=-1)
    raise ValueError(f"unknown reranker loss {loss!r}: use 'bce', 'listwise' or 'graded'")


def is_head(name: str) -> bool:
    """The new scoring head's parameters (classifier, and the pooler under it)."""
    return name.startswith(("classifier", "bert.pooler", "pooler")) or ".pooler." in name or "classifier" in name


def main_steps(cfg: RerankerConfig, n_examples: int) -> int:
    """Optimizer steps of the training on the judged rows (as the trainer counts them)."""
    s = cfg.settings
    return s.max_steps if s.max_steps > 0 else max(1, math.ceil(n_examples / rows_per_step(s) * s.epochs))


def head_optimizer(model, cfg: RerankerConfig, n_examples: int) -> dict:
    """AdamW with the new head at ``head_learning_rate``, the encoder at ``learning_rate``; linear
    warmup and decay over the run, like the trainer's own default ({} when the model has no head)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    s = cfg.settings
    named = list(model.model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not is_head(n)], "lr": s.learning_rate},
        {"params": [p for n, p in named if is_head(n)], "lr": s.head_learning_rate},
    ]
    if not groups[1]["params"]:
        return {}
    steps = main_steps(cfg, n_examples)
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    return {"optimizers": (optimizer, get_linear_schedule_with_warmup(optimizer, warmup, steps))}


def training_args(cfg: RerankerConfig, n_examples: int):
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    s = cfg.settings
    device = index.resolve_device(cfg.training.device)
    return CrossEncoderTrainingArguments(
        output_dir=str(cfg.checkpoint_dir), num_train_epochs=s.epochs, max_steps=s.max_steps,
        per_device_train_batch_size=rows_per_step(s), learning_rate=s.learning_rate, warmup_steps=cfg.warmup,
        save_strategy="no", eval_strategy="no", logging_steps=max(1, n_examples // rows_per_step(s) // 10),
        report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=device == "cpu", disable_tqdm=True, bf16=training_bf16(cfg.training.precision, device),
    )


def warm_up(model, lists: pd.DataFrame, cfg: RerankerConfig, steps: int,
            progress: Callable[[str], None] | None = None) -> tuple[int, float]:
    """ListNet over the corpus's inverse-cloze lists (:class:`InverseClozeLists`), ``steps`` at most
    and one pass at most, each passage as reranking reads it; the judged rows' training continues
    from these weights, its head included. Returns (steps, seconds)."""
    from dataclasses import replace

    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    from flywheel.lib.training.callbacks import ProgressLinesCallback, progress_lines

    s = cfg.settings
    steps = min(steps, math.ceil(len(lists) / s.graded_queries_per_step))
    phase = replace(cfg, settings=s.with_(loss="graded", max_steps=steps))
    lists = lists.assign(docs=focused(model, phase, lists["query"], lists["docs"]))
    ds = Dataset.from_dict({c: lists[c].tolist() for c in ("query", "docs", "labels")})
    trainer = CrossEncoderTrainer(model=model, args=training_args(phase, len(ds)), train_dataset=ds,
                                  loss=ListNetLoss(model, mini_batch_size=-1), **head_optimizer(model, phase, len(ds)))
    progress_lines(trainer, ProgressLinesCallback("reranker warm-up", progress, estimate_after=0))
    started = time.monotonic()
    trainer.train()
    return trainer.state.global_step, time.monotonic() - started


def save_model(model, cfg: RerankerConfig, result: RerankerResult, examples: int) -> None:
    """Save as files, with the run's config and counts beside them."""
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    (out / RERANKER_FILE).write_text(json.dumps({
        "config": cfg.params(), "train_examples": examples, "train_pairs": result.train_pairs,
        "positives": result.positives, "negatives": result.negatives, "train_seconds": result.train_seconds,
        "warmup_lists": result.warmup_lists, "warmup_steps": result.warmup_steps,
        "warmup_seconds": result.warmup_seconds,
    }, indent=2, default=str))


def train_reranker(rows: pd.DataFrame, cfg: RerankerConfig, *, judged: pd.DataFrame | None = None,
                   warmup: pd.DataFrame | None = None,
                   progress: Callable[[str], None] | None = None) -> RerankerResult:
    """Fine-tune a cross-encoder on training rows (query, positive(_id), negative(_id)); the graded
    loss also reads ``judged``, every judged pair to date (relevance_labels). ``warmup``: lists
    (query, docs, labels) learned first (:class:`InverseClozeLists`; None or empty: none)."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer

    from flywheel.lib.training.callbacks import ProgressLinesCallback, progress_lines

    if rows.empty:
        raise ValueError("no training rows: nothing to train the reranker on")
    index.set_torch_threads()

    # 1. Model: an encoder with a fresh one-logit head
    model = load_model(cfg)
    # 2. Data and 3. loss
    pairs = labelled_pairs(rows, cfg.seed, cfg.training.shuffle_labels)
    n_pos = int((pairs["label"] == 1).sum())
    ds, loss = dataset_and_loss(model, rows, pairs, cfg, judged)
    # 4. Warm-up: the corpus's inverse-cloze lists, at most as many steps as the judged rows get
    warmup_steps, warmup_seconds = 0, 0.0
    if warmup is not None and len(warmup):
        warmup_steps, warmup_seconds = warm_up(model, warmup, cfg, main_steps(cfg, len(ds)), progress)
    # 5. Arguments, and the optimizer that gives the head its own learning rate
    trainer = CrossEncoderTrainer(model=model, args=training_args(cfg, len(ds)), train_dataset=ds, loss=loss,
                                  **head_optimizer(model, cfg, len(ds)))
    progress_lines(trainer, ProgressLinesCallback("reranker", progress, estimate_after=0))
    # 6. Train on the judged rows
    started = time.monotonic()
    trainer.train()
    result = RerankerResult(
        model_dir=Path(cfg.output_dir), train_pairs=len(pairs), positives=n_pos, negatives=len(pairs) - n_pos,
        steps=trainer.state.global_step, train_seconds=time.monotonic() - started, examples=len(ds),
        loss_history=[{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        warmup_lists=len(warmup) if warmup_steps else 0, warmup_steps=warmup_steps, warmup_seconds=warmup_seconds,
    )
    # 7. Save as files
    save_model(model, cfg, result, len(ds))
    return result
