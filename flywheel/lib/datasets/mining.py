"""Hard negatives from two sources, and the training rows built from them.

1. Judged: chunks the app retrieved for a query and the judge graded 0 (already in finetune_set).
2. Mined: chunks the current model ranks high for the query over the whole corpus, found with
   sentence-transformers' ``mine_hard_negatives``, with a false-negative filter:
   - a candidate scoring within ``relative_margin`` of the query's positive is skipped (too close
     to call: often an unlabelled relevant chunk), and
   - a candidate the judge graded 1 or more for that query ("related" or relevant) is dropped.

Rows alternate the sources per (query, positive): the hardest judged negative first, then a mined
one, then the next judged one... so the row count (the "training examples") never grows.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from flywheel.config import TrainingSettings

log = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    """How deep to mine and what to skip. The first five come from the settings
    (``MiningConfig.from_settings``); the last two are the method's own constants."""

    range_max: int  # look this deep in the model's ranking
    relative_margin: float  # skip candidates scoring above (1 - margin) x the positive's score
    batch_size: int  # texts per encoding batch
    max_seq_length: int  # tokens per text while encoding for mining (the training length)
    device: str
    range_min: int = 0  # skip the first candidates (after the positives are removed)
    num_negatives: int = 3  # mined per (query, positive) before the judged-relevance filter

    @classmethod
    def from_settings(cls, s: TrainingSettings, **changes) -> "MiningConfig":
        fields = dict(range_max=s.mine_range_max, relative_margin=s.mine_relative_margin,
                      batch_size=s.encode_batch_size, max_seq_length=s.max_seq_length, device=s.device)
        return cls(**{**fields, **changes})


@dataclass
class NegativeStats:
    rows: int = 0
    judged_negatives: int = 0
    mined_negatives: int = 0
    mined_candidates: int = 0
    mined_dropped_judged_relevant: int = 0
    pairs_without_mined: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def mine(
    pairs: pd.DataFrame,
    model,
    corpus_ids: list[str],
    corpus_texts: list[str],
    judged: pd.DataFrame | None,
    cfg: MiningConfig,
    *,
    cache_folder: str | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Mined negatives per (query_key, positive_id): columns query_key, positive_id, negative_id, negative, mined_rank.

    ``pairs`` has query, query_key, positive_id, positive. ``judged`` has query_key, chunk_id, grade
    (every judged pair to date); any chunk graded >= 1 for a query is never its negative.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    pairs = pairs.drop_duplicates(["query_key", "positive_id"]).reset_index(drop=True)
    empty = pd.DataFrame(columns=["query_key", "positive_id", "negative_id", "negative", "mined_rank"])
    if pairs.empty:
        return empty, {"candidates": 0, "dropped_judged_relevant": 0}
    ds = Dataset.from_dict({"anchor": pairs["query"].tolist(), "positive": pairs["positive"].tolist()})
    mined = mine_hard_negatives(
        ds, model, anchor_column_name="anchor", positive_column_name="positive", corpus=list(corpus_texts),
        range_min=cfg.range_min, range_max=min(cfg.range_max, max(len(corpus_texts) - 2, 1)),
        relative_margin=cfg.relative_margin, num_negatives=cfg.num_negatives, sampling_strategy="top",
        output_format="n-tuple", batch_size=cfg.batch_size, verbose=False, cache_folder=cache_folder,
    )
    text_to_id: dict[str, str] = {}
    for cid, text in zip(corpus_ids, corpus_texts):
        text_to_id.setdefault(text, cid)
    not_negative: dict[str, set[str]] = {}
    if judged is not None and len(judged):
        rel = judged[judged["grade"].notna() & (judged["grade"] >= 1)]
        for key, group in rel.groupby("query_key"):
            not_negative[key] = set(group["chunk_id"])
    query_to_rows: dict[tuple[str, str], list[int]] = {}
    for i, (q, p) in enumerate(zip(pairs["query"], pairs["positive"])):
        query_to_rows.setdefault((q, p), []).append(i)
    neg_cols = [c for c in mined.column_names if c.startswith("negative")]
    rows, candidates, dropped = [], 0, 0
    for rec in mined:
        for i in query_to_rows.get((rec["anchor"], rec["positive"]), []):
            key, pos_id = pairs.at[i, "query_key"], pairs.at[i, "positive_id"]
            rank = 0
            for col in neg_cols:
                text = rec[col]
                if text is None:
                    continue
                candidates += 1
                cid = text_to_id.get(text)
                if cid is None or cid in not_negative.get(key, set()) or cid == pos_id:
                    dropped += 1
                    continue
                rows.append({"query_key": key, "positive_id": pos_id, "negative_id": cid, "negative": text, "mined_rank": rank})
                rank += 1
    out = pd.DataFrame(rows, columns=empty.columns)
    return out, {"candidates": candidates, "dropped_judged_relevant": dropped}


def training_rows(finetune_set: pd.DataFrame, mined: pd.DataFrame | None) -> tuple[pd.DataFrame, NegativeStats]:
    """(query, positive, negative) rows, as many as finetune_set has, negatives alternating source.

    The k-th row of a (query, positive) pair in finetune_set (k = 0, 1, ...) takes its judged
    negative when k is even and the (k // 2)-th mined negative when k is odd (falling back to the
    judged one when mining found none), so every pair sees its hardest judged negative first.
    """
    df = finetune_set.reset_index(drop=True).copy()
    df["negative_source"] = "judged"
    stats = NegativeStats(rows=len(df))
    if mined is not None and len(mined) and len(df):
        by_pair = {k: g.sort_values("mined_rank") for k, g in mined.groupby(["query_key", "positive_id"])}
        occurrence = df.groupby(["query_key", "positive_id"]).cumcount()
        missing = set()
        for i, k in occurrence.items():
            if k % 2 == 0:
                continue
            key = (df.at[i, "query_key"], df.at[i, "positive_id"])
            g = by_pair.get(key)
            j = k // 2
            if g is None or j >= len(g):
                missing.add(key)
                continue
            df.at[i, "negative_id"] = g["negative_id"].iloc[j]
            df.at[i, "negative"] = g["negative"].iloc[j]
            df.at[i, "negative_rank"] = -1  # not a served rank: mined
            df.at[i, "negative_source"] = "mined"
        stats.pairs_without_mined = len(missing)
    stats.judged_negatives = int((df["negative_source"] == "judged").sum())
    stats.mined_negatives = int((df["negative_source"] == "mined").sum())
    return df, stats


def build_training_rows(
    finetune_set: pd.DataFrame,
    judged: pd.DataFrame | None,
    miner_model_path: str | None,
    corpus_ids: list[str],
    corpus_texts: list[str],
    cfg: MiningConfig,
    *,
    cache_folder: str | None = None,
    progress=None,
) -> tuple[pd.DataFrame, dict]:
    """finetune_set rows with negatives from both sources, and the counts of each (for metadata/MLflow).

    ``miner_model_path`` is the model that serves now (the champion, or the base before the first
    promotion); None skips mining (judged negatives only).
    """
    import time

    from flywheel.lib.registry import index

    say = progress or (lambda _m: None)
    mined, info, seconds = None, {"candidates": 0, "dropped_judged_relevant": 0}, 0.0
    if miner_model_path and len(finetune_set):
        started = time.monotonic()
        seq = cfg.max_seq_length
        model = index.load_embedder(miner_model_path, device=cfg.device, max_seq_length=seq)
        if cache_folder:
            # sentence-transformers keys its embedding cache by the model card's *base* model name,
            # which a fine-tuned champion shares with the base: one folder per model's weights
            cache_folder = str(Path(cache_folder) / f"{index.model_fingerprint(miner_model_path)}-seq{seq}")
        say(f"mining hard negatives with {miner_model_path} over {len(corpus_texts)} chunks (seq {seq})")
        mined, info = mine(finetune_set, model, corpus_ids, corpus_texts, judged, cfg, cache_folder=cache_folder)
        seconds = time.monotonic() - started
    rows, stats = training_rows(finetune_set, mined)
    stats.mined_candidates = info["candidates"]
    stats.mined_dropped_judged_relevant = info["dropped_judged_relevant"]
    out = stats.as_dict()
    out["mining_seconds"] = round(seconds, 1)
    say(f"training rows: {stats.rows} ({stats.judged_negatives} judged negatives, {stats.mined_negatives} mined; "
        f"{stats.mined_dropped_judged_relevant} of {stats.mined_candidates} mined candidates dropped as judged relevant/related)")
    return rows, out
