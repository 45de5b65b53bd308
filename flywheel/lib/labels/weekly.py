"""Relevance labels: every (query, retrieved chunk) pair of a week, graded by a judge and fused
with the explicit feedback the logs carry (``flywheel.lib.labels.fusion``).

Each unique (query, chunk) pair of a week is judged once; its grade is then fused with the
week's saves, citations, thumbs and position-debiased clicks for that pair. Every row keeps the
judge's own grade (``judge_grade``), the fused ``grade`` that downstream code trains on, and where
the label came from (``label_source``). The judge is calibrated every run against the best
reference the week has: human labels where they exist, otherwise the explicit feedback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from flywheel.lib.labels.fusion import FusionConfig, fuse_grade, label_source, pair_evidence
from flywheel.lib.labels.judges import (
    RELEVANT_GRADE,
    HumanLabels,
    Judge,
    JudgeRequest,
    cohens_kappa,
    normalize_query,
)

LABEL_COLUMNS = [
    "week", "request_id", "query", "query_key", "chunk_id", "chunk_text", "rank", "score",
    "clicked", "cited", "grade", "relevant", "reason", "label_source", "judge_error", "human_relevant",
    # added by label fusion
    "saved", "thumbs", "judge_grade", "feedback", "feedback_relevant",
    # the pair held instructions aimed at the grader (labels.injection): kept out of every dataset
    "injection_flag",
]

PAIR_COLUMNS = [
    "request_id", "query", "query_key", "chunk_id", "chunk_text", "rank", "score", "clicked", "cited",
    "saved", "thumbs",
]


def _ids(value) -> set:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return set()
    return set(value)


def _thumbs(value) -> str | None:
    return value if value in ("up", "down") else None


def explode_results(raw_logs: pd.DataFrame) -> pd.DataFrame:
    """One row per (request, retrieved chunk), with that impression's feedback."""
    rows = []
    has = set(raw_logs.columns)
    for rec in raw_logs.itertuples(index=False):
        clicks = _ids(rec.clicks) if "clicks" in has else set()
        cited = _ids(rec.cited) if "cited" in has else set()
        saves = _ids(rec.saves) if "saves" in has else set()
        thumbs = _thumbs(rec.thumbs) if "thumbs" in has else None
        for r in rec.results:
            rows.append({
                "request_id": rec.request_id,
                "query": rec.query,
                "query_key": normalize_query(rec.query),
                "chunk_id": r["chunk_id"],
                "chunk_text": r["text"],
                "rank": int(r["rank"]),
                "score": float("nan") if r["score"] is None else float(r["score"]),  # imports may have none
                "clicked": r["chunk_id"] in clicks,
                "cited": r["chunk_id"] in cited,
                "saved": r["chunk_id"] in saves,
                "thumbs": thumbs,
            })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


@dataclass
class LabelStats:
    pairs: int
    unique_pairs: int
    labelled: int
    unlabelled: int
    relevant: int
    grade_counts: dict
    kappa_vs_human: float
    human_compared: int
    kappa_vs_feedback: float = float("nan")
    feedback_compared: int = 0
    fused_changed: int = 0  # unique pairs whose grade the feedback changed
    label_sources: dict = field(default_factory=dict)  # unique pairs per label_source


def _judge_unique_pairs(
    pairs: pd.DataFrame, judge: Judge, fewshot: pd.DataFrame | None, progress: Callable[[str], None] | None,
) -> pd.DataFrame:
    """The week's unique (query, chunk) pairs, each with the judge's grade, reason, error and flag."""
    # A repeated query retrieves the same chunks again: judge each (query, chunk) once per week.
    unique = pairs.drop_duplicates(["query_key", "chunk_id"]).reset_index(drop=True)
    requests = [
        JudgeRequest(q, c, t, int(rk))
        for q, c, t, rk in zip(unique["query"], unique["chunk_id"], unique["chunk_text"], unique["rank"])
    ]
    judgements = judge.judge(requests, fewshot=fewshot, progress=progress) if requests else []
    unique["judge_grade"] = pd.array([j.grade for j in judgements], dtype="Int64")
    unique["reason"] = [j.reason for j in judgements]
    unique["judge_error"] = [j.error for j in judgements]
    unique["injection_flag"] = [bool(getattr(j, "injection_flag", False)) for j in judgements]
    return unique


def _fuse_feedback(
    unique: pd.DataFrame, pairs: pd.DataFrame, judge: Judge, fusion: FusionConfig | None,
) -> tuple[pd.DataFrame, int]:
    """Fuse each unique pair's judge grade with its feedback: (pairs with grade and label_source,
    how many grades the feedback changed)."""
    if fusion is not None:
        evidence = pair_evidence(pairs, fusion)
        unique = unique.merge(evidence, on=["query_key", "chunk_id"], how="left")
    else:
        unique["feedback"] = None
        unique["feedback_relevant"] = pd.array([None] * len(unique), dtype="boolean")
    unique["feedback"] = unique["feedback"].astype(object).where(unique["feedback"].notna(), None)
    fused = [fuse_grade(g, e) for g, e in zip(unique["judge_grade"], unique["feedback"])]
    unique["grade"] = pd.array([g for g, _ in fused], dtype="Int64")
    unique["label_source"] = [label_source(how, judge.name, e) for (_, how), e in zip(fused, unique["feedback"])]
    changed = int(sum(
        (g is not None) and (pd.isna(jg) or int(jg) != g) for (g, _), jg in zip(fused, unique["judge_grade"])
    ))
    return unique, changed


def _impression_labels(
    pairs: pd.DataFrame, unique: pd.DataFrame, week: str, human: HumanLabels | None,
) -> pd.DataFrame:
    """Every impression with its pair's grades, relevance and human label, in ``LABEL_COLUMNS``."""
    graded = unique[[
        "query_key", "chunk_id", "grade", "judge_grade", "reason", "judge_error", "label_source", "injection_flag",
        "feedback", "feedback_relevant",
    ]]
    labels = pairs.merge(graded, on=["query_key", "chunk_id"], how="left")
    labels["week"] = week
    labels["relevant"] = (labels["grade"].fillna(-1) >= RELEVANT_GRADE).astype(bool)
    if human is not None:
        labels["human_relevant"] = pd.array(
            [human.relevant(q, c) for q, c in zip(labels["query"], labels["chunk_id"])], dtype="boolean"
        )
    else:
        labels["human_relevant"] = pd.array([None] * len(labels), dtype="boolean")
    labels["feedback_relevant"] = labels["feedback_relevant"].astype("boolean")
    return labels[LABEL_COLUMNS]


def _label_stats(labels: pd.DataFrame, unique: pd.DataFrame, changed: int) -> LabelStats:
    """Counts, grade distribution and the judge's agreement with humans and with feedback."""
    labelled = labels[labels["grade"].notna()]
    kappa, compared = agreement_with_human(labels)
    kappa_fb, compared_fb = judge_agreement(labels, "feedback_relevant")
    return LabelStats(
        pairs=len(labels),
        unique_pairs=len(unique),
        labelled=int(labels["grade"].notna().sum()),
        unlabelled=int(labels["grade"].isna().sum()),
        relevant=int(labels["relevant"].sum()),
        grade_counts={int(g): int(n) for g, n in labelled["grade"].value_counts().sort_index().items()},
        kappa_vs_human=kappa,
        human_compared=compared,
        kappa_vs_feedback=kappa_fb,
        feedback_compared=compared_fb,
        fused_changed=changed,
        label_sources={str(k): int(v) for k, v in unique["label_source"].value_counts().items()},
    )


def label_week(
    raw_logs: pd.DataFrame,
    week: str,
    judge: Judge,
    *,
    human: HumanLabels | None = None,
    fewshot: pd.DataFrame | None = None,
    progress: Callable[[str], None] | None = None,
    fusion: FusionConfig | None = FusionConfig(),
) -> tuple[pd.DataFrame, LabelStats]:
    """Judge, fuse and calibrate one week. ``fusion=None`` keeps the judge's grades as they are."""
    # 1. One row per impression; 2. judge each unique (query, chunk) pair once
    pairs = explode_results(raw_logs)
    unique = _judge_unique_pairs(pairs, judge, fewshot, progress)
    # 3. Fuse the judge's grades with the week's explicit feedback
    unique, changed = _fuse_feedback(unique, pairs, judge, fusion)
    # 4. Back onto every impression, 5. with the week's figures
    labels = _impression_labels(pairs, unique, week, human)
    return labels, _label_stats(labels, unique, changed)


def agreement_with_human(labels: pd.DataFrame) -> tuple[float, int]:
    """Cohen's kappa of the final relevant/irrelevant labels against human labels, on unique pairs."""
    known = labels[labels["grade"].notna() & labels["human_relevant"].notna()]
    known = known.drop_duplicates(["query_key", "chunk_id"])
    return cohens_kappa(list(known["relevant"]), list(known["human_relevant"].astype(bool))), len(known)


def judge_agreement(labels: pd.DataFrame, reference: str) -> tuple[float, int]:
    """Cohen's kappa of the judge's own grade (before fusion) against a reference column, on unique pairs.

    The judge's grade, not the fused one: fusion copies feedback into labels, so comparing fused
    labels with feedback would measure fusion, not the judge. NaN when the reference holds a single
    class (kappa is undefined there: any judge looks like chance).
    """
    if reference not in labels.columns:
        return float("nan"), 0
    judge_col = "judge_grade" if "judge_grade" in labels.columns else "grade"
    known = labels[labels[judge_col].notna() & labels[reference].notna()]
    known = known.drop_duplicates(["query_key", "chunk_id"])
    if known.empty:
        return float("nan"), 0
    ref = list(known[reference].astype(bool))
    if len(set(ref)) < 2:
        return float("nan"), len(known)
    judged = list(known[judge_col].astype(int) >= RELEVANT_GRADE)
    return cohens_kappa(judged, ref), len(known)


def agreement_with_reference(labels: pd.DataFrame) -> tuple[float, int, str]:
    """The judge's kappa against the week's best reference: human labels, else explicit feedback.

    Returns (kappa, pairs compared, reference name); ``("none", 0)`` when the week has neither.
    """
    kappa, n = judge_agreement(labels, "human_relevant")
    if n:
        return kappa, n, "human"
    kappa, n = judge_agreement(labels, "feedback_relevant")
    if n:
        return kappa, n, "feedback"
    return float("nan"), 0, "none"
