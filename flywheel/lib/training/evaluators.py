"""Validation during training: NDCG@10 of held-out *training* queries (never eval or test ones).

Early stopping and the best checkpoint are chosen on these figures, so they must measure the task
the model is trained for:

- :class:`CorpusValidationEvaluator` (``corpus`` loss): the held-out queries searched over the
  whole frozen corpus matrix the app serves from. Rankings are condensed to the chunks judged for
  the query, as the eval sets are (Sakai, 2007, "condensed lists"): the judge only saw what the
  serving model retrieved, so an unjudged chunk is unknown, not irrelevant.
- :func:`validation_evaluator` (shared-tower losses): sentence-transformers'
  ``InformationRetrievalEvaluator`` over the queries' judged chunks plus a fixed sample of other
  training passages as distractors (the whole corpus would need re-encoding at every evaluation).

Both report ``validation_cosine_ndcg@10`` (and recall) through sentence-transformers' evaluator
interface, so the trainer logs them as ``eval_validation_*`` and can keep the best checkpoint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

from flywheel.lib.evaluation.metrics import query_metrics
from flywheel.lib.labels.judges import stable_uniform
from flywheel.lib.registry import index

VALIDATION = "validation"
PRIMARY = "cosine_ndcg@10"
CANDIDATES = 100  # ranks searched per query before condensing to judged chunks


class CorpusValidationEvaluator(BaseEvaluator):
    """NDCG@10 / Recall@10 of queries over a fixed corpus matrix, condensed to judged chunks.

    Args:
        queries: query key -> query text.
        relevant: query key -> chunk ids judged relevant (the rows' positives).
        judged: query key -> every chunk id judged for the query (relevant, related or not).
        corpus_ids: the corpus matrix's chunk ids, in row order.
        corpus_vectors: (chunks, dim) L2-normalised embeddings.
    """

    def __init__(self, queries: dict[str, str], relevant: dict[str, set[str]], judged: dict[str, set[str]],
                 corpus_ids: list[str], corpus_vectors: np.ndarray, name: str = VALIDATION) -> None:
        super().__init__()
        self.name = name
        self.primary_metric = PRIMARY
        self.keys = list(queries)
        self.queries = queries
        self.relevant = relevant
        self.judged = judged
        self.corpus_ids = corpus_ids
        self.corpus_vectors = corpus_vectors

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        q = index.encode(model, [self.queries[k] for k in self.keys], task="query")
        top = np.argsort(-(q @ self.corpus_vectors.T), axis=1)[:, :CANDIDATES]
        per = []
        for i, key in enumerate(self.keys):
            ranked = [self.corpus_ids[j] for j in top[i] if self.corpus_ids[j] in self.judged[key]]
            per.append(query_metrics(ranked, self.relevant[key], recall_ks=(10,)))
        metrics = {
            "cosine_ndcg@10": float(np.mean([m["ndcg@10"] for m in per])),
            "cosine_recall@10": float(np.mean([m["recall@10"] for m in per])),
        }
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    @classmethod
    def from_rows(cls, val_df: pd.DataFrame, corpus_ids: list[str], corpus_vectors: np.ndarray,
                  related: dict[str, set[str]] | None = None) -> "CorpusValidationEvaluator | None":
        """From held-out training rows (query, query_key, positive_id, negative_id); None when empty.
        ``related``: query key -> chunks judged relevant or related (counted as judged)."""
        if val_df.empty:
            return None
        judged = {
            k: set(g["positive_id"]) | set(g["negative_id"]) | (related or {}).get(k, set())
            for k, g in val_df.groupby("query_key")
        }
        return cls(
            queries=dict(zip(val_df["query_key"], val_df["query"])),
            relevant=val_df.groupby("query_key")["positive_id"].agg(set).to_dict(),
            judged=judged, corpus_ids=corpus_ids, corpus_vectors=corpus_vectors,
        )


def validation_evaluator(val_df: pd.DataFrame, train_df: pd.DataFrame, distractors: int, seed: int):
    """InformationRetrievalEvaluator over the held-out queries' judged chunks plus ``distractors``
    training passages (a seeded, stable sample); None when nothing is held out."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    if val_df.empty:
        return None
    corpus: dict[str, str] = dict(zip(val_df["positive_id"], val_df["positive"]))
    corpus.update(zip(val_df["negative_id"], val_df["negative"]))
    others = train_df.drop_duplicates("positive_id")
    others = others.assign(_o=[stable_uniform("distractor", seed, c) for c in others["positive_id"]]).sort_values("_o")
    for cid, text in zip(others["positive_id"].head(distractors), others["positive"].head(distractors)):
        corpus.setdefault(cid, text)
    return InformationRetrievalEvaluator(
        queries=dict(zip(val_df["query_key"], val_df["query"])), corpus=corpus,
        relevant_docs=val_df.groupby("query_key")["positive_id"].agg(set).to_dict(), name=VALIDATION,
        ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1, 10], precision_recall_at_k=[10], map_at_k=[10],
        show_progress_bar=False, write_csv=False,
    )


def primary_value(metrics: dict, evaluator) -> float:
    """The evaluator's primary metric in a result dict (NaN without an evaluator or a value)."""
    if evaluator is None or evaluator.primary_metric is None:
        return float("nan")
    return float(metrics.get(evaluator.primary_metric, float("nan")))
