"""Three tiers from one labelled pool: eval_set (20 queries), fewshot_set (200), finetune_set (2,000)."""


import dagster as dg
import pandas as pd

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.labels import build_judge
from flywheel.defs.resources import FlywheelPaths, JudgeResource
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.tiers import (
    build_eval_set,
    build_fewshot_set,
    build_finetune_set,
    near_duplicate_queries,
    overlapping_queries,
)
from flywheel.lib.labels.judges import JudgeRequest, normalize_query


def labels_to_date(paths: FlywheelPaths, week: str) -> tuple[pd.DataFrame, list[str]]:
    """Every labelled week up to and including this one."""
    weeks = store.weeks_written(paths.assets_dir, "relevance_labels", up_to=week)
    if week not in weeks:
        raise FileNotFoundError(f"relevance_labels for {week} is missing: materialize it first")
    frames = [store.read_table(store.asset_path(paths.assets_dir, "relevance_labels", w)) for w in weeks]
    return pd.concat(frames, ignore_index=True), weeks


def eval_sets_to_date(paths: FlywheelPaths, week: str) -> tuple[pd.DataFrame, list[str]]:
    weeks = store.weeks_written(paths.assets_dir, "eval_set", up_to=week)
    if not weeks:
        return pd.DataFrame(columns=["query", "query_key", "chunk_id", "relevant"]), []
    frames = [store.read_table(store.asset_path(paths.assets_dir, "eval_set", w)) for w in weeks]
    return pd.concat(frames, ignore_index=True), weeks


def held_out_texts(paths: FlywheelPaths, week: str) -> list[str]:
    """The texts of every held-out query (eval sets to date, test split), for near-duplicate checks."""
    evals, _ = eval_sets_to_date(paths, week)
    ds = load_beir(paths.dataset_dir)
    test = list(ds.split_queries("test").values()) if ds.has_test_split else []
    return sorted(set(evals["query"])) + test


def held_out_queries(paths: FlywheelPaths, week: str) -> tuple[set[str], set[str]]:
    """Queries that must never be trained on: every eval set to date, and the dataset's test split."""
    evals, _ = eval_sets_to_date(paths, week)
    ds = load_beir(paths.dataset_dir)
    test = {normalize_query(t) for t in ds.split_queries("test").values()} if ds.has_test_split else set()
    return set(evals["query_key"]), test


@dg.asset(partitions_def=weekly_partitions, deps=["relevance_labels"], group_name="datasets", kinds={"parquet"})
def eval_set(context: dg.AssetExecutionContext, paths: FlywheelPaths, judge: JudgeResource) -> dg.MaterializeResult:
    """20 of this week's queries with their judged results, each pair confirmed by a majority of
    judge votes; they never enter training."""
    week = context.partition_key
    labels, _ = labels_to_date(paths, week)
    seen_before = set(labels.loc[labels["week"] < week, "query_key"])
    s = paths.settings()
    voters = [build_judge(judge, paths, vote=v) for v in range(1, max(judge.eval_votes, 1))]
    asked = {"pairs": 0}

    def extra_votes(rows: pd.DataFrame) -> list[list]:
        requests = [JudgeRequest(q, c, t, int(r)) for q, c, t, r in
                    zip(rows["query"], rows["chunk_id"], rows["chunk_text"], rows["rank"])]
        asked["pairs"] += len(requests) * len(voters)
        return [[j.grade for j in voter.judge(requests, progress=context.log.info)] for voter in voters]

    week_labels = labels[labels["week"] == week]
    out = build_eval_set(week_labels, n_queries=s.eval_queries, seed=s.seed, seen_before=seen_before,
                         extra_votes=extra_votes if voters else None)
    path = store.write_table(store.asset_path(paths.assets_dir, "eval_set", week), out)
    single = out["votes"].str.split(",").str[0].map(lambda g: g != "-" and int(g) >= 2)
    per_query = out.groupby("query").agg(judged=("chunk_id", "size"), relevant=("relevant", "sum")).reset_index()
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "queries": int(out["query_key"].nunique()),
        "dagster/row_count": len(out),
        "queries_seen_in_earlier_weeks": len(seen_before),
        "relevant_pairs": int(out["relevant"].sum()),
        "judge_votes_per_pair": max(judge.eval_votes, 1),
        "extra_votes_asked": asked["pairs"],
        "relevant_by_first_vote_only": int(single.sum()),
        "relevant_overturned_by_votes": int((single & ~out["relevant"]).sum()),
        "queries_table": dg.MetadataValue.md(per_query.head(20).to_markdown(index=False)),
    })


@dg.asset_check(asset=eval_set, blocking=True, partitions_def=weekly_partitions)
def eval_set_size(context: dg.AssetCheckExecutionContext, paths: FlywheelPaths) -> dg.AssetCheckResult:
    out = store.read_table(store.asset_path(paths.assets_dir, "eval_set", context.partition_key))
    n = int(out["query_key"].nunique())
    return dg.AssetCheckResult(
        passed=n >= paths.min_eval_queries,
        metadata={"queries": n, "minimum": paths.min_eval_queries},
        description=f"{n} eval queries (minimum {paths.min_eval_queries})",
    )


@dg.asset(partitions_def=weekly_partitions, deps=["relevance_labels", "eval_set"], group_name="datasets", kinds={"parquet"})
def fewshot_set(context: dg.AssetExecutionContext, paths: FlywheelPaths) -> dg.MaterializeResult:
    """200 labelled examples, balanced across grades, for the judge's prompt in later weeks."""
    week = context.partition_key
    labels, weeks = labels_to_date(paths, week)
    eval_q, test_q = held_out_queries(paths, week)
    s = paths.settings()
    out = build_fewshot_set(
        labels, n_examples=s.fewshot_examples, seed=s.seed, exclude_queries=eval_q | test_q,
    )
    path = store.write_table(store.asset_path(paths.assets_dir, "fewshot_set", week), out)
    grades = out["grade"].value_counts().sort_index()
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": len(out),
        "weeks_used": ", ".join(weeks),
        "grades": dg.MetadataValue.md("| grade | examples |\n|---|---|\n" + "\n".join(f"| {g} | {n} |" for g, n in grades.items())),
    })


@dg.asset_check(asset=fewshot_set, blocking=True, partitions_def=weekly_partitions)
def fewshot_set_size(context: dg.AssetCheckExecutionContext, paths: FlywheelPaths) -> dg.AssetCheckResult:
    out = store.read_table(store.asset_path(paths.assets_dir, "fewshot_set", context.partition_key))
    return dg.AssetCheckResult(
        passed=len(out) >= paths.min_fewshot_examples,
        metadata={"examples": len(out), "minimum": paths.min_fewshot_examples},
    )


@dg.asset(partitions_def=weekly_partitions, deps=["relevance_labels", "eval_set"], group_name="datasets", kinds={"parquet"})
def finetune_set(context: dg.AssetExecutionContext, paths: FlywheelPaths) -> dg.MaterializeResult:
    """(query, relevant chunk, hard negative) triplets from all labelled weeks to date."""
    week = context.partition_key
    labels, weeks = labels_to_date(paths, week)
    eval_q, test_q = held_out_queries(paths, week)
    s = paths.settings()
    out, stats = build_finetune_set(
        labels, n_examples=s.finetune_examples, seed=s.seed, exclude_queries=eval_q | test_q,
        near_duplicate_of=held_out_texts(paths, week), near_duplicate_jaccard=paths.near_duplicate_jaccard,
    )
    path = store.write_table(store.asset_path(paths.assets_dir, "finetune_set", week), out)
    sample = out[["query", "positive_id", "negative_id", "negative_rank"]].head(10)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": stats.rows,
        "queries": stats.queries,
        "positives_available": stats.positives,
        "hard_negatives_available": stats.hard_negatives_available,
        "held_out_queries_excluded": stats.excluded_queries,
        "near_duplicates_of_held_out_excluded": stats.near_duplicates_excluded,
        "weeks_used": ", ".join(weeks),
        "content_sha256": stats.content_sha256,
        "sample": dg.MetadataValue.md(sample.to_markdown(index=False)),
    })


@dg.asset_check(asset=finetune_set, blocking=True, partitions_def=weekly_partitions)
def finetune_set_size(context: dg.AssetCheckExecutionContext, paths: FlywheelPaths) -> dg.AssetCheckResult:
    out = store.read_table(store.asset_path(paths.assets_dir, "finetune_set", context.partition_key))
    return dg.AssetCheckResult(
        passed=len(out) >= paths.min_finetune_examples,
        metadata={"examples": len(out), "minimum": paths.min_finetune_examples},
        description=f"{len(out)} training examples (minimum {paths.min_finetune_examples})",
    )


@dg.asset_check(asset=finetune_set, blocking=True, partitions_def=weekly_partitions)
def finetune_disjoint_from_eval(context: dg.AssetCheckExecutionContext, paths: FlywheelPaths) -> dg.AssetCheckResult:
    """No eval-set query (any week to date) and no test-split query may be trained on, nor a
    near-duplicate of one (token-set Jaccard >= ``near_duplicate_jaccard``)."""
    week = context.partition_key
    out = store.read_table(store.asset_path(paths.assets_dir, "finetune_set", week))
    evals, eval_weeks = eval_sets_to_date(paths, week)
    _, test_q = held_out_queries(paths, week)
    leaked_eval = overlapping_queries(out["query"], evals["query"])
    leaked_test = set(out["query_key"]) & test_q
    near = near_duplicate_queries(
        out["query"].unique(), held_out_texts(paths, week), threshold=paths.near_duplicate_jaccard
    )
    return dg.AssetCheckResult(
        passed=not leaked_eval and not leaked_test and not near,
        metadata={
            "eval_weeks_compared": len(eval_weeks),
            "eval_queries_in_training": len(leaked_eval),
            "test_queries_in_training": len(leaked_test),
            "near_duplicates_in_training": len(near),
            "near_duplicate_jaccard": paths.near_duplicate_jaccard,
            "examples": dg.MetadataValue.json(sorted(leaked_eval | leaked_test | near)[:10]),
        },
    )


defs = dg.Definitions(
    assets=[eval_set, fewshot_set, finetune_set],
    asset_checks=[eval_set_size, fewshot_set_size, finetune_set_size, finetune_disjoint_from_eval],
)
