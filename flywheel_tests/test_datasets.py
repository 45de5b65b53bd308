"""The three tiers: deterministic query split, hard negatives, balance, disjointness."""

import pandas as pd

from flywheel.lib.datasets import (
    build_eval_set,
    build_fewshot_set,
    build_finetune_set,
    content_hash,
)
from flywheel.lib.judging import normalize_query


def make_labels(n_queries=40, week="2026-09-28", chunks=6):
    rows = []
    for q in range(n_queries):
        query = f"Claim number {q} about proteins"
        for rank in range(1, chunks + 1):
            grade = 3 if rank == 2 else (1 if rank == 1 else 0)
            rows.append({
                "week": week, "request_id": f"r{q}", "query": query, "query_key": normalize_query(query),
                "chunk_id": f"c{q}-{rank}", "chunk_text": f"text {q} {rank}", "rank": rank, "grade": grade,
                "relevant": grade >= 2, "reason": "", "score": 1.0 / rank,
            })
    df = pd.DataFrame(rows)
    df["grade"] = df["grade"].astype("Int64")
    return df


def test_eval_set_takes_new_queries_with_a_relevant_chunk_deterministically():
    labels = make_labels()
    labels.loc[labels["query_key"].str.endswith(" 7 about proteins"), "relevant"] = False
    seen = {normalize_query(f"Claim number {i} about proteins") for i in range(10)}
    ev = build_eval_set(labels, n_queries=5, seed=0, seen_before=seen)
    assert ev["query_key"].nunique() == 5
    assert not set(ev["query_key"]) & seen
    assert ev.groupby("query_key")["relevant"].any().all()
    shuffled = labels.sample(frac=1, random_state=3)
    again = build_eval_set(shuffled, n_queries=5, seed=0, seen_before=seen)
    assert set(again["query_key"]) == set(ev["query_key"])
    assert len(build_eval_set(labels, n_queries=500, seed=0, seen_before=seen)["query_key"].unique()) == 30


def test_finetune_set_uses_grade_0_as_hard_negatives_hardest_first_and_skips_held_out_queries():
    labels = make_labels()
    held_out = {normalize_query("Claim number 5 about proteins")}
    ft, stats = build_finetune_set(labels, n_examples=1000, seed=0, exclude_queries=held_out)
    assert len(ft) and not held_out & set(ft["query_key"])
    by_id = labels.set_index("chunk_id")["grade"]
    assert (by_id.loc[ft["negative_id"]] == 0).all()
    assert (by_id.loc[ft["positive_id"]] >= 2).all()
    assert "c0-1" not in set(ft["negative_id"])  # a "related" chunk is never a negative
    first = ft.drop_duplicates("query_key")
    assert (first["negative_rank"] == 3).all()  # the best-ranked irrelevant chunk comes first
    assert stats.rows == len(ft) and stats.content_sha256 == content_hash(ft)


def test_finetune_set_respects_size_round_robin_and_exclusions():
    labels = make_labels()
    ft, _ = build_finetune_set(labels, n_examples=20, seed=0, exclude_queries=set())
    assert len(ft) == 20 and ft["query_key"].is_unique  # one negative per query before any second
    excluded = set(ft["query_key"][:3])
    ft2, stats = build_finetune_set(labels, n_examples=1000, seed=0, exclude_queries=excluded)
    assert not excluded & set(ft2["query_key"]) and stats.excluded_queries == 3


def test_finetune_set_is_deterministic():
    labels = make_labels()
    a, sa = build_finetune_set(labels, n_examples=50, seed=0, exclude_queries=set())
    b, sb = build_finetune_set(labels.sample(frac=1, random_state=1), n_examples=50, seed=0, exclude_queries=set())
    assert sa.content_sha256 == sb.content_sha256


def test_fewshot_set_is_balanced_across_grades():
    labels = make_labels(n_queries=100)
    fs = build_fewshot_set(labels, n_examples=60, seed=0, exclude_queries=set())
    counts = fs["grade"].value_counts()
    assert len(fs) == 60 and set(counts.index) == {0, 1, 3} and counts.max() - counts.min() <= 1
