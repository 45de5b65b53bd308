"""Fair eval sets for a new model: judge what it retrieves, not only what the old one did.

An eval set's judgments come from the results the serving model showed that week. Scored
against them, a new model is penalised twice: the chunks it newly brings into its top 10 are
unjudged (so count as irrelevant), and the judge's mistakes sit where the old model ranked.
Before models are compared on eval sets, every model's top ``depth`` chunks that nobody judged
yet are judged by the same judge (paid calls are cached), so every compared ranking is scored
on judgments made the same way ("pool extension", as TREC does with deeper pools).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from flywheel.lib.labels.judges import RELEVANT_GRADE, Judge, JudgeRequest


def extend_pool(
    eval_sets: pd.DataFrame,
    rankings: Mapping[str, Mapping[str, Sequence[str]]],
    judge: Judge,
    texts: Mapping[str, str],
    *,
    depth: int = 10,
) -> pd.DataFrame:
    """Judgments for every (query, chunk) some model ranks in its top ``depth`` and the eval set lacks.

    ``rankings`` is model -> query_key -> ranked chunk ids. Returns rows with the eval set's
    columns query, query_key, chunk_id, rank, grade, relevant (plus ``judged_for``: the model).
    """
    judged = set(zip(eval_sets["query_key"], eval_sets["chunk_id"]))
    query_text = dict(zip(eval_sets["query_key"], eval_sets["query"]))
    wanted: dict[tuple[str, str], tuple[str, int]] = {}
    for model, per_query in rankings.items():
        for qkey, ranked in per_query.items():
            for rank, chunk in enumerate(ranked[:depth], start=1):
                if (qkey, chunk) not in judged and (qkey, chunk) not in wanted:
                    wanted[(qkey, chunk)] = (model, rank)
    keys = list(wanted)
    requests = [JudgeRequest(query_text[q], c, texts[c], wanted[(q, c)][1]) for q, c in keys]
    judgements = judge.judge(requests) if requests else []
    rows = [
        {
            "query": query_text[q], "query_key": q, "chunk_id": c, "rank": wanted[(q, c)][1],
            "grade": j.grade, "relevant": j.grade is not None and j.grade >= RELEVANT_GRADE,
            "judged_for": wanted[(q, c)][0],
        }
        for (q, c), j in zip(keys, judgements)
    ]
    return pd.DataFrame(rows, columns=["query", "query_key", "chunk_id", "rank", "grade", "relevant", "judged_for"])


def pooled_qrels(eval_sets: pd.DataFrame, extra: pd.DataFrame) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Queries and relevant chunks of the eval sets plus the extended pool."""
    both = pd.concat([eval_sets[["query", "query_key", "chunk_id", "relevant"]],
                      extra[["query", "query_key", "chunk_id", "relevant"]]], ignore_index=True)
    queries = dict(zip(both["query_key"], both["query"]))
    qrels = {q: set(g.loc[g["relevant"].astype(bool), "chunk_id"]) for q, g in both.groupby("query_key")}
    return queries, qrels
