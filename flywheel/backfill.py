"""The flywheel over weeks: simulate each week served by the champion of its time, run the
weekly job, let the gate decide, and write the trend report with the gate's accuracy.

Week by week (not all logs first) because real traffic is retrieved by whatever model serves:
a promotion changes what next week's logs contain. The simulated app serves the champion
embedder's list, fused with BM25 when keyword fusion serves (``serving.json``); a serving
reranker's reordering is not simulated (the logged top k is the first stage's). Resumable:
weeks already finished (their row is in ``backfill.json``) are not simulated or trained again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from typing import Callable

import pandas as pd

from flywheel.config import FlywheelConfig
from flywheel.layout import RAW_LOGS, RELEVANCE_LABELS, Layout
from flywheel.lib import store
from flywheel.lib.evaluation.trend import WeekRow, write_trend
from flywheel.lib.evaluation.weekly import gate_error
from flywheel.lib.simulate.traffic import SimulationConfig, simulate, week_starts

# Lighter settings (``flywheel backfill --light``) for a quicker look; the trend report states
# them. The backfill runs the defaults otherwise. With these the reranker trains for a few steps
# and reranks the top 5 only: it still goes through its own gate each week, but it never learns
# enough to serve, so the reranker's decisions and gate accuracy are only measured without them.
LIGHT: dict[str, dict] = {"reranker": {"max_steps": 5, "depth": 5}}


def light_note(overrides: dict[str, dict]) -> str:
    flat = [f"{section}.{k}={v}" for section, fields in overrides.items() for k, v in fields.items()]
    return "Configuration: " + ("light backfill settings " + ", ".join(flat) if flat else "the defaults") + "."


def _test_ndcg(per_query: pd.DataFrame, model: str) -> float:
    rows = per_query[(per_query["model"] == model) & per_query["suite"].str.startswith("test")]
    return float(rows["ndcg@10"].mean()) if len(rows) else float("nan")


def _kappa(result) -> float:
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.asset_check_key.name == "judge_agrees_with_reference":
            md = e.event_specific_data.metadata
            if "kappa" in md:
                return float(md["kappa"].value)
    return float("nan")


def interrupted(result) -> bool:
    """Was the run stopped from outside (Ctrl-C, SIGTERM)? Dagster then ends it as a failed run and
    the process carries on, so without this check a stopped week would be recorded as a blocked one
    (and a later --resume would skip it)."""
    return any(getattr(getattr(e.event_specific_data, "error", None), "cls_name", None) == "DagsterExecutionInterruptedError"
               for e in result.all_events)


def _stop_if_interrupted(result, week: str) -> None:
    if interrupted(result):
        raise KeyboardInterrupt(f"week {week} was stopped while it ran; nothing is recorded for it "
                                "(the same backfill run again in this home finishes it)")


def week_row(layout: Layout, week: str, served_by: str, poisoned: bool, seconds: float, result) -> WeekRow:
    """Read back what the week's run decided (its decision record and per-query results)."""
    labels = store.read_table(layout.asset(RELEVANCE_LABELS, week))
    raw = store.read_table(layout.asset(RAW_LOGS, week))
    n_labels, kappa = int(labels["grade"].notna().sum()), _kappa(result)
    if not layout.decision(week).exists():  # the run stopped before the report: nothing was promoted
        nan = float("nan")
        return WeekRow(week, len(raw), n_labels, kappa, served_by, nan, nan, False, served_by,
                       "the run stopped before the benchmark report", poisoned, seconds)
    d = json.loads(layout.decision(week).read_text())
    per_query = store.read_table(layout.per_query(week))
    promoted = bool(d["promote"]) and result.success
    first, test = d["first_stage"]["vs_incumbent"], (d.get("test") or {}).get("first_stage") or {}
    serving = "challenger" if promoted else "champion"
    reranker = d["serving_reranker"] if result.success else None
    nan = float("nan")
    return WeekRow(
        week=week, searches=len(raw), labels=n_labels, judge_kappa=kappa, served_by=served_by,
        challenger_ndcg10_test=_test_ndcg(per_query, "challenger"),
        champion_ndcg10_test=_test_ndcg(per_query, serving),
        promoted=promoted, champion=f"v{d['challenger_version']}" if promoted else d["champion_label"],
        gate=d["first_stage"]["reason"], poisoned=poisoned, seconds=seconds,
        eval_delta=first["delta"], eval_ci_low=first["ci_low"], eval_ci_high=first["ci_high"],
        test_delta=test.get("delta", nan), test_ci_low=test.get("ci_low", nan), test_ci_high=test.get("ci_high", nan),
        gate_error=gate_error(promoted, test), min_detectable_change=d["min_detectable_change"],
        pooled_judge_requests=d["pool"]["judge_requests"], label_calls=d["pool"]["week_label_calls"],
        reranker=(f"v{d['reranker_version']}" if d["serving_reranker_is_new"] else "kept") if reranker else "none",
        serving_ndcg10_test=_test_ndcg(per_query, reranker or (d.get("serving_retriever", serving) if result.success else serving)),
        component_gate_errors=component_gate_errors(d),
    )


def component_gate_errors(d: dict) -> list[str]:
    """Gate errors of the keyword-fusion and (new) reranker decisions, each against the test
    split's comparison with its first stage alone."""
    t, out = d.get("test") or {}, []
    decided = [("keyword fusion", d.get("hybrid"), t.get("hybrid_vs_first_stage")),
               ("reranker", (d.get("reranker_decisions") or [None])[0], t.get("reranker_vs_first_stage"))]
    for name, decision, test in decided:
        error = gate_error(decision["promote"], test) if decision and test else None
        if error:
            out.append(f"{name}: {error.replace('a model', 'a component')}")
    return out


def _resume_state(layout: Layout, wanted: dict) -> dict:
    if layout.backfill_state.exists():
        state = json.loads(layout.backfill_state.read_text())
        if state["config"] != wanted:
            raise SystemExit(f"{layout.backfill_state}: a backfill with other settings is in this home; use a fresh FLYWHEEL_HOME")
        return state
    if layout.log_dir.exists() and any(layout.log_dir.rglob("*.jsonl")):
        raise SystemExit(f"{layout.log_dir} already holds logs (the demo's?): a backfill simulates week by week; "
                         "use a fresh FLYWHEEL_HOME, e.g. FLYWHEEL_HOME=.flywheel-backfill")
    return {"config": wanted, "rows": {}}


def forced_past_labelling_gate(layout: Layout, week: str, row: WeekRow, run_again: Callable[[str, str], object],
                               say: Callable[[str], None]) -> tuple[WeekRow, object]:
    """A poisoned week the labelling gate stopped, run again with that gate off: does the model
    gate stop its challenger too? (Defence in depth: a team may loosen the judge-agreement check.)
    The second run's decisions are real: what it promotes serves the following weeks."""
    say(f"week {week}: the labelling gate stopped the poisoned week (judge kappa {row.judge_kappa:.3f}); "
        "running it again with that gate off, to see whether the model gate stops it too")
    t0 = time.monotonic()
    result = run_again(week, "flywheel_weekly")
    again = week_row(layout, week, row.served_by, True, row.seconds + time.monotonic() - t0, result)
    again.judge_kappa = row.judge_kappa
    again.gate = f"labelling gate: stopped (judge kappa {row.judge_kappa:.3f}); with it off, the model gate: {again.gate}"
    return again, result


def run_backfill(config: FlywheelConfig, sim: SimulationConfig, *, overrides: dict[str, dict],
                 run_week: Callable[[str, str], object], say: Callable[[str], None] = print,
                 run_without_labelling_gate: Callable[[str, str], object] | None = None) -> dict:
    """``run_without_labelling_gate`` (optional) runs a week with the judge-agreement check off:
    a poisoned week that check stopped is run again with it, so the model gate's verdict on the
    poisoned challenger is measured too (see ``forced_past_labelling_gate``)."""
    from flywheel.lib.registry.promotion import read_serving, serving_model
    from flywheel.lib.registry.tracking import Tracker

    layout = Layout.of(config.paths)
    weeks = [w.isoformat() for w in week_starts(sim.start, sim.weeks)]
    wanted = {**{k: str(v) for k, v in vars(sim).items() if k not in ("log_dir", "lancedb_uri")}, "overrides": str(overrides)}
    state = _resume_state(layout, wanted)
    tracker = Tracker(config.paths.mlflow_uri, str(layout.mlflow_artifacts), config.gate.experiment)
    started, rows, resumed = time.monotonic(), [], 0
    for i, week in enumerate(weeks):
        if week in state["rows"]:
            rows.append(WeekRow(**state["rows"][week]))
            resumed += 1
            say(f"week {week}: done in an earlier run ({'promoted' if rows[-1].promoted else 'blocked'})")
            continue
        t0 = time.monotonic()
        path, label = serving_model(tracker, config.gate.embedder_name, config.paths.base_model)
        fusion = read_serving(layout.serving_record).get("hybrid")  # the app serves the fused list
        label = f"{label}+bm25" if fusion else label
        say(f"week {week}: simulating traffic served by {label}")
        simulate(sim, only_weeks=[i], serving=(path, label), hybrid=fusion, progress=say)
        result = run_week(week, "flywheel_weekly")
        _stop_if_interrupted(result, week)
        row = week_row(layout, week, label, i in sim.poison_weeks, time.monotonic() - t0, result)
        if row.poisoned and run_without_labelling_gate is not None and not layout.decision(week).exists():
            row, result = forced_past_labelling_gate(layout, week, row, run_without_labelling_gate, say)
            _stop_if_interrupted(result, week)
        if rows and not result.success:
            # a blocking check stopped the week (before or after the report): what served before still serves
            row.serving_ndcg10_test, row.reranker = rows[-1].serving_ndcg10_test, rows[-1].reranker
            if math.isnan(row.champion_ndcg10_test):
                row.champion, row.champion_ndcg10_test = rows[-1].champion, rows[-1].champion_ndcg10_test
        rows.append(row)
        state["rows"][week] = asdict(row)
        store.atomic_write_bytes(layout.backfill_state, json.dumps(state, indent=2).encode())
        say(f"week {week}: {'PROMOTED' if row.promoted else 'blocked'}; champion {row.champion} NDCG@10 (test) "
            f"{row.champion_ndcg10_test:.4f}; reranker {row.reranker}; gate error: {row.gate_error or 'none'}; {row.seconds:.0f}s")
    return backfill_figures(layout, weeks, rows, overrides, time.monotonic() - started, resumed=resumed)


def backfill_figures(layout: Layout, weeks: list[str], rows: list[WeekRow], overrides: dict, seconds: float,
                     *, resumed: int = 0) -> dict:
    """The backfill's JSON; ``resumed``: weeks an earlier run finished (their figures are that run's)."""
    reported = [layout.per_query(w) for w in weeks if layout.per_query(w).exists()]
    base = _test_ndcg(store.read_table(reported[-1]), "base") if reported else float("nan")
    paths = write_trend(rows, layout.reports_dir, base_ndcg10_test=base, config_note=light_note(overrides))
    poisoned = [r for r in rows if r.poisoned]
    r4 = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)  # noqa: E731
    return {
        "weeks": len(rows),
        "ndcg10_base": r4(base),
        "ndcg10_by_week": {r.week: r4(r.champion_ndcg10_test) for r in rows},
        "serving_ndcg10_by_week": {r.week: r4(r.serving_ndcg10_test) for r in rows},
        "challenger_ndcg10_by_week": {r.week: r4(r.challenger_ndcg10_test) for r in rows},
        "champion_changes": sum(r.promoted for r in rows),
        "gate_errors": sum(bool(r.gate_error) for r in rows),
        "gate_error_weeks": {r.week: r.gate_error for r in rows if r.gate_error},
        "component_gate_errors": {r.week: r.component_gate_errors for r in rows if r.component_gate_errors},
        "poisoned_week_blocked": bool(poisoned) and all(not r.promoted for r in poisoned),
        "poisoned_ci_high": r4(poisoned[-1].eval_ci_high) if poisoned else None,
        "pooled_judge_calls": {r.week: r.pooled_judge_requests for r in rows},
        "labelling_calls": {r.week: r.label_calls for r in rows},
        "min_detectable_change": {r.week: r4(r.min_detectable_change) for r in rows},
        "wall_seconds": round(seconds, 1),
        "weeks_resumed": resumed,
        "trend_report": str(paths["md"]),
    }
