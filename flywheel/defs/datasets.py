"""Three tiers from one labelled pool: eval_set (20 queries), fewshot_set (200), finetune_set (2,000).

Wiring only: the work is in ``flywheel.lib.datasets.weekly``.
"""

import dagster as dg

from flywheel.defs.labels import build_judge
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import JudgeResource, PathsResource, TiersResource
from flywheel.layout import EVAL_SET, FEWSHOT_SET, FINETUNE_SET, RELEVANCE_LABELS
from flywheel.lib import store
from flywheel.lib.datasets import weekly


def _md_table(header: tuple[str, str], rows) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"| {header[0]} | {header[1]} |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows))


@dg.asset(partitions_def=weekly_partitions, deps=[RELEVANCE_LABELS], group_name="datasets", kinds={"parquet"})
def eval_set(context: dg.AssetExecutionContext, paths: PathsResource, tiers: TiersResource,
             judge: JudgeResource) -> dg.MaterializeResult:
    """20 of this week's queries with their judged results, each pair confirmed by a majority of
    judge votes; they never enter training."""
    week, layout, t = context.partition_key, paths.layout(), tiers.settings()
    voters = [build_judge(judge, paths, tiers, vote=v) for v in range(1, t.eval_votes)]
    res = weekly.eval_set_week(layout, week, t, voters, progress=context.log.info)
    out = res.table
    path = store.write_table(layout.asset(EVAL_SET, week), out)
    first_only = res.relevant_by_first_vote_only
    per_query = out.groupby("query").agg(judged=("chunk_id", "size"), relevant=("relevant", "sum")).reset_index()
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "queries": int(out["query_key"].nunique()),
        # the rest score once the report's pooling finds a relevant chunk for them in some model's top results
        "queries_with_a_relevant_served_result": int(out.groupby("query_key")["relevant"].any().sum()) if len(out) else 0,
        "dagster/row_count": len(out),
        "queries_seen_in_earlier_weeks": res.seen_before,
        "relevant_pairs": int(out["relevant"].sum()),
        "judge_votes_per_pair": res.votes_per_pair,
        "extra_votes_asked": res.extra_votes_asked,
        "relevant_by_first_vote_only": int(first_only.sum()),
        "relevant_overturned_by_votes": int((first_only & ~out["relevant"]).sum()),
        "queries_table": dg.MetadataValue.md(per_query.head(20).to_markdown(index=False)),
    })


def _size_check(asset: str, count_queries: bool, minimum: int, week: str, layout) -> dg.AssetCheckResult:
    out = store.read_table(layout.asset(asset, week))
    n = int(out["query_key"].nunique()) if count_queries else len(out)
    unit = "queries" if count_queries else "examples"
    return dg.AssetCheckResult(passed=n >= minimum, metadata={unit: n, "minimum": minimum},
                               description=f"{n} {unit} in {asset} (minimum {minimum})")


@dg.asset_check(asset=eval_set, blocking=True, partitions_def=weekly_partitions)
def eval_set_size(context: dg.AssetCheckExecutionContext, paths: PathsResource, tiers: TiersResource) -> dg.AssetCheckResult:
    return _size_check(EVAL_SET, True, tiers.settings().eval_queries_floor, context.partition_key, paths.layout())


@dg.asset(partitions_def=weekly_partitions, deps=[RELEVANCE_LABELS, EVAL_SET], group_name="datasets", kinds={"parquet"})
def fewshot_set(context: dg.AssetExecutionContext, paths: PathsResource, tiers: TiersResource) -> dg.MaterializeResult:
    """200 labelled examples, balanced across grades, for the judge's prompt in later weeks."""
    week, layout, p = context.partition_key, paths.layout(), paths.settings()
    out, weeks = weekly.fewshot_set_week(layout, p.dataset, week, tiers.settings())
    path = store.write_table(layout.asset(FEWSHOT_SET, week), out)
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": len(out),
        "weeks_used": ", ".join(weeks),
        "grades": _md_table(("grade", "examples"), out["grade"].value_counts().sort_index().items()),
    })


@dg.asset_check(asset=fewshot_set, blocking=True, partitions_def=weekly_partitions)
def fewshot_set_size(context: dg.AssetCheckExecutionContext, paths: PathsResource, tiers: TiersResource) -> dg.AssetCheckResult:
    return _size_check(FEWSHOT_SET, False, tiers.settings().fewshot_floor, context.partition_key, paths.layout())


@dg.asset(partitions_def=weekly_partitions, deps=[RELEVANCE_LABELS, EVAL_SET], group_name="datasets", kinds={"parquet"})
def finetune_set(context: dg.AssetExecutionContext, paths: PathsResource, tiers: TiersResource) -> dg.MaterializeResult:
    """(query, relevant chunk, hard negative) triplets from all labelled weeks to date."""
    week, layout, p = context.partition_key, paths.layout(), paths.settings()
    out, stats, weeks = weekly.finetune_set_week(layout, p.dataset, week, tiers.settings())
    path = store.write_table(layout.asset(FINETUNE_SET, week), out)
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
        "sample": dg.MetadataValue.md(out[["query", "positive_id", "negative_id", "negative_rank"]].head(10).to_markdown(index=False)),
    })


@dg.asset_check(asset=finetune_set, blocking=True, partitions_def=weekly_partitions)
def finetune_set_size(context: dg.AssetCheckExecutionContext, paths: PathsResource, tiers: TiersResource) -> dg.AssetCheckResult:
    return _size_check(FINETUNE_SET, False, tiers.settings().finetune_floor, context.partition_key, paths.layout())


@dg.asset_check(asset=finetune_set, blocking=True, partitions_def=weekly_partitions)
def finetune_disjoint_from_eval(context: dg.AssetCheckExecutionContext, paths: PathsResource,
                                tiers: TiersResource) -> dg.AssetCheckResult:
    """No eval-set query (any week to date) and no test-split query may be trained on, nor a
    near-duplicate of one (token-set Jaccard >= ``near_duplicate_jaccard``)."""
    t = tiers.settings()
    leaks = weekly.training_leaks(paths.layout(), paths.settings().dataset, context.partition_key, t)
    return dg.AssetCheckResult(
        passed=not leaks.any,
        metadata={
            "eval_weeks_compared": leaks.eval_weeks,
            "eval_queries_in_training": len(leaks.eval_queries),
            "test_queries_in_training": len(leaks.test_queries),
            "near_duplicates_in_training": len(leaks.near_duplicates),
            "near_duplicate_jaccard": t.near_duplicate_jaccard,
            "examples": dg.MetadataValue.json(sorted(leaks.eval_queries | leaks.test_queries | leaks.near_duplicates)[:10]),
        },
    )


defs = dg.Definitions(
    assets=[eval_set, fewshot_set, finetune_set],
    asset_checks=[eval_set_size, fewshot_set_size, finetune_set_size, finetune_disjoint_from_eval],
)
