"""relevance_labels: a judge grades every (query, retrieved chunk) pair of the week, fused with the
week's explicit feedback; a blocking check stops labels from a judge that disagrees with the
reference (human labels, else explicit feedback) before they can train a model."""



import dagster as dg

from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import JudgeResource, PathsResource, TiersResource
from flywheel.layout import RAW_LOGS, RELEVANCE_LABELS
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.weekly import latest_fewshot_before
from flywheel.lib.labels.gate import check_labels
from flywheel.lib.labels.judges import HumanLabels, Judge, SimulatedJudge
from flywheel.lib.labels.weekly import agreement_with_reference, label_week
from flywheel.lib.logs.ingest import load_raw_logs


def build_judge(judge: JudgeResource, paths: PathsResource, tiers: TiersResource, vote: int = 0) -> Judge:
    """The week's judge (vote 0), or an independent re-ask of it for eval-set votes (vote >= 1)."""
    cfg, p = judge.settings(), paths.settings()
    if cfg.kind == "simulated":
        # each vote errs independently
        return SimulatedJudge(load_beir(p.dataset), cfg, seed=tiers.settings().seed + 1000 * vote)
    from flywheel.lib.labels.openai_judge import PROMPT_VERSION, OpenAIJudge, choose_api_key

    if vote:  # a re-ask at temperature 0 would mostly repeat the first answer; each vote has its own cache key
        cfg = cfg.with_(temperature=max(cfg.temperature, cfg.eval_vote_temperature))
    return OpenAIJudge(
        cfg,
        # OPENAI_API_KEY goes to OpenAI's own API only; any other endpoint gets FLYWHEEL_JUDGE_API_KEY
        api_key=choose_api_key(cfg.base_url, judge.api_key, getattr(judge, "openai_api_key", None)),
        cache_path=str(paths.layout().judge_cache),
        prompt_version=PROMPT_VERSION if vote == 0 else f"{PROMPT_VERSION}+vote{vote}",
    )


@dg.asset(
    partitions_def=weekly_partitions,
    deps=[RAW_LOGS],
    group_name="labels",
    kinds={"python", "parquet"},
)
def relevance_labels(
    context: dg.AssetExecutionContext, paths: PathsResource, tiers: TiersResource, judge: JudgeResource
) -> dg.MaterializeResult:
    """Every (query, retrieved chunk) pair of the week with a graded label (0-3) and its source."""
    week, layout = context.partition_key, paths.layout()
    raw = load_raw_logs(layout.asset(RAW_LOGS, week))
    the_judge = build_judge(judge, paths, tiers)
    fewshot, fewshot_week = latest_fewshot_before(layout, week)
    labels, stats = label_week(
        raw, week, the_judge,
        human=HumanLabels(load_beir(paths.settings().dataset)),
        fewshot=fewshot,
        progress=context.log.info,
    )
    path = store.write_table(layout.asset(RELEVANCE_LABELS, week), labels)
    return dg.MaterializeResult(metadata=_labels_metadata(labels, stats, the_judge, path, fewshot_week))


def _md_counts(header: str, counts) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"| {header} | pairs |\n|---|---|\n" + "\n".join(f"| {k} | {n} |" for k, n in counts.items()))


def _labels_metadata(labels, stats, the_judge, path, fewshot_week) -> dict:
    usage = the_judge.usage
    kappa, compared, reference = agreement_with_reference(labels)
    extra = {f"judge_{k}": (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in usage.extra.items()}
    return {
        **extra,
        "path": dg.MetadataValue.path(str(path)),
        "dagster/row_count": stats.pairs,
        "unique_pairs_judged": stats.unique_pairs,
        "labelled": stats.labelled,
        "unlabelled": stats.unlabelled,
        "relevant": stats.relevant,
        "grades": _md_counts("grade", stats.grade_counts),
        "judge": the_judge.name,
        "kappa_vs_human": dg.MetadataValue.float(stats.kappa_vs_human),
        "kappa_pairs_compared": stats.human_compared,
        "judge_kappa": dg.MetadataValue.float(float(kappa)),
        "judge_kappa_reference": reference,
        "judge_kappa_pairs": compared,
        "judge_kappa_vs_feedback": dg.MetadataValue.float(float(stats.kappa_vs_feedback)),
        "feedback_pairs_compared": stats.feedback_compared,
        "fused_grade_changes": stats.fused_changed,
        "label_sources": _md_counts("label source", stats.label_sources),
        "fewshot_version": fewshot_week or "none (first week)",
        "judge_calls": usage.calls,
        "judge_cached": usage.cached,
        "judge_tokens": usage.prompt_tokens + usage.completion_tokens,
        "judge_cost_usd": dg.MetadataValue.float(float(usage.cost_usd)),
        "judge_prompt_tokens": usage.prompt_tokens,
        "judge_completion_tokens": usage.completion_tokens,
        "judge_failures": usage.failures,
        "judge_budget_exhausted": int(usage.extra.get("budget_exhausted", 0)),
    }


@dg.asset_check(asset=relevance_labels, blocking=True, partitions_def=weekly_partitions)
def judge_agrees_with_reference(
    context: dg.AssetCheckExecutionContext, paths: PathsResource, judge: JudgeResource
) -> dg.AssetCheckResult:
    """Labels must not train a model when too many pairs went unlabelled, when the judge disagrees
    with the reference (human labels, else explicit feedback), or when agreement cannot be measured
    (unless allowed). The rules live in ``flywheel.lib.labels.gate``."""
    labels = store.read_table(paths.layout().asset(RELEVANCE_LABELS, context.partition_key))
    cfg = judge.settings()
    result = check_labels(labels, min_kappa=cfg.min_kappa, max_unlabelled_share=cfg.max_unlabelled_share,
                          allow_no_kappa=cfg.allow_no_kappa)
    meta = dict(result.metadata)
    by_reason = meta.pop("labels_by_reason")
    meta["kappa"] = dg.MetadataValue.float(meta["kappa"])
    meta["unlabelled_share"] = dg.MetadataValue.float(meta["unlabelled_share"])
    meta["labels_by_reason"] = dg.MetadataValue.md(
        "| labels | pairs |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in by_reason.items()))
    return dg.AssetCheckResult(passed=result.passed, metadata=meta, description=result.description)


defs = dg.Definitions(assets=[relevance_labels], asset_checks=[judge_agrees_with_reference])
