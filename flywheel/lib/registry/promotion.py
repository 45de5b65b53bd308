"""Champion / challenger: which model serves, the gate that decides, and the promotion itself.

Registry aliases (MLflow): every new version gets ``challenger``; ``champion`` is the version in
production and moves only when the gate passes; the champion it replaces keeps the alias
``previous-champion`` (roll back with ``set_alias(name, "champion", <that version>)``). Before the
first promotion there is no ``champion`` alias and the configured base model serves.

The gate (``gate_decision``): on every eval set to date, a paired bootstrap of the per-query
NDCG@10 difference challenger - champion; promote only when the 95% interval's low end is above
``-margin`` (a regression larger than the margin is excluded) and the same holds against the base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from flywheel.lib.evaluation import metrics as evaluation
from flywheel.lib.registry.tracking import Tracker

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
MODEL_DIR_TAG = "model_dir"


def serving_model(tracker: Tracker, embedder_name: str, base_model: str) -> tuple[str, str]:
    """(model folder, version label) of the embedder that serves now: the champion, else the base.

    The folder is the one the version was trained into (recorded as the version's ``model_dir``
    tag); if that folder is gone, the logged MLflow copy is downloaded and its sentence-transformers
    folder returned.
    """
    version = tracker.alias_version(embedder_name, CHAMPION)
    if version is None:
        return str(base_model), "base"
    mv = tracker.model_version(embedder_name, version)
    folder = (mv.tags or {}).get(MODEL_DIR_TAG)
    if folder and (Path(folder) / "modules.json").exists():
        return folder, f"v{version}"
    return tracker.download_embedder(embedder_name, version), f"v{version}"


@dataclass
class GateDecision:
    promote: bool
    reason: str
    champion_label: str
    challenger_ndcg: float
    champion_ndcg: float
    base_ndcg: float
    vs_champion: dict
    vs_base: dict
    margin: float
    queries: int

    def as_dict(self) -> dict:
        return asdict(self)


def gate_decision(
    per_query: pd.DataFrame,
    suite: str,
    *,
    margin: float,
    champion_label: str,
    challenger: str = "challenger",
    champion: str = "champion",
    base: str = "base",
    metric: str = "ndcg@10",
    seed: int = 0,
) -> GateDecision:
    """Decide from long-form per-query results (columns model, suite, query_id, <metric>)."""
    rows = per_query[per_query["suite"] == suite]

    def col(model: str) -> pd.Series:
        return rows[rows["model"] == model].set_index("query_id")[metric]

    ch = col(challenger)
    if ch.empty:
        return GateDecision(False, f"no per-query results for the challenger on '{suite}'", champion_label,
                            float("nan"), float("nan"), float("nan"), {}, {}, margin, 0)
    cp = col(champion).reindex(ch.index)
    bs = col(base).reindex(ch.index)
    vs_champion = evaluation.paired_bootstrap(cp.to_numpy(), ch.to_numpy(), seed=seed)
    vs_base = evaluation.paired_bootstrap(bs.to_numpy(), ch.to_numpy(), seed=seed)
    ok_champion = vs_champion["ci_low"] > -margin
    ok_base = vs_base["ci_low"] > -margin
    promote = bool(ok_champion and ok_base)
    n = len(ch)
    if promote:
        reason = (f"challenger NDCG@10 {ch.mean():.4f} vs champion ({champion_label}) {cp.mean():.4f} on {n} eval queries: "
                  f"change {vs_champion['delta']:+.4f}, 95% CI [{vs_champion['ci_low']:+.4f}, {vs_champion['ci_high']:+.4f}] "
                  f"excludes a regression larger than {margin}; vs base CI low {vs_base['ci_low']:+.4f}")
    elif not ok_champion:
        reason = (f"challenger NDCG@10 {ch.mean():.4f} vs champion ({champion_label}) {cp.mean():.4f} on {n} eval queries: "
                  f"95% CI of the change [{vs_champion['ci_low']:+.4f}, {vs_champion['ci_high']:+.4f}] does not exclude "
                  f"a regression larger than {margin}")
    else:
        reason = (f"challenger NDCG@10 {ch.mean():.4f} vs base {bs.mean():.4f} on {n} eval queries: 95% CI of the change "
                  f"[{vs_base['ci_low']:+.4f}, {vs_base['ci_high']:+.4f}] does not exclude a regression larger than {margin}")
    return GateDecision(promote, reason, champion_label, float(ch.mean()), float(cp.mean()), float(bs.mean()),
                        vs_champion, vs_base, margin, n)


def promote(tracker: Tracker, registered_name: str, version: str) -> dict:
    """Move ``champion`` to ``version``; the replaced champion becomes ``previous-champion``."""
    previous = tracker.alias_version(registered_name, CHAMPION)
    if previous is not None and previous != str(version):
        tracker.set_alias(registered_name, PREVIOUS, previous)
    tracker.set_alias(registered_name, CHAMPION, str(version))
    return {"registered_model": registered_name, "champion": str(version), "previous_champion": previous}
