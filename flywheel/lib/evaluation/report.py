"""The weekly report's words: the decision first, then the evidence, then the measurements.

``week_report`` turns a :class:`~flywheel.lib.evaluation.weekly.WeekBenchmark` into the Markdown
report (with its figures), the decision record the gate and the promotion read, and the metrics
logged to MLflow and shown in the Dagster UI.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.lib.evaluation.benchmark import Report, build_report, p50, p95
from flywheel.lib.evaluation.gate import Z_ALPHA, Z_POWER
from flywheel.lib.evaluation.weekly import EVAL_SUITE, TEST_SUITE, Candidates, WeekBenchmark

RULE = ("A candidate replaces what serves when its mean NDCG@10 change over the incumbent on the pooled eval sets "
        "to date is positive, at least the required share of paired-bootstrap resamples put it above zero, and "
        "the bootstrap's 95% CI of the change excludes a regression larger than "
        "the margin (a first stage must also not be worse than the base by more than the margin). "
        "Non-inferiority alone would promote ties; superiority alone would refuse truly better models "
        "while the eval sets are small. The first reranker adds latency to every query, so it must show a "
        "significant gain over its first stage alone (CI above zero).")


@dataclass
class WeekReport:
    report: Report
    decision: str  # the first line
    record: dict  # decision record (JSON) the gate check and the champion asset read
    metrics: dict[str, float]


def decision_line(week: str, wb: WeekBenchmark, cand: Candidates) -> str:
    f = wb.first_stage
    first = (f"first stage: PROMOTE challenger v{cand.challenger['version']} (replacing {cand.champion_label})"
             if f.promote else f"first stage: KEEP {cand.champion_label} (challenger v{cand.challenger['version']} not promoted)")
    if wb.first_stage_fused:
        first += ", compared fused with BM25 as it serves"
    if wb.hybrid is None:
        kw = "keyword fusion: OFF (FLYWHEEL_HYBRID_FUSION=off)"
    else:
        kw = f"keyword fusion: {'SERVE' if wb.hybrid.promote else 'NO'} BM25 fused with the first stage"
    if wb.reranker is None:
        rer = "reranker: NONE serves (no reranker beats its first stage alone)"
    elif wb.serving_reranker and wb.serving_reranker.endswith("+reranker"):
        rer = f"reranker: SERVE new reranker v{cand.reranker['version']}"
    else:
        rer = f"reranker: KEEP serving reranker v{cand.serving_reranker['version']}"
    return f"Week {week}: {first}; {kw}; {rer}."


def _evidence(wb: WeekBenchmark, week_label_calls: int) -> list[str]:
    f, p = wb.first_stage, wb.pool
    share = p.judge_requests / week_label_calls if week_label_calls else float("nan")
    lines = [
        f"- First stage: {f.reason}.",
        *([f"- Keyword fusion: {wb.hybrid.reason}.{_fusion_parts(wb.hybrid_evidence)}"] if wb.hybrid else []),
        *[f"- Reranker: {d.reason}." for d in wb.reranker_decisions],
        f"- Evidence: {f.queries} eval queries from {len(wb.eval_weeks)} weekly eval sets; minimum detectable NDCG@10 "
        f"change {f.vs_incumbent.mde:.4f} (80% power, two-sided 5%: ({Z_ALPHA} + {Z_POWER}) x bootstrap SE "
        f"{f.vs_incumbent.se:.4f}).",
        f"- Rule: {RULE} Margin {f.margin}; required share of resamples {f.min_confidence:.0%}.",
        f"- Pooling: every compared model's top eval chunks are judged before scoring: {p.pairs_added} pairs added this "
        f"week ({p.judge_requests} judge requests, {share:.0%} of the week's {week_label_calls} labelling calls; "
        f"by model: {', '.join(f'{k} {v}' for k, v in sorted(p.by_model.items())) or 'none'}). Deeper metrics "
        f"(Recall@20/40) skip unjudged chunks below the pool depth.",
    ]
    if wb.test:
        t, d = wb.test["first_stage"], wb.test["first_stage_dense"]
        lines.append(f"- Test split (human labels, not used to decide): {t['candidate']} vs {t['incumbent']} NDCG@10 "
                     f"change {t['delta']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]"
                     + (f"; the dense models alone {d['delta']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]."
                        if wb.first_stage_fused else "."))
    return lines


def _fusion_parts(evidence: dict | None) -> str:
    """The keyword-fusion decision's two parts, when this week's new queries counted too."""
    if not evidence or "new_queries" not in evidence:
        return ""
    e, n = evidence["eval"], evidence["new_queries"]
    return (f" Its parts: the eval sets {e['delta']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}] on {e['n']} queries; "
            f"this week's new queries (labelled with one vote, the fused list's unjudged top chunks pooled with the "
            f"same vote) {n['delta']:+.4f} [{n['ci_low']:+.4f}, {n['ci_high']:+.4f}] on {n['n']}.")


def _metrics(wb: WeekBenchmark) -> dict[str, float]:
    bench, out = wb.bench, {}
    labels = {"challenger": "trained", wb.serving_retriever + "+reranker": "reranked"}
    for suite, key in ((EVAL_SUITE, "eval"), (TEST_SUITE, "test")):
        for model in bench.summaries.get(suite, {}):
            for m, v in bench.summary(suite, model).items():
                if m != "queries":
                    out[f"{key}_{labels.get(model, model)}_{m}"] = v
    out["rerank_ms_p50"], out["rerank_ms_p95"] = p50(bench.rerank_ms), p95(bench.rerank_ms)
    for model, ms in bench.latency_ms.items():
        if "reranker" not in model:
            key = model.replace("+", "_")
            out[f"retrieval_ms_p50_{key}"], out[f"retrieval_ms_p95_{key}"] = p50(ms), p95(ms)
    out["gate_promote"] = float(wb.first_stage.promote)
    out["gate_reranker_serves"] = float(wb.reranker is not None)
    out["gate_keyword_fusion_serves"] = float(wb.serving_hybrid is not None)
    out["gate_ci_low_vs_champion"] = wb.first_stage.vs_incumbent.ci_low
    out["gate_p_better_vs_champion"] = wb.first_stage.vs_incumbent.p_better
    out["gate_min_detectable_change"] = wb.first_stage.vs_incumbent.mde
    out["pooled_pairs"], out["pooled_judge_requests"] = float(wb.pool.pairs_added), float(wb.pool.judge_requests)
    return out


def week_report(week: str, wb: WeekBenchmark, cand: Candidates, *, week_label_calls: int) -> WeekReport:
    decision = decision_line(week, wb, cand)
    models = ["base"] + (["champion"] if cand.champion_label != "base" else []) + ["challenger"] + \
        [m for m in wb.bench.per_query if "+" in m]
    new_rr = f"{wb.serving_retriever}+reranker"
    pairs = [("champion", "challenger"), ("base", "challenger")]
    if wb.first_stage_fused:  # the pair the first stage was gated on
        pairs.insert(0, (wb.first_stage.vs_incumbent.incumbent, wb.first_stage.vs_incumbent.candidate))
    if wb.hybrid:
        pairs.append((wb.serving_first_stage, wb.hybrid.candidate_label))
    pairs.append((wb.serving_retriever, new_rr))
    if wb.serving_reranker and wb.serving_reranker != new_rr:
        pairs.append((wb.serving_retriever, wb.serving_reranker))
    pairs.append(("champion", wb.serving_name))
    report = build_report(wb.bench, models, title=f"flywheel benchmark, week {week}", decision=decision,
                          details=_evidence(wb, week_label_calls), pairs=[p for p in pairs if p[0] != p[1]])
    record = {
        "week": week, "champion_label": cand.champion_label, "champion_path": cand.champion_path,
        "challenger_version": cand.challenger["version"], "reranker_version": cand.reranker["version"],
        "promote": wb.first_stage.promote, "first_stage": wb.first_stage.as_dict(),
        "reranker": wb.reranker.as_dict() if wb.reranker else None,
        "reranker_decisions": [d.as_dict() for d in wb.reranker_decisions],
        "hybrid": wb.hybrid.as_dict() if wb.hybrid else None, "hybrid_spec": wb.hybrid_spec,
        "hybrid_evidence": wb.hybrid_evidence,
        "serving_hybrid": wb.serving_hybrid, "serving_retriever": wb.serving_retriever,
        "serving_first_stage": wb.serving_first_stage, "serving_reranker": wb.serving_reranker,
        "serving_reranker_is_new": bool(wb.serving_reranker and wb.serving_reranker.endswith("+reranker")),
        "pool": {"pairs_added": wb.pool.pairs_added, "judge_requests": wb.pool.judge_requests,
                 "by_model": wb.pool.by_model, "week_label_calls": week_label_calls},
        "eval_queries": wb.first_stage.queries, "min_detectable_change": wb.first_stage.vs_incumbent.mde,
        "test": wb.test,
    }
    return WeekReport(report, decision, record, _metrics(wb))
