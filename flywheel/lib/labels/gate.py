"""The labelling gate: may this week's labels train and evaluate a model?

Three rules, each of which fails the week with its reason (measured before this gate existed: a
week with half its pairs unlabelled, or with no labels at all, passed):

1. at most ``max_unlabelled_share`` of the week's unique (query, chunk) pairs are unlabelled;
2. the judge's Cohen's kappa against the week's reference (human labels, else explicit feedback)
   is at least ``min_kappa``;
3. when kappa cannot be computed (no reference, or a reference with a single class) the gate says
   so and fails, unless ``allow_no_kappa`` is set.

It also reports the labels by reason (labelled, and each cause of an unlabelled pair:
content_filter, context_length, endpoint_error, budget_exhausted, injection_skipped, ...) and the
pairs flagged for prompt injection, which the dataset builders keep out of every set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from flywheel.lib.labels.weekly import agreement_with_reference


@dataclass(frozen=True)
class LabelGateResult:
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)


def unique_pairs(labels: pd.DataFrame) -> pd.DataFrame:
    return labels.drop_duplicates(["query_key", "chunk_id"])


def labels_by_reason(labels: pd.DataFrame) -> dict[str, int]:
    """Unique pairs: "labelled", and each unlabelled pair under its reason code."""
    pairs = unique_pairs(labels)
    out = {"labelled": int(pairs["grade"].notna().sum())}
    errors = pairs.loc[pairs["grade"].isna(), "judge_error"] if "judge_error" in pairs else pd.Series(dtype=object)
    for err in errors:
        code = str(err).split(":")[0].strip()[:60] if isinstance(err, str) and err else "unknown"
        out[code] = out.get(code, 0) + 1
    return out


def check_labels(labels: pd.DataFrame, *, min_kappa: float, max_unlabelled_share: float,
                 allow_no_kappa: bool = False) -> LabelGateResult:
    """Apply the three rules; the description names every rule that failed."""
    pairs = unique_pairs(labels)
    total = len(pairs)
    by_reason = labels_by_reason(labels) if total else {"labelled": 0}
    unlabelled = total - by_reason["labelled"]
    share = unlabelled / total if total else 1.0
    flagged = int(pairs["injection_flag"].fillna(False).astype(bool).sum()) if "injection_flag" in pairs else 0
    kappa, compared, reference = agreement_with_reference(labels) if total else (float("nan"), 0, "none")
    failures, notes = [], []
    if total == 0:
        failures.append("the week has no (query, chunk) pairs")
    elif share > max_unlabelled_share:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]) if k != "labelled")
        failures.append(f"{unlabelled} of {total} pairs ({share:.1%}) are unlabelled, more than "
                        f"{max_unlabelled_share:.1%} allowed ({reasons})")
    if compared == 0 or math.isnan(kappa):
        why = ("no human labels or explicit feedback to compare with" if compared == 0
               else f"the {reference} reference holds a single class over {compared} pairs")
        (notes if allow_no_kappa else failures).append(
            f"kappa cannot be computed: {why}" + (" (allowed by allow_no_kappa)" if allow_no_kappa else
                                                   " (set FLYWHEEL_JUDGE_ALLOW_NO_KAPPA=true to accept such a week)"))
    elif kappa < min_kappa:
        failures.append(f"Cohen's kappa vs {reference} labels {kappa:.3f} is below {min_kappa} ({compared} pairs)")
    else:
        notes.append(f"Cohen's kappa vs {reference} labels {kappa:.3f} (threshold {min_kappa}, {compared} pairs)")
    notes.append(f"{unlabelled} of {total} pairs unlabelled ({share:.1%}), {flagged} flagged for prompt injection")
    metadata = {
        "kappa": float(kappa), "min_kappa": min_kappa, "pairs": compared, "reference": reference,
        "unique_pairs": total, "unlabelled": unlabelled, "unlabelled_share": float(share),
        "max_unlabelled_share": max_unlabelled_share, "injection_flagged": flagged, "labels_by_reason": by_reason,
    }
    return LabelGateResult(not failures, "; ".join(failures + notes), metadata)
