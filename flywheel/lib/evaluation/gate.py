"""The promotion gate: one decision rule, applied to each component that could serve.

The rule (``decide``), in plain words: a candidate replaces what serves now when, on every
(pooled) eval set to date, its mean per-query NDCG@10 change over the incumbent is positive
(above ``min_improvement``, default 0), at least ``min_confidence`` (default 0.7) of the paired
bootstrap's resamples put that change above zero, *and* the bootstrap's 95% confidence interval
of the change excludes a regression larger than ``margin``; a first stage must also not be worse
than the base by more than the margin.

Why this rule and not the two textbook ones:
- non-inferiority alone (CI low > -margin) promotes ties, so the champion random-walks with the
  judge's noise and a slightly worse model can slip through on a lucky draw;
- superiority (CI low > 0) refuses a truly better model until the eval sets are large, which on
  a flywheel with 20 new eval queries a week means most good weeks are lost.
Requiring the resamples to favour the candidate (70%, about half a standard error above zero)
keeps most ties and regressions out; the non-inferiority bound keeps a real regression out even
when the point estimate is lucky. A component that adds cost to
every query where nothing served before (the first reranker) must show a significant gain: its
CI must lie above zero (``GateSettings.reranker_needs_significant_gain``). The minimum detectable change
(80% power, two-sided 5%) is reported beside every decision so a reader knows what the eval sets
can see at their current size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

Z_ALPHA, Z_POWER = 1.96, 0.84  # two-sided 5%, 80% power


@dataclass(frozen=True)
class Comparison:
    candidate: str
    incumbent: str
    delta: float
    ci_low: float
    ci_high: float
    se: float
    n: int
    p_better: float = float("nan")  # share of bootstrap resamples whose mean change is above zero

    @property
    def mde(self) -> float:
        """Minimum detectable change at this sample: (z_alpha/2 + z_power) x standard error."""
        return (Z_ALPHA + Z_POWER) * self.se

    def as_dict(self) -> dict:
        return {**asdict(self), "mde": self.mde}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float, float, float]:
    """Mean of (b - a), its 95% percentile interval, the bootstrap standard error, and the share of
    resamples whose mean is above zero (the bootstrap's confidence that b is better)."""
    diff = np.asarray(b, float) - np.asarray(a, float)
    if len(diff) == 0:
        return (float("nan"),) * 5
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_resamples, len(diff)))].mean(axis=1)
    return (float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)), float(means.std()),
            float((means > 0).mean()))


def compare(per_query: pd.DataFrame, suite: str, incumbent: str, candidate: str, *, metric: str = "ndcg@10",
            n_resamples: int = 2000, seed: int = 0) -> Comparison:
    """Paired comparison of two models on the queries of a suite (long-form per-query results)."""
    rows = per_query[per_query["suite"] == suite]
    a = rows[rows["model"] == incumbent].set_index("query_id")[metric]
    b = rows[rows["model"] == candidate].set_index("query_id")[metric]
    common = a.index.intersection(b.index)
    delta, lo, hi, se, p_better = paired_bootstrap(a.reindex(common).to_numpy(), b.reindex(common).to_numpy(),
                                                   n_resamples=n_resamples, seed=seed)
    return Comparison(candidate, incumbent, delta, lo, hi, se, len(common), p_better)


@dataclass(frozen=True)
class GateDecision:
    component: str  # "first stage" or "reranker"
    promote: bool
    reason: str
    candidate_label: str
    incumbent_label: str
    vs_incumbent: Comparison
    vs_base: Comparison | None
    margin: float
    min_confidence: float = 0.0

    @property
    def queries(self) -> int:
        return self.vs_incumbent.n

    def as_dict(self) -> dict:
        return {"component": self.component, "promote": self.promote, "reason": self.reason,
                "candidate": self.candidate_label, "incumbent": self.incumbent_label,
                "vs_incumbent": self.vs_incumbent.as_dict(),
                "vs_base": self.vs_base.as_dict() if self.vs_base else None, "margin": self.margin,
                "min_confidence": self.min_confidence}


def _ci(c: Comparison) -> str:
    return f"{c.delta:+.4f}, 95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}]"


def decide(vs_incumbent: Comparison, vs_base: Comparison | None, *, margin: float, component: str,
           candidate_label: str, incumbent_label: str, min_improvement: float = 0.0,
           significant: bool = False, evidence: str = "eval queries", min_confidence: float = 0.0) -> GateDecision:
    """Apply the rule (module docstring) and say why in one sentence. ``significant``: the change
    must also be significantly positive (CI above zero), for a component that adds cost.
    ``evidence`` names the queries compared, for the sentence. ``min_confidence``: the share of
    bootstrap resamples whose mean change is above zero must reach it."""
    c = vs_incumbent
    where = f"on {c.n} {evidence} (minimum detectable change {c.mde:.4f})"
    if c.n == 0 or np.isnan(c.delta):
        promote, why = False, f"no paired eval results for {candidate_label} and {incumbent_label}"
    elif c.delta <= min_improvement:
        promote, why = False, (f"{candidate_label} is not better than {incumbent_label}: NDCG@10 change {_ci(c)} {where}"
                               + (f" (required above {min_improvement:+})" if min_improvement else ""))
    elif c.p_better < min_confidence:
        promote, why = False, (f"{candidate_label} vs {incumbent_label}: NDCG@10 change {_ci(c)} {where}: "
                               f"{c.p_better:.0%} of bootstrap resamples favour it, fewer than the "
                               f"{min_confidence:.0%} required")
    elif significant and c.ci_low <= 0:
        promote, why = False, (f"{candidate_label} vs {incumbent_label}: NDCG@10 change {_ci(c)} {where} is not "
                               f"significantly above zero; a {component} adds cost to every query, so it must show a gain")
    elif c.ci_low <= -margin:
        promote, why = False, (f"{candidate_label} vs {incumbent_label}: NDCG@10 change {_ci(c)} {where} does not "
                               f"exclude a regression larger than {margin}")
    elif vs_base is not None and vs_base.ci_low <= -margin:
        promote, why = False, (f"{candidate_label} vs base: NDCG@10 change {_ci(vs_base)} does not exclude a "
                               f"regression larger than {margin}")
    else:
        promote, why = True, (f"{candidate_label} beats {incumbent_label}: NDCG@10 change {_ci(c)} {where}, "
                              f"positive ({c.p_better:.0%} of bootstrap resamples in favour) and excluding a "
                              f"regression larger than {margin}")
    return GateDecision(component, promote, why, candidate_label, incumbent_label, vs_incumbent, vs_base, margin,
                        min_confidence)


def gate_decision(per_query: pd.DataFrame, suite: str, *, margin: float, champion_label: str,
                  challenger: str = "challenger", champion: str = "champion", base: str = "base",
                  min_improvement: float = 0.0, min_confidence: float = 0.0, n_resamples: int = 2000,
                  seed: int = 0, evidence: str = "eval queries") -> GateDecision:
    """The first stage's decision: the challenger against the serving champion (and the base).
    ``evidence`` names the queries and lists compared, for the decision's sentence."""
    vs_champion = compare(per_query, suite, champion, challenger, n_resamples=n_resamples, seed=seed)
    vs_base = compare(per_query, suite, base, challenger, n_resamples=n_resamples, seed=seed)
    return decide(vs_champion, vs_base, margin=margin, component="first stage", min_improvement=min_improvement,
                  min_confidence=min_confidence, candidate_label=challenger, incumbent_label=f"{champion} ({champion_label})",
                  evidence=evidence)
