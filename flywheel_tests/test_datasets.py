"""The three tiers: deterministic query split, hard negatives, balance, disjointness."""

import numpy as np
import pandas as pd

from flywheel.lib.datasets.tiers import (
    build_eval_set,
    confirm_by_majority,
    build_fewshot_set,
    build_finetune_set,
    content_hash,
    votes_description,
)
from flywheel.lib.labels.judges import normalize_query


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


def test_eval_set_takes_new_queries_by_hash_whatever_the_serving_model_retrieved():
    labels = make_labels()
    missed = labels["query_key"] == "claim number 17 about proteins"  # the serving model found nothing relevant
    labels.loc[missed, "relevant"] = False
    labels.loc[missed, "grade"] = 0
    seen = {normalize_query(f"Claim number {i} about proteins") for i in range(10)}
    ev = build_eval_set(labels, n_queries=5, seed=0, seen_before=seen)
    assert ev["query_key"].nunique() == 5
    assert not set(ev["query_key"]) & seen
    shuffled = labels.sample(frac=1, random_state=3)
    again = build_eval_set(shuffled, n_queries=5, seed=0, seen_before=seen)
    assert set(again["query_key"]) == set(ev["query_key"])
    everything = build_eval_set(labels, n_queries=500, seed=0, seen_before=seen)
    assert everything["query_key"].nunique() == 30
    # a query the incumbent answered badly is not selected away: pooling finds its relevant chunks later
    assert labels.loc[missed, "query_key"].iloc[0] in set(everything["query_key"])
    # the choice never depends on what was judged relevant (no selection toward the incumbent)
    nothing_relevant = labels.assign(relevant=False, grade=pd.array([0] * len(labels), dtype="Int64"))
    assert set(build_eval_set(nothing_relevant, n_queries=5, seed=0, seen_before=seen)["query_key"]) == set(ev["query_key"])


def test_eval_set_relevance_is_confirmed_by_a_majority_of_votes_each_asked_only_while_the_majority_is_open():
    labels = make_labels(n_queries=12)
    # the second vote agrees except on queries 0-5, where it calls rank 2 irrelevant and rank 1
    # relevant; the third vote sides with it on queries 0-2 only
    asked = []

    def vote(flip_below):
        def ask(rows):
            asked.append(len(rows))
            q = rows["query_key"].str.extract(r"number (\d+) ")[0].astype(int)
            return [(3 if r == 1 else 0) if n < flip_below else int(g) for n, r, g in zip(q, rows["rank"], rows["grade"])]
        return ask

    ev = build_eval_set(labels, n_queries=12, seed=0, seen_before=set(), extra_votes=[vote(6), vote(3)])
    # the second vote is asked about every row, the third only where the first two disagree
    assert asked == [len(labels), 6 * 2]
    rel = ev[ev["relevant"]]
    flipped = rel["query_key"].str.extract(r"number (\d+) ")[0].astype(int) < 3
    assert set(rel.loc[flipped, "rank"]) == {1} and set(rel.loc[~flipped, "rank"]) == {2}
    assert ev.loc[(ev["rank"] == 2) & ev["query_key"].str.contains("number 0 "), "votes"].item() == "3,0,0"
    assert ev.loc[(ev["rank"] == 2) & ev["query_key"].str.contains("number 7 "), "votes"].item() == "3,3,."
    assert votes_description(ev) == ("relevant by a majority of 3 judge votes per pair "
                                     "(60 votes not asked: the majority was already decided)")
    assert votes_description(ev.drop(columns="votes")) == "one vote per pair"


def test_a_majority_asked_vote_by_vote_is_the_majority_of_every_vote():
    rng = np.random.default_rng(0)
    for n_voters in range(5):
        first = rng.integers(0, 4, 300)
        all_votes = [[None if rng.random() < 0.1 else int(g) for g in rng.integers(0, 4, 300)] for _ in range(n_voters)]
        rows = pd.DataFrame({"grade": pd.array(first, dtype="Int64"), "relevant": first >= 2})
        asked = []

        def voter(k):
            def ask(sub):
                asked.append(len(sub))
                return [all_votes[k][i] for i in sub.index]
            return ask

        got = confirm_by_majority(rows, [voter(k) for k in range(n_voters)])
        for i in range(300):
            counted = [int(first[i])] + [v[i] for v in all_votes if v[i] is not None]
            assert got["relevant"][i] == (2 * sum(g >= 2 for g in counted) > len(counted)), (n_voters, i)
        assert sum(asked) <= 300 * n_voters
        if n_voters >= 2:
            assert sum(asked) < 300 * n_voters  # agreeing votes leave later ones unasked


def test_votes_only_pay_for_enough_queries_and_unlabelled_votes_do_not_count():
    labels = make_labels(n_queries=40)
    asked = []

    def votes(rows):
        asked.append(rows["query_key"].nunique())
        return [None] * len(rows)  # the re-ask failed: the first vote stands

    ev = build_eval_set(labels, n_queries=5, seed=0, seen_before=set(), extra_votes=[votes])
    assert asked == [5] and ev["query_key"].nunique() == 5
    second = ev["votes"].str.split(",").str[1]
    # with two votes a tie is no majority, so only a first "relevant" can need the second vote
    assert ev.loc[ev["rank"] == 2, "relevant"].all() and set(second[ev["rank"] == 2]) == {"-"}
    assert set(second[ev["rank"] != 2]) == {"."}
    rows = labels.head(2).copy()
    tie = confirm_by_majority(rows.assign(relevant=[True, False]), [lambda r: [0 if i == 0 else 3 for i in r.index]])
    assert tie["relevant"].tolist() == [False, False]  # 1 of 2 is not a majority


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


def test_eval_set_counts_the_judges_grade_not_feedback_only_the_served_chunks_could_get():
    labels = make_labels(n_queries=10)
    labels["judge_grade"] = labels["grade"]
    saved = labels["rank"] == 4  # a user saved the rank-4 chunk the judge called irrelevant: the fused label says 2
    labels.loc[saved, ["grade", "relevant"]] = [2, True]
    labels.loc[labels["rank"] == 5, "judge_grade"] = pd.NA  # the judge gave no grade; feedback did
    ev = build_eval_set(labels, n_queries=10, seed=0, seen_before=set())
    assert not ev.loc[ev["rank"] == 4, "relevant"].any() and (ev.loc[ev["rank"] == 4, "grade"] == 0).all()
    assert 5 not in set(ev["rank"])  # unjudged by the judge: pooling judges it like any other model's chunk
    assert ev.loc[ev["rank"] == 2, "relevant"].all()


def test_new_queries_of_the_week_are_those_no_earlier_week_asked_nor_held_out_judged_by_the_judge_alone(tmp_path, small_beir):
    """Keyword fusion's extra evidence (flywheel.lib.evaluation.weekly.new_query_evidence) must be
    queries no earlier model trained on: not asked before (nor a near-duplicate of an earlier one),
    not in any eval set or the test split; graded by the judge, not by feedback."""
    from flywheel.config import TiersSettings
    from flywheel.layout import EVAL_SET, RELEVANCE_LABELS, Layout
    from flywheel.lib import store
    from flywheel.lib.beir import load_beir
    from flywheel.lib.datasets.weekly import new_queries_of_week

    layout = Layout(home=tmp_path, log_dir=tmp_path / "logs")
    week1, week2 = "2026-09-28", "2026-10-05"
    earlier = make_labels(n_queries=5, week=week1)
    this = make_labels(n_queries=12, week=week2)  # claims 0-4 were asked in week 1 too
    this.loc[this["query_key"] == normalize_query("Claim number 5 about proteins"),
             ["query", "query_key"]] = ["Claim number 4 about the proteins", normalize_query("Claim number 4 about the proteins")]
    test_query = next(iter(load_beir(small_beir).split_queries("test").values()))
    this.loc[this["query_key"] == normalize_query("Claim number 6 about proteins"),
             ["query", "query_key"]] = [test_query, normalize_query(test_query)]
    this["judge_grade"] = this["grade"]
    this.loc[this["rank"] == 4, ["grade", "relevant"]] = [2, True]  # feedback only the served list could get
    this.loc[this["rank"] == 5, "judge_grade"] = pd.NA
    this["injection_flag"] = this["rank"] == 6
    store.write_table(layout.asset(RELEVANCE_LABELS, week1), earlier)
    store.write_table(layout.asset(RELEVANCE_LABELS, week2), this)
    evals = this[this["query_key"] == normalize_query("Claim number 7 about proteins")].assign(votes="3,3,3")
    store.write_table(layout.asset(EVAL_SET, week2), evals)

    new = new_queries_of_week(layout, small_beir, week2, TiersSettings(near_duplicate_jaccard=0.8))
    # 0-4: asked before; 5: now a near-duplicate of week 1's claim 4 (token Jaccard 5/6); 6: a test query; 7: eval set
    assert sorted(new["query"].unique()) == [f"Claim number {q} about proteins" for q in (10, 11, 8, 9)]
    assert list(new.columns) == ["query", "query_key", "chunk_id", "grade", "relevant"]
    # per query: ranks 1-4 (rank 4 with the judge's 0, not feedback's 2); 5 unjudged and 6 flagged are left out
    assert sorted(new["chunk_id"].str.split("-").str[1].unique()) == ["1", "2", "3", "4"] and len(new) == 4 * 4
    assert new.loc[new["chunk_id"].str.endswith("-2"), "relevant"].all()
    assert not new.loc[~new["chunk_id"].str.endswith("-2"), "relevant"].any()


def test_an_eval_set_vote_flagged_for_prompt_injection_does_not_count_toward_the_majority(tmp_path):
    """A later vote on a pair the judge flagged for instructions aimed at the grader counts as
    unlabelled ("-"), as pooling counts it: a flagged pair never decides what is relevant."""
    from flywheel.config import TiersSettings
    from flywheel.layout import RELEVANCE_LABELS, Layout
    from flywheel.lib import store
    from flywheel.lib.datasets.weekly import eval_set_week
    from flywheel.lib.labels.judges import Judgement

    class Voter:
        name, usage = "second vote", None

        def __init__(self, flag: bool):
            self.flag = flag

        def judge(self, requests, *, fewshot=None, progress=None):
            # calls every chunk it is asked about irrelevant (only the rank-2 ones are: the first
            # vote called them relevant), flagged or not as the judge's injection scan says
            return [Judgement(0, "", injection_flag=self.flag) for _ in requests]

    week = "2026-09-28"
    layout = Layout(home=tmp_path, log_dir=tmp_path / "logs")
    store.write_table(layout.asset(RELEVANCE_LABELS, week), make_labels(n_queries=4, week=week))
    tiers = TiersSettings(eval_queries=4, first_week_eval_queries=4)

    flagged = eval_set_week(layout, week, tiers, [Voter(flag=True)]).table
    rank2 = flagged[flagged["rank"] == 2]
    assert set(rank2["votes"]) == {"3,-"} and rank2["relevant"].all()  # the first vote stands alone
    counted = eval_set_week(layout, week, tiers, [Voter(flag=False)]).table
    rank2 = counted[counted["rank"] == 2]
    assert set(rank2["votes"]) == {"3,0"} and not rank2["relevant"].any()  # a tie is not a majority
