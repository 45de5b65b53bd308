"""The flywheel over weeks: simulate each week served by the champion of its time, run the
weekly job, let the gate decide, and write the trend report.

Week by week (not all logs first) because real traffic is retrieved by whatever model serves:
a promotion changes what next week's logs contain. Resumable: weeks already finished (their
row is in ``backfill.json``) are not simulated or trained again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pandas as pd

from flywheel.lib import store
from flywheel.lib.simulate.traffic import SimulationConfig, simulate, week_starts
from flywheel.lib.evaluation.trend import WeekRow, write_trend
from flywheel.settings import Settings

# A lighter configuration so that 8 weeks fit in well under 90 minutes on 2 cores; the trend
# report states it. Every value is an ordinary setting (environment variable).
LIGHT = {
    "FLYWHEEL_ENCODE_MAX_SEQ_LENGTH": "128",
    "FLYWHEEL_FINETUNE_EXAMPLES": "1000",
    "FLYWHEEL_TRAIN_TIME_BUDGET_S": "150",
    "FLYWHEEL_RERANKER_MAX_STEPS": "10",
    "FLYWHEEL_RERANK_DEPTH": "10",
    "FLYWHEEL_MIN_FINETUNE_EXAMPLES": "100",
}


def light_note(env: dict[str, str]) -> str:
    return "Configuration: " + (
        "light backfill settings " + ", ".join(f"{k}={v}" for k, v in env.items())
        if env else "the defaults (full training)"
    ) + "."


def _state_path(settings: Settings) -> Path:
    return settings.log_dir / "backfill.json"


def _test_ndcg(per_query: pd.DataFrame, model: str) -> float:
    rows = per_query[(per_query["model"] == model) & per_query["suite"].str.startswith("test")]
    return float(rows["ndcg@10"].mean()) if len(rows) else float("nan")


def week_row(settings: Settings, week: str, served_by: str, poisoned: bool, seconds: float, result) -> WeekRow:
    """Read back what the week's run decided: from its report files and the labels' metadata."""
    reports = settings.reports_dir
    decision_file = reports / f"benchmark-{week}-decision.json"
    per_query_file = reports / f"benchmark-{week}-per-query.parquet"
    labels = store.read_table(store.asset_path(settings.assets_dir, "relevance_labels", week))
    raw = store.read_table(store.asset_path(settings.assets_dir, "raw_logs", week))
    kappa = float("nan")
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.asset_check_key.name == "judge_agrees_with_reference":
            md = e.event_specific_data.metadata
            kappa = float(md["kappa"].value) if "kappa" in md else kappa
    if not decision_file.exists():
        # the run stopped before the report (a failed stage or check): nothing was promoted
        return WeekRow(week, len(raw), int(labels["grade"].notna().sum()), kappa, served_by, float("nan"),
                       float("nan"), False, served_by, "the run stopped before the benchmark report", poisoned, seconds)
    decision = json.loads(decision_file.read_text())
    per_query = store.read_table(per_query_file)
    challenger = _test_ndcg(per_query, "challenger")
    champion_before = _test_ndcg(per_query, "champion")
    promoted = bool(decision["promote"]) and result.success
    return WeekRow(
        week=week,
        searches=len(raw),
        labels=int(labels["grade"].notna().sum()),
        judge_kappa=kappa,
        served_by=served_by,
        challenger_ndcg10_test=challenger,
        champion_ndcg10_test=challenger if promoted else champion_before,
        promoted=promoted,
        champion=f"v{decision['challenger_version']}" if promoted else decision["champion_label"],
        gate=decision["reason"],
        poisoned=poisoned,
        seconds=seconds,
    )


def run_backfill(
    settings: Settings,
    sim: SimulationConfig,
    *,
    light: bool,
    run_week: Callable[[str, str], object],
    say: Callable[[str], None] = print,
) -> dict:
    from flywheel.lib.registry.promotion import serving_model
    from flywheel.lib.registry.tracking import Tracker

    weeks = [w.isoformat() for w in week_starts(sim.start, sim.weeks)]
    wanted = {k: str(v) for k, v in vars(sim).items() if k not in ("log_dir", "lancedb_uri")}
    wanted["light"] = str(light)
    state_file = _state_path(settings)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["config"] != wanted:
            raise SystemExit(f"{state_file}: a backfill with other settings is in this home; use a fresh FLYWHEEL_HOME")
    elif settings.log_dir.exists() and any(settings.log_dir.rglob("*.jsonl")):
        raise SystemExit(
            f"{settings.log_dir} already holds logs (the demo's?): a backfill simulates week by week; "
            "use a fresh FLYWHEEL_HOME, e.g. FLYWHEEL_HOME=.flywheel-backfill"
        )
    else:
        state = {"config": wanted, "rows": {}}

    from flywheel.defs.resources import resources_for

    mlflow_res = resources_for(settings)["mlflow"]
    tracker = Tracker(mlflow_res.tracking_uri, mlflow_res.artifact_root, mlflow_res.experiment)
    started = time.monotonic()
    rows: list[WeekRow] = []
    for i, week in enumerate(weeks):
        if week in state["rows"]:
            rows.append(WeekRow(**state["rows"][week]))
            say(f"week {week}: done in an earlier run ({'promoted' if rows[-1].promoted else 'blocked'})")
            continue
        t0 = time.monotonic()
        path, label = serving_model(tracker, mlflow_res.embedder_name, settings.base_model)
        say(f"week {week}: simulating traffic served by {label}")
        simulate(sim, only_weeks=[i], serving=(path, label), progress=say)
        result = run_week(week, "flywheel_weekly")
        row = week_row(settings, week, label, i in sim.poison_weeks, time.monotonic() - t0, result)
        rows.append(row)
        state["rows"][week] = asdict(row)
        store.atomic_write_bytes(state_file, json.dumps(state, indent=2).encode())
        say(f"week {week}: {'PROMOTED' if row.promoted else 'blocked'}; champion {row.champion} "
            f"NDCG@10 (test) {row.champion_ndcg10_test:.4f}; {row.seconds:.0f}s")

    base = float("nan")
    last_pq = settings.reports_dir / f"benchmark-{weeks[-1]}-per-query.parquet"
    if last_pq.exists():
        base = _test_ndcg(store.read_table(last_pq), "base")
    note = light_note({k: os.environ[k] for k in LIGHT if k in os.environ} if light else {})
    paths = write_trend(rows, settings.reports_dir, base_ndcg10_test=base, config_note=note)
    poisoned = [r for r in rows if r.poisoned]
    return {
        "weeks": len(rows),
        "ndcg10_by_week": {r.week: round(r.champion_ndcg10_test, 4) for r in rows},
        "challenger_ndcg10_by_week": {r.week: round(r.challenger_ndcg10_test, 4) for r in rows},
        "base_ndcg10": round(base, 4),
        "champion_changes": sum(r.promoted for r in rows),
        "poisoned_week_blocked": bool(poisoned) and all(not r.promoted for r in poisoned),
        "wall_seconds": round(time.monotonic() - started, 1),
        "trend_report": str(paths["md"]),
    }
