"""Label fusion: combine the judge's grade with what users and the app told us explicitly.

The judge is one noisy rater; the logs carry a second, independent one: saves, citations in
answers that got a thumbs up or down, and clicks. Neither is trusted blindly. The rule below is
pure (no I/O), applied per unique (query, chunk) pair of a week after aggregating every
impression of that pair, and every label records where it came from.

Evidence per pair, strongest first (the first that applies names the pair's evidence):

=====================  ==========================================================  ==========
evidence               when                                                        says
=====================  ==========================================================  ==========
``saved``              a user saved the chunk                                      relevant (strong)
``cited+thumbs_up``    cited in an answer that got a thumbs up (and never down)    relevant (strong)
``cited+thumbs_down``  cited in an answer that got a thumbs down (and never up)    irrelevant
``click``              position-debiased click rate >= ``click_threshold``         relevant (weak)
``cited``              cited by the answer, no verdict from the user               relevant (weak)
``skipped``            never clicked, but ranked above a chunk that was clicked    irrelevant (weak)
=====================  ==========================================================  ==========

Clicks are corrected for position bias by inverse propensity: a user examines rank ``r`` with
probability ``r ** -eta`` (``eta`` = 1 by default, the usual starting point; estimate it from
your own logs), so the debiased click rate of a pair is ``clicks / sum(r_i ** -eta)`` over its
impressions. A click at rank 8 counts for much more than a click at rank 1. ``skipped`` is the
classic "skip above a click" signal: a result above a clicked one was examined and passed over.

Fusion of judge grade ``g`` (None when the judge gave no label) with the evidence:

* strong relevant: ``max(g, 2)``; a pair the judge could not label becomes 2. Users beat the judge.
* ``cited+thumbs_down`` with ``g >= 2``: 1 ("related": neither positive nor negative, so the
  conflict keeps the pair out of training rather than betting on either rater).
* weak relevant with ``g == 1``: 2 (the judge hesitated and users did not).
* anything else: ``g`` unchanged (weak evidence never overrules the judge, never labels alone).

``label_source`` is ``judge:<name>`` with no evidence, ``fused:judge+<evidence>`` when the judge
graded a pair that has evidence (changed or confirmed), and ``feedback:<evidence>`` when the
grade comes from the evidence alone. ``feedback_relevant`` (what the evidence says) is also
the reference the judge is calibrated against when a week has no human labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

RELEVANT_GRADE = 2

STRONG_POSITIVE = ("saved", "cited+thumbs_up")
NEGATIVE = ("cited+thumbs_down",)
WEAK_POSITIVE = ("click", "cited")
WEAK_NEGATIVE = ("skipped",)
EVIDENCE_SAYS_RELEVANT = {
    "saved": True, "cited+thumbs_up": True, "cited+thumbs_down": False,
    "click": True, "cited": True, "skipped": False,
}


@dataclass(frozen=True)
class FusionConfig:
    eta: float = 1.0  # position-bias exponent: P(examine rank r) = r ** -eta
    click_threshold: float = 0.5  # debiased click rate at which clicks count as relevance


def examination_propensity(rank: int | np.ndarray, eta: float = 1.0):
    return np.power(np.maximum(np.asarray(rank, dtype=float), 1.0), -eta)


def pair_evidence(pairs: pd.DataFrame, cfg: FusionConfig = FusionConfig()) -> pd.DataFrame:
    """Aggregate impressions into one evidence row per (query_key, chunk_id).

    ``pairs`` has one row per impression with columns query_key, chunk_id, rank, clicked, cited,
    saved, thumbs ("up"/"down"/None) and request_id. Returns query_key, chunk_id, feedback
    (evidence name or None), feedback_relevant (boolean or NA), debiased_ctr.
    """
    cols = ["query_key", "chunk_id", "feedback", "feedback_relevant", "debiased_ctr"]
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    df = pairs[["request_id", "query_key", "chunk_id", "rank", "clicked", "cited", "saved", "thumbs"]].copy()
    df["clicked"] = df["clicked"].fillna(False).astype(bool)
    df["cited"] = df["cited"].fillna(False).astype(bool)
    df["saved"] = df["saved"].fillna(False).astype(bool)
    thumbs = df["thumbs"].astype(object).where(df["thumbs"].notna(), None)
    df["cited_up"] = df["cited"] & (thumbs == "up")
    df["cited_down"] = df["cited"] & (thumbs == "down")
    df["exam"] = examination_propensity(df["rank"].to_numpy(), cfg.eta)
    # skip-above: not clicked while a lower-ranked result of the same request was clicked
    lowest_click = df[df["clicked"]].groupby("request_id")["rank"].max()
    df["skipped"] = ~df["clicked"] & (df["rank"] < df["request_id"].map(lowest_click).fillna(-np.inf))

    agg = df.groupby(["query_key", "chunk_id"], sort=False).agg(
        clicks=("clicked", "sum"), exam=("exam", "sum"), cited=("cited", "any"), saved=("saved", "any"),
        cited_up=("cited_up", "any"), cited_down=("cited_down", "any"), skipped=("skipped", "any"),
    ).reset_index()
    agg["debiased_ctr"] = agg["clicks"] / agg["exam"].where(agg["exam"] > 0, np.nan)

    def evidence(r) -> str | None:
        if r.saved:
            return "saved"
        if r.cited_up and not r.cited_down:
            return "cited+thumbs_up"
        if r.cited_down and not r.cited_up:
            return "cited+thumbs_down"
        if r.clicks > 0 and r.debiased_ctr >= cfg.click_threshold:
            return "click"
        if r.cited:
            return "cited"
        if r.clicks == 0 and r.skipped:
            return "skipped"
        return None

    agg["feedback"] = pd.Series([evidence(r) for r in agg.itertuples(index=False)], index=agg.index, dtype=object)
    agg["feedback_relevant"] = pd.array(
        [EVIDENCE_SAYS_RELEVANT.get(e) if e else None for e in agg["feedback"]], dtype="boolean"
    )
    return agg[cols]


def fuse_grade(judge_grade: int | None, evidence: str | None) -> tuple[int | None, str]:
    """The fused grade and how it was reached: "judge", "fused" or "feedback" (see module doc)."""
    g = None if judge_grade is None or pd.isna(judge_grade) else int(judge_grade)
    if evidence is None:
        return g, "judge"
    if g is None:
        if evidence in STRONG_POSITIVE:
            return RELEVANT_GRADE, "feedback"
        return None, "judge"
    if evidence in STRONG_POSITIVE:
        return max(g, RELEVANT_GRADE), "fused"
    if evidence in NEGATIVE:
        return (1 if g >= RELEVANT_GRADE else g), "fused"
    if evidence in WEAK_POSITIVE:
        return (RELEVANT_GRADE if g == 1 else g), "fused"
    return g, "fused"


def label_source(how: str, judge_name: str, evidence: str | None) -> str:
    if how == "fused":
        return f"fused:judge+{evidence}"
    if how == "feedback":
        return f"feedback:{evidence}"
    return f"judge:{judge_name}"
