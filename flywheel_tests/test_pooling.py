"""Pool extension: a new model's unjudged top chunks get judged before models are compared."""

import pandas as pd

from flywheel.lib.labels.judges import Judgement, JudgeUsage
from flywheel.lib.labels.pooling import extend_pool, pooled_qrels


class RecordingJudge:
    name = "recording"

    def __init__(self, relevant: set[tuple[str, str]]):
        self.relevant = relevant
        self.asked = []
        self.usage = JudgeUsage()

    def judge(self, requests, *, fewshot=None, progress=None):
        self.asked += [(r.query, r.chunk_id, r.rank) for r in requests]
        return [Judgement(3 if (r.query, r.chunk_id) in self.relevant else 0, "") for r in requests]


def eval_set():
    return pd.DataFrame({
        "query": ["Q one"] * 3, "query_key": ["q one"] * 3, "chunk_id": ["a", "b", "c"],
        "rank": [1, 2, 3], "grade": [3, 0, 0], "relevant": [True, False, False],
    })


def test_only_unjudged_chunks_in_the_top_depth_are_judged_once_with_their_rank():
    judge = RecordingJudge({("Q one", "x")})
    rankings = {"old": {"q one": ["a", "b", "c", "y"]}, "new": {"q one": ["x", "a", "z", "y", "w"]}}
    extra = extend_pool(eval_set(), rankings, judge, {c: f"text {c}" for c in "abcxyzw"}, depth=4)
    assert sorted(c for _, c, _ in judge.asked) == ["x", "y", "z"]  # w is below depth 4
    assert ("Q one", "x", 1) in judge.asked
    queries, qrels = pooled_qrels(eval_set(), extra)
    assert queries == {"q one": "Q one"} and qrels == {"q one": {"a", "x"}}


def test_nothing_to_judge_makes_no_calls():
    judge = RecordingJudge(set())
    extra = extend_pool(eval_set(), {"old": {"q one": ["a", "b"]}}, judge, {}, depth=2)
    assert extra.empty and judge.asked == []
