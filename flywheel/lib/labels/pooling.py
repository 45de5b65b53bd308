"""Fair eval sets for every compared model: judge what each retrieves, not only what served.

An eval set's judgments come from the results the serving model showed that week. Scored
against them, a new model is penalised twice: the chunks it newly brings into its top 10 are
unjudged (condensed away or counted as misses), and the judge's mistakes sit where the old model
ranked. Before models are compared, every compared model's top ``depth`` chunks that nobody
judged yet are judged by the same judge, with the same vote rule as the eval sets (a majority of
votes; each vote is a cached call), as TREC builds its pools. Pools are kept per week and reused,
so a pair is paid for once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import pandas as pd

from flywheel.lib.datasets.tiers import confirm_by_majority
from flywheel.lib.labels.judges import RELEVANT_GRADE, Judge, JudgeRequest, counted_grades

POOL_COLUMNS = ["week", "query", "query_key", "chunk_id", "rank", "grade", "relevant", "votes", "judged_for"]


@dataclass
class PoolStats:
    pairs_added: int = 0
    judge_requests: int = 0  # votes asked (cached answers are free for a paid judge)
    by_model: dict[str, int] = field(default_factory=dict)  # pairs added for each model's ranking

    def add(self, other: "PoolStats") -> None:
        self.pairs_added += other.pairs_added
        self.judge_requests += other.judge_requests
        for k, v in other.by_model.items():
            self.by_model[k] = self.by_model.get(k, 0) + v


def missing_pairs(judged: pd.DataFrame, rankings: Mapping[str, Mapping[str, Sequence[str]]],
                  depth: int) -> dict[tuple[str, str], tuple[str, int]]:
    """(query_key, chunk) -> (model, rank) for every pair in some model's top ``depth`` that
    ``judged`` (columns query_key, chunk_id, grade) lacks. Unlabelled judgments count as missing."""
    have = set(zip(judged.loc[judged["grade"].notna(), "query_key"], judged.loc[judged["grade"].notna(), "chunk_id"]))
    wanted: dict[tuple[str, str], tuple[str, int]] = {}
    for model, per_query in rankings.items():
        for qkey, ranked in per_query.items():
            for rank, chunk in enumerate(ranked[:depth], start=1):
                if (qkey, chunk) not in have and (qkey, chunk) not in wanted:
                    wanted[(qkey, chunk)] = (model, rank)
    return wanted


def extend_pool(
    judged: pd.DataFrame,
    rankings: Mapping[str, Mapping[str, Sequence[str]]],
    voters: Sequence[Judge],
    texts: Mapping[str, str],
    *,
    depth: int = 10,
    week: str = "",
    progress: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, PoolStats]:
    """Judge every (query, chunk) some model ranks in its top ``depth`` that ``judged`` lacks.

    ``judged`` holds the eval sets and earlier pools (columns query, query_key, chunk_id, grade);
    ``rankings`` is model -> query_key -> ranked chunk ids; ``voters`` are the judge's votes (the
    first decides the grade, all of them the ``relevant`` majority, as for eval sets, each later
    vote asked only where the majority is still open: ``confirm_by_majority``). Returns the new
    rows (``POOL_COLUMNS``) and what it cost.
    """
    wanted = missing_pairs(judged, rankings, depth)
    stats = PoolStats()
    if not wanted or not voters:
        return pd.DataFrame(columns=POOL_COLUMNS), stats
    query_text = dict(zip(judged["query_key"], judged["query"]))
    keys = list(wanted)
    requests = [JudgeRequest(query_text[q], c, texts[c], wanted[(q, c)][1]) for q, c in keys]
    if progress:
        progress(f"pooling: judging {len(requests)} unjudged pairs from the compared models' top {depth} "
                 + ("(one vote each)" if len(voters) == 1 else f"(a majority of up to {len(voters)} votes each)"))
    # a pair flagged for prompt injection counts as unjudged: it never enters an eval suite
    first = counted_grades(voters[0].judge(requests, progress=progress))
    asked = {"requests": len(requests)}

    def vote_of(voter: Judge):
        def vote(sub: pd.DataFrame) -> list:
            asked["requests"] += len(sub)
            return counted_grades(voter.judge([requests[i] for i in sub["request"]], progress=progress))
        return vote

    rows = pd.DataFrame({
        "week": week, "query": [query_text[q] for q, _ in keys], "query_key": [q for q, _ in keys],
        "chunk_id": [c for _, c in keys], "rank": [wanted[k][1] for k in keys],
        "grade": pd.array(first, dtype="Int64"), "judged_for": [wanted[k][0] for k in keys],
    })
    rows["relevant"] = rows["grade"].fillna(-1).astype(int) >= RELEVANT_GRADE
    labelled = rows["grade"].notna()
    # the same vote rule as the eval sets: a later vote is asked only where the majority is open
    confirmed = confirm_by_majority(rows[labelled].assign(request=rows.index[labelled]).reset_index(drop=True),
                                    [vote_of(v) for v in voters[1:]])
    rows.loc[labelled, "relevant"] = confirmed["relevant"].to_numpy()
    rows.loc[labelled, "votes"] = confirmed["votes"].to_numpy()
    stats.pairs_added = int(labelled.sum())
    stats.judge_requests = asked["requests"]
    stats.by_model = rows["judged_for"].value_counts().to_dict()
    return rows[POOL_COLUMNS], stats


def pooled_suite(judged: pd.DataFrame) -> tuple[dict[str, str], dict[str, set[str]], dict[str, set[str]]]:
    """(queries, relevant chunks, judged chunks) per eval query from eval sets plus pools."""
    rows = judged[judged["grade"].notna()]
    queries = dict(zip(judged["query_key"], judged["query"]))
    qrels = {q: set(g.loc[g["relevant"].astype(bool), "chunk_id"]) for q, g in rows.groupby("query_key")}
    pool = {q: set(g["chunk_id"]) for q, g in rows.groupby("query_key")}
    return {q: queries[q] for q in qrels}, qrels, pool
