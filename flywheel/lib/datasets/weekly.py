"""The dataset stage for one week: the three tiers cut from every labelled week to date.

Each function reads what it needs through the :class:`~flywheel.layout.Layout`, calls the tier
builders in ``tiers.py`` and returns the table with the figures the asset reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from flywheel.config import TiersSettings
from flywheel.layout import EVAL_SET, RELEVANCE_LABELS, Layout
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.tiers import (
    FinetuneStats,
    build_eval_set,
    build_fewshot_set,
    build_finetune_set,
    judge_only,
    near_duplicate_queries,
    overlapping_queries,
)
from flywheel.lib.labels.judges import Judge, JudgeRequest, counted_grades, normalize_query

EMPTY_EVAL = ["query", "query_key", "chunk_id", "relevant"]


def labels_to_date(layout: Layout, week: str) -> tuple[pd.DataFrame, list[str]]:
    """Every labelled week up to and including this one."""
    weeks = layout.weeks_written(RELEVANCE_LABELS, up_to=week)
    if week not in weeks:
        raise FileNotFoundError(f"{layout.asset(RELEVANCE_LABELS, week)} is missing: materialize relevance_labels for {week} first")
    frames = [store.read_table(layout.asset(RELEVANCE_LABELS, w)) for w in weeks]
    return pd.concat(frames, ignore_index=True), weeks


def eval_sets_to_date(layout: Layout, week: str) -> tuple[pd.DataFrame, list[str]]:
    """Every eval set up to and including this week (they accumulate: evidence grows weekly)."""
    weeks = layout.weeks_written(EVAL_SET, up_to=week)
    if not weeks:
        return pd.DataFrame(columns=EMPTY_EVAL), []
    return pd.concat([store.read_table(layout.asset(EVAL_SET, w)) for w in weeks], ignore_index=True), weeks


@dataclass(frozen=True)
class HeldOut:
    """Queries that must never be trained on: eval sets to date and the dataset's test split."""

    eval_keys: set[str]
    test_keys: set[str]
    texts: list[str]  # for near-duplicate checks

    @property
    def keys(self) -> set[str]:
        return self.eval_keys | self.test_keys


def held_out(layout: Layout, dataset_dir: Path, week: str) -> HeldOut:
    evals, _ = eval_sets_to_date(layout, week)
    ds = load_beir(dataset_dir)
    test = list(ds.split_queries("test").values()) if ds.has_test_split else []
    return HeldOut(set(evals["query_key"]), {normalize_query(t) for t in test}, sorted(set(evals["query"])) + test)


def new_queries_of_week(layout: Layout, dataset_dir: Path, week: str, tiers: TiersSettings) -> pd.DataFrame:
    """This week's judged pairs of the queries no earlier week asked: first seen this week, held out
    nowhere (eval sets to date, the test split), and not a near-duplicate of an earlier week's query
    or a held-out one; graded by the judge alone (one vote, its first), as the eval sets' first vote
    is. No model trained in an earlier week has seen them, so a weight-free component (keyword
    fusion) can be measured on them, fused with such a model. Columns: query, query_key, chunk_id,
    grade, relevant."""
    labels, _ = labels_to_date(layout, week)
    earlier, rows = labels[labels["week"] < week], labels[labels["week"] == week]
    hold = held_out(layout, dataset_dir, week)
    rows = rows[~rows["query_key"].isin(set(earlier["query_key"]) | hold.keys)]
    if "injection_flag" in rows.columns:  # a flagged pair is unjudged, as in the eval pools
        rows = rows[~rows["injection_flag"].fillna(False).astype(bool)]
    near = near_duplicate_queries(rows["query"].unique(), sorted(set(earlier["query"])) + hold.texts,
                                  threshold=tiers.near_duplicate_jaccard)
    rows = judge_only(rows[~rows["query"].isin(near)]).drop_duplicates(["query_key", "chunk_id"])
    return rows[["query", "query_key", "chunk_id", "grade", "relevant"]].reset_index(drop=True)


@dataclass
class EvalSetResult:
    table: pd.DataFrame
    seen_before: int
    votes_per_pair: int
    extra_votes_asked: int = 0

    @property
    def relevant_by_first_vote_only(self) -> pd.Series:
        return self.table["votes"].str.split(",").str[0].map(lambda g: g != "-" and int(g) >= 2)


def eval_set_week(layout: Layout, week: str, tiers: TiersSettings, voters: Sequence[Judge],
                  progress: Callable[[str], None] | None = None) -> EvalSetResult:
    """``tiers.eval_queries`` queries first seen this week (``first_week_eval_queries`` in the first
    week, when there are no earlier eval sets), each pair confirmed by judge votes."""
    labels, _ = labels_to_date(layout, week)
    seen_before = set(labels.loc[labels["week"] < week, "query_key"])
    asked = {"pairs": 0}

    def vote_of(voter: Judge):
        def vote(rows: pd.DataFrame) -> list:
            requests = [JudgeRequest(q, c, t, int(r)) for q, c, t, r in
                        zip(rows["query"], rows["chunk_id"], rows["chunk_text"], rows["rank"])]
            asked["pairs"] += len(requests)
            return counted_grades(voter.judge(requests, progress=progress))
        return vote

    out = build_eval_set(labels[labels["week"] == week], n_queries=tiers.eval_queries_in(week), seed=tiers.seed,
                         seen_before=seen_before, extra_votes=[vote_of(v) for v in voters])
    return EvalSetResult(out, len(seen_before), len(voters) + 1, asked["pairs"])


def fewshot_set_week(layout: Layout, dataset_dir: Path, week: str, tiers: TiersSettings) -> tuple[pd.DataFrame, list[str]]:
    """Labelled examples balanced across grades for later weeks' judge prompts (never held-out queries)."""
    labels, weeks = labels_to_date(layout, week)
    out = build_fewshot_set(labels, n_examples=tiers.fewshot_examples, seed=tiers.seed,
                            exclude_queries=held_out(layout, dataset_dir, week).keys)
    return out, weeks


def finetune_set_week(layout: Layout, dataset_dir: Path, week: str,
                      tiers: TiersSettings) -> tuple[pd.DataFrame, FinetuneStats, list[str]]:
    """(query, relevant chunk, hard negative) rows from every labelled week to date."""
    labels, weeks = labels_to_date(layout, week)
    hold = held_out(layout, dataset_dir, week)
    out, stats = build_finetune_set(
        labels, n_examples=tiers.finetune_examples, seed=tiers.seed, exclude_queries=hold.keys,
        near_duplicate_of=hold.texts, near_duplicate_jaccard=tiers.near_duplicate_jaccard,
    )
    return out, stats, weeks


@dataclass
class Leaks:
    eval_queries: set[str] = field(default_factory=set)
    test_queries: set[str] = field(default_factory=set)
    near_duplicates: set[str] = field(default_factory=set)
    eval_weeks: int = 0

    @property
    def any(self) -> bool:
        return bool(self.eval_queries or self.test_queries or self.near_duplicates)


def training_leaks(layout: Layout, dataset_dir: Path, week: str, tiers: TiersSettings) -> Leaks:
    """Held-out queries (or near-duplicates of them) that reached this week's fine-tuning set."""
    out = store.read_table(layout.asset("finetune_set", week))
    evals, eval_weeks = eval_sets_to_date(layout, week)
    hold = held_out(layout, dataset_dir, week)
    return Leaks(
        eval_queries=overlapping_queries(out["query"], evals["query"]),
        test_queries=set(out["query_key"]) & hold.test_keys,
        near_duplicates=near_duplicate_queries(out["query"].unique(), hold.texts, threshold=tiers.near_duplicate_jaccard),
        eval_weeks=len(eval_weeks),
    )


def latest_fewshot_before(layout: Layout, week: str) -> tuple[pd.DataFrame | None, str | None]:
    """The newest few-shot set from an earlier week: the loop an asset graph cannot draw."""
    earlier = [w for w in layout.weeks_written("fewshot_set") if w < week]
    if not earlier:
        return None, None
    return store.read_table(layout.asset("fewshot_set", earlier[-1])), earlier[-1]
