"""Pool extension: every compared model's unjudged top chunks get judged (with the eval sets'
vote rule) before models are compared, and each pair is paid for once."""

import pandas as pd

from flywheel.lib.labels.judges import Judgement, JudgeUsage
from flywheel.lib.labels.pooling import extend_pool, missing_pairs, pooled_suite


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
        "rank": [1, 2, 3], "grade": [3, 0, 0], "relevant": [True, False, False], "votes": ["3,3,3", "0,0,0", "0,0,0"],
    })


TEXTS = {c: f"text {c}" for c in "abcxyzw"}


def test_only_unjudged_chunks_in_the_top_depth_are_judged_once_with_their_rank():
    judge = RecordingJudge({("Q one", "x")})
    rankings = {"old": {"q one": ["a", "b", "c", "y"]}, "new": {"q one": ["x", "a", "z", "y", "w"]}}
    extra, stats = extend_pool(eval_set(), rankings, [judge], TEXTS, depth=4)
    assert sorted(c for _, c, _ in judge.asked) == ["x", "y", "z"]  # w is below depth 4
    assert ("Q one", "x", 1) in judge.asked
    assert stats.pairs_added == 3 and stats.judge_requests == 3
    assert stats.by_model == {"new": 2, "old": 1}  # y is credited to the first model that ranked it
    queries, qrels, judged = pooled_suite(pd.concat([eval_set(), extra], ignore_index=True))
    assert queries == {"q one": "Q one"} and qrels == {"q one": {"a", "x"}}
    assert judged == {"q one": {"a", "b", "c", "x", "y", "z"}}


def test_relevance_is_decided_by_a_majority_of_votes_like_the_eval_sets():
    lenient = RecordingJudge({("Q one", "x"), ("Q one", "y")})
    strict = RecordingJudge({("Q one", "x")})
    rankings = {"new": {"q one": ["x", "y"]}}
    extra, stats = extend_pool(eval_set(), rankings, [lenient, strict, strict], TEXTS, depth=2)
    got = extra.set_index("chunk_id")
    assert bool(got.at["x", "relevant"]) and not bool(got.at["y", "relevant"])  # y: 1 of 3 votes
    assert got.at["y", "votes"] == "3,0,0" and got.at["y", "grade"] == 3  # the first vote is the grade
    # x's first two votes agree, so its third is not asked (nor paid for): 2 + 2 + 1 requests
    assert got.at["x", "votes"] == "3,3,." and [c for _, c, _ in strict.asked] == ["x", "y", "y"]
    assert stats.judge_requests == 5


def test_a_pair_judged_in_an_earlier_pool_is_not_paid_for_again():
    judge = RecordingJudge(set())
    rankings = {"new": {"q one": ["x", "a"]}}
    first, _ = extend_pool(eval_set(), rankings, [judge], TEXTS, depth=2)
    judge.asked.clear()
    again, stats = extend_pool(pd.concat([eval_set(), first]), rankings, [judge], TEXTS, depth=2)
    assert again.empty and judge.asked == [] and stats.judge_requests == 0
    assert missing_pairs(pd.concat([eval_set(), first]), rankings, 2) == {}


def test_nothing_to_judge_makes_no_calls():
    judge = RecordingJudge(set())
    extra, stats = extend_pool(eval_set(), {"old": {"q one": ["a", "b"]}}, [judge], {}, depth=2)
    assert extra.empty and judge.asked == [] and stats.pairs_added == 0
