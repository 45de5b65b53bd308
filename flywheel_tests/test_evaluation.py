"""Retrieval metrics against hand-computed values, and the paired bootstrap."""

import math

import numpy as np
import pandas as pd
import pytest

from flywheel.lib.evaluation import metrics as evaluation


def test_query_metrics_match_hand_computed_values():
    m = evaluation.query_metrics(["a", "b", "c", "d"], {"b", "d"})
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@1"] == 0 and m["recall@5"] == 1.0
    assert m["first_relevant_rank"] == 2


def test_graded_qrels_are_gains_as_beir_scores_them():
    # BEIR scores NDCG@10 with pytrec_eval's ndcg_cut.10 (trec_eval): gain = the qrel's level,
    # discount log2(rank + 1), the ideal DCG from the qrels' levels sorted high to low
    m = evaluation.query_metrics(["a", "b", "c"], {"a": 1, "c": 2, "d": 2})
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["ndcg@10"] < evaluation.query_metrics(["a", "b", "c"], {"a", "c", "d"})["ndcg@10"]  # a level-1 chunk first costs more when graded
    assert m["recall@3"] == pytest.approx(2 / 3) and m["mrr@10"] == 1.0  # any level above 0 is relevant
    # with every level 1, graded and binary agree
    assert evaluation.query_metrics(["a", "b", "c"], dict.fromkeys("acd", 1)) == evaluation.query_metrics(["a", "b", "c"], {"a", "c", "d"})


def test_query_metrics_when_nothing_relevant_is_found():
    m = evaluation.query_metrics(["x"] * 20, {"b"})
    assert m["ndcg@10"] == 0 and m["mrr@10"] == 0 and math.isnan(m["first_relevant_rank"])


def test_mrr_counts_only_the_top_10():
    ranked = [f"d{i}" for i in range(20)]
    assert evaluation.query_metrics(ranked, {"d12"})["mrr@10"] == 0
    assert evaluation.query_metrics(ranked, {"d12"})["recall@20"] == 1


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 300)
    gain = evaluation.paired_bootstrap(a, a + 0.05 + rng.normal(0, 0.05, 300))
    assert gain["ci_low"] > 0
    noise = evaluation.paired_bootstrap(a, a + rng.normal(0, 0.05, 300))
    assert noise["ci_low"] < 0 < noise["ci_high"]


def test_rank_movement_counts_queries_that_moved():
    before = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "first_relevant_rank": [20.0, 3.0, float("nan")]})
    after = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "first_relevant_rank": [5.0, 4.0, 2.0]})
    mv = evaluation.rank_movement(before, after)
    assert (mv["improved"], mv["worsened"], mv["unchanged"]) == (2, 1, 0)
    assert mv["moved_into_top5_from_below_10"] == 2
    assert mv["in_top5_before"] == 1 and mv["in_top5_after"] == 3


def test_comparison_table_shows_relative_change():
    md = evaluation.comparison_table({"base": {"ndcg@10": 0.5}, "trained": {"ndcg@10": 0.55}}, ["ndcg@10"])
    assert "| ndcg@10 | 0.5000 | 0.5500 | +0.0500 (+10.0%) |" in md


def test_a_document_with_the_querys_own_id_is_not_a_result_as_in_beir():
    """ArguAna- and Quora-style datasets: the query is itself a corpus document. BEIR's evaluation
    drops it from the ranking (ignore_identical_ids); so do we, unless asked not to."""
    rankings = {"q1": ["q1", "d2", "d3"], "q2": ["d9", "d4"]}
    qrels = {"q1": {"d2"}, "q2": {"d4"}}
    per_q = evaluation.evaluate_rankings(rankings, qrels).set_index("query_id")
    assert per_q.loc["q1", "ndcg@10"] == pytest.approx(1.0)  # d2 is first once q1 itself is dropped
    assert per_q.loc["q2", "ndcg@10"] == pytest.approx(1 / math.log2(3))
    kept = evaluation.evaluate_rankings(rankings, qrels, ignore_identical_ids=False).set_index("query_id")
    assert kept.loc["q1", "ndcg@10"] == pytest.approx(1 / math.log2(3))
