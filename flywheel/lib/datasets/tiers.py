"""Three tiers from one labelled pool ("wax on, wax off"): the same judged pairs serve
20 queries to evaluate, 200 examples to teach the judge, and 2,000 examples to fine-tune.

The split is by query and deterministic. A week's eval set takes queries that first appeared
that week (never seen in an earlier week, so no earlier model was trained on them), chosen by
a stable hash of the normalised query text. From then on they are held out: every later
few-shot and fine-tuning set excludes all eval-set queries to date, also when users ask them
again.
"""

from __future__ import annotations

from flywheel.config import TiersSettings, default_of
import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import pandas as pd

from flywheel.lib.labels.judges import RELEVANT_GRADE, normalize_query, stable_uniform

EVAL_COLUMNS = ["week", "query", "query_key", "chunk_id", "rank", "grade", "relevant", "votes"]
NOT_ASKED = "."  # in ``votes``: a vote not asked, because the majority was decided without it
Vote = Callable[[pd.DataFrame], list]  # one judge vote: a grade (or None: unlabelled) per row asked
FEWSHOT_COLUMNS = ["week", "query", "query_key", "chunk_id", "chunk_text", "grade", "reason"]
FINETUNE_COLUMNS = [
    "query", "query_key", "positive_id", "positive", "negative_id", "negative", "negative_rank", "week",
]


def content_hash(df: pd.DataFrame) -> str:
    """Order-independent sha256 of a dataset's rows: the version recorded with every model."""
    rows = sorted(df.astype(str).apply(lambda r: "\x1f".join(r.values), axis=1).tolist())
    h = hashlib.sha256()
    for row in rows:
        h.update(row.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def usable(labels: pd.DataFrame) -> pd.DataFrame:
    """Labelled rows that may enter a dataset: graded, and not flagged for prompt injection
    (a chunk that tells the grader what to answer never teaches or measures a model)."""
    out = labels[labels["grade"].notna()]
    if "injection_flag" in out.columns:
        out = out[~out["injection_flag"].fillna(False).astype(bool)]
    return out


def latest_usable(labels: pd.DataFrame) -> pd.DataFrame:
    """Usable labels with one row per (query, chunk): a pair judged in several weeks keeps its latest."""
    return usable(labels).sort_values("week", kind="stable").drop_duplicates(["query_key", "chunk_id"], keep="last")


def _latest_request_per_query(labels: pd.DataFrame) -> pd.DataFrame:
    """A query asked twice keeps only its latest request's results (what users saw last)."""
    last = labels.groupby("query_key")["request_id"].max()
    return labels[labels["request_id"].isin(set(last.values))]


def build_eval_set(
    week_labels: pd.DataFrame,
    *,
    n_queries: int,
    seed: int,
    seen_before: set[str],
    extra_votes: Sequence[Vote] = (),
) -> pd.DataFrame:
    """``n_queries`` queries new this week, with their judged results.

    Queries are drawn by a stable hash of their text, whatever the serving model retrieved for
    them. Why not only queries where it retrieved a relevant chunk: that condition selects the
    queries the incumbent already answers and drops those where only a challenger would find the
    answer, so every comparison starts biased toward the model that served. A query with no
    relevant chunk among the served results stays in the set; the report's pooling judges every
    compared model's top results for it, and a query scores once some model surfaced a relevant
    chunk (the TREC rule: a query with no known relevant document cannot be scored).

    The first vote is the judge's own grade, not the label fused with users' feedback: feedback
    exists only for chunks the serving model showed, so fused labels would find more of the
    incumbent's relevant chunks than pooling can find of a challenger's.

    ``extra_votes`` ask the judge again about the chosen rows (each returns a grade per row it is
    asked about; ``confirm_by_majority`` asks each only where the majority is still open) and a
    chunk is relevant for evaluation only by majority: the week's label is the first vote.
    Why: one vote's lenient calls land on near misses, the chunks good retrievers rank high, and a
    single vote's mistakes then decide which model looks better; a majority of votes cancels most.
    """
    labels = usable(week_labels)
    labels = labels[~labels["query_key"].isin(seen_before)]
    labels = _latest_request_per_query(labels)
    candidates = sorted(labels["query_key"].unique(), key=lambda k: stable_uniform("eval", seed, k))
    chosen = judge_only(labels[labels["query_key"].isin(set(candidates[:n_queries]))].sort_values(["query_key", "rank"]))
    if chosen.empty:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    if not extra_votes:
        chosen = chosen.assign(votes=chosen["grade"].map(lambda g: str(int(g))))
    else:
        chosen = confirm_by_majority(chosen, extra_votes)
    return chosen[EVAL_COLUMNS].reset_index(drop=True)


def judge_only(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows graded by the judge alone (``judge_grade``, when the labels carry it); a pair only
    feedback labelled counts as unjudged, as it would be for any model that did not serve."""
    if "judge_grade" not in rows.columns:
        return rows
    rows = rows[rows["judge_grade"].notna()]
    return rows.assign(grade=rows["judge_grade"], relevant=rows["judge_grade"].astype(int) >= RELEVANT_GRADE)


def majority_decided(yes: int, counted: int, remaining: int) -> bool:
    """Whether ``remaining`` more votes could no longer change a majority of ``yes`` relevant among
    ``counted`` votes (all of them relevant, or none, or unlabelled, which do not count)."""
    return 2 * yes > counted + remaining or 2 * yes + remaining <= counted


def confirm_by_majority(rows: pd.DataFrame, voters: Sequence[Vote]) -> pd.DataFrame:
    """``relevant`` by majority over the first label and the voters' votes (grade >= 2 is a yes;
    a vote that came back unlabelled does not count; a tie is not a majority).

    Each voter is asked, in turn, only about the rows whose majority it and the voters after it
    could still change (``majority_decided``): with three votes, the third is asked only where the
    first two disagree. The outcome is the one every voter asked about every row would give; the
    calls not needed are not paid for. ``votes`` records every grade: "-" came back unlabelled,
    ``NOT_ASKED`` was not needed."""
    rows = rows.copy()
    yes = rows["relevant"].astype(bool).astype(int).tolist()
    counted = [1] * len(rows)
    votes = [[str(int(g))] for g in rows["grade"]]
    for k, vote in enumerate(voters):
        ask = [i for i in range(len(rows)) if not majority_decided(yes[i], counted[i], len(voters) - k)]
        grades = list(vote(rows.iloc[ask])) if ask else []
        if len(grades) != len(ask):
            raise ValueError(f"a vote returned {len(grades)} grades for {len(ask)} rows")
        got = dict(zip(ask, grades))
        for i in range(len(rows)):
            if i not in got:
                votes[i].append(NOT_ASKED)
                continue
            g = got[i]
            votes[i].append("-" if g is None else str(int(g)))
            if g is not None:
                counted[i] += 1
                yes[i] += int(g >= RELEVANT_GRADE)
    rows["relevant"] = [2 * y > c for y, c in zip(yes, counted)]
    rows["votes"] = [",".join(v) for v in votes]
    return rows


def votes_description(eval_sets: pd.DataFrame) -> str:
    """How an eval set's pairs were called relevant, from its ``votes`` column (for reports)."""
    if "votes" not in eval_sets or eval_sets["votes"].isna().all():
        return "one vote per pair"
    votes = eval_sets["votes"].dropna()
    n = int(votes.str.count(",").max()) + 1
    if n == 1:
        return "one vote per pair"
    skipped = votes.str.split(",").explode().eq(NOT_ASKED).sum()
    return f"relevant by a majority of {n} judge votes per pair" + (
        f" ({skipped} votes not asked: the majority was already decided)" if skipped else "")


def build_fewshot_set(
    labels: pd.DataFrame, *, n_examples: int, seed: int, exclude_queries: set[str]
) -> pd.DataFrame:
    """``n_examples`` labelled pairs of non-held-out queries, balanced across grades."""
    pool = usable(labels)
    pool = pool[~pool["query_key"].isin(exclude_queries)]
    pool = pool.drop_duplicates(["query_key", "chunk_id"], keep="last")
    grades = sorted(pool["grade"].dropna().astype(int).unique())
    if not grades:
        return pd.DataFrame(columns=FEWSHOT_COLUMNS)
    pool = pool.assign(_order=[stable_uniform("fewshot", seed, k, c) for k, c in zip(pool["query_key"], pool["chunk_id"])])
    by_grade = {g: pool[pool["grade"] == g].sort_values("_order") for g in grades}
    # round-robin over grades so rare grades are as present as the data allows
    picked, cursor = [], {g: 0 for g in grades}
    while len(picked) < n_examples and any(cursor[g] < len(by_grade[g]) for g in grades):
        for g in grades:
            if cursor[g] < len(by_grade[g]) and len(picked) < n_examples:
                picked.append(by_grade[g].iloc[cursor[g]])
                cursor[g] += 1
    out = pd.DataFrame(picked)
    return out[FEWSHOT_COLUMNS].reset_index(drop=True)


@dataclass
class FinetuneStats:
    rows: int
    queries: int
    positives: int
    hard_negatives_available: int
    excluded_queries: int
    content_sha256: str
    near_duplicates_excluded: int = 0


def _round_robin_triplets(positives: pd.DataFrame, negatives: pd.DataFrame, *, n_examples: int, seed: int) -> list[dict]:
    """Triplet rows filled round-robin over (query, positive) pairs in a stable random order:
    every pair gets its hardest negative before any gets its second."""
    negs_by_query = {k: g for k, g in negatives.groupby("query_key")}
    pairs = []
    for pos in positives.sort_values(["query_key", "chunk_id"]).itertuples(index=False):
        negs = negs_by_query.get(pos.query_key)
        if negs is not None and len(negs):
            pairs.append((pos, negs))
    pairs.sort(key=lambda p: stable_uniform("finetune", seed, p[0].query_key, p[0].chunk_id))
    rows, depth = [], 0
    while len(rows) < n_examples and pairs and depth < max(len(n) for _, n in pairs):
        for pos, negs in pairs:
            if depth < len(negs) and len(rows) < n_examples:
                neg = negs.iloc[depth]
                rows.append({
                    "query": pos.query, "query_key": pos.query_key,
                    "positive_id": pos.chunk_id, "positive": pos.chunk_text,
                    "negative_id": neg["chunk_id"], "negative": neg["chunk_text"],
                    "negative_rank": int(neg["rank"]), "week": pos.week,
                })
        depth += 1
    return rows


def build_finetune_set(
    labels: pd.DataFrame,
    *,
    n_examples: int,
    seed: int,
    exclude_queries: set[str],
    near_duplicate_of: Iterable[str] = (),
    near_duplicate_jaccard: float = default_of(TiersSettings, "near_duplicate_jaccard"),
) -> tuple[pd.DataFrame, FinetuneStats]:
    """(query, positive, hard negative) triplets from every non-held-out query of the weeks given.

    Positives are chunks judged relevant (grade >= 2); hard negatives were retrieved for the same
    query but judged irrelevant (grade 0), hardest (best ranked) first. "Related" chunks
    (grade 1) are neither: calling them negatives would teach the model to push away near-misses.
    Rows are filled round-robin across (query, positive) pairs so every query gets its hardest
    negative before any gets a second one.
    """
    pool = usable(labels).copy()
    excluded = pool["query_key"].isin(exclude_queries)
    excluded_n = pool.loc[excluded, "query_key"].nunique()
    pool = pool[~excluded]
    # a training query that is a near-duplicate of a held-out one would leak it ("the same question,
    # reworded"): drop it too
    near = near_duplicate_queries(pool["query"].unique(), near_duplicate_of, threshold=near_duplicate_jaccard)
    near_keys = {normalize_query(q) for q in near}
    pool = pool[~pool["query_key"].isin(near_keys)]
    pool = pool.sort_values("week").drop_duplicates(["query_key", "chunk_id"], keep="last")

    positives = pool[pool["grade"] >= 2]
    negatives = pool[pool["grade"] == 0].sort_values(["query_key", "rank"])
    rows = _round_robin_triplets(positives, negatives, n_examples=n_examples, seed=seed)
    out = pd.DataFrame(rows, columns=FINETUNE_COLUMNS)
    stats = FinetuneStats(
        rows=len(out),
        queries=out["query_key"].nunique() if len(out) else 0,
        positives=len(positives),
        hard_negatives_available=len(negatives),
        excluded_queries=excluded_n,
        content_sha256=content_hash(out),
        near_duplicates_excluded=len(near_keys),
    )
    return out, stats


def overlapping_queries(a: pd.Series, b: pd.Series) -> set[str]:
    return set(map(normalize_query, a)) & set(map(normalize_query, b))


def query_tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


def near_duplicate_queries(candidates: Iterable[str], held_out: Iterable[str], *, threshold: float = 0.8) -> set[str]:
    """Candidates whose token set has Jaccard >= ``threshold`` with some held-out query.

    Exact duplicates (Jaccard 1) are included: this check subsumes the exact one.
    """
    held = [query_tokens(h) for h in held_out]
    if not held:
        return set()
    by_token: dict[str, list[int]] = {}
    for i, toks in enumerate(held):
        for t in toks:
            by_token.setdefault(t, []).append(i)
    out = set()
    for cand in candidates:
        toks = query_tokens(cand)
        seen = {i for t in toks for i in by_token.get(t, ())}
        if any(jaccard(toks, held[i]) >= threshold for i in seen) or (not toks and any(not h for h in held)):
            out.add(cand)
    return out
