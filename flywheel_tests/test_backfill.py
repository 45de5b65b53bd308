"""The flywheel over weeks: each week served by the champion of its time, a poisoned week blocked
by the gate while the champion stays, the trend report, and resuming a finished backfill."""

from __future__ import annotations

import json

import dagster as dg
import mlflow
import pytest

from flywheel.backfill import run_backfill
from flywheel.defs import build_definitions
from flywheel.defs.resources import resources_for
from flywheel.layout import Layout
from flywheel.lib.simulate.traffic import SimulationConfig

from conftest import small_config


@pytest.fixture(scope="module")
def backfill(tmp_path_factory, small_beir, base_model_path):
    home = tmp_path_factory.mktemp("backfill-home")
    # enough steps at a high enough rate that a week's labels really shape its model
    config = small_config(home, small_beir, base_model_path, training={"max_steps": 20, "learning_rate": 3e-4})
    settings = Layout.of(config.paths)
    sim = SimulationConfig(
        dataset_dir=small_beir, log_dir=settings.log_dir, lancedb_uri=settings.lancedb_dir,
        model_path=base_model_path, start=config.tiers.start_date, weeks=2, seed=0, encode_max_seq_length=128,
        poison_weeks=(1,),  # the second week's texts are joined to the wrong ids
    )
    # the default gate (a gain is required; the default regression margin)
    defs = build_definitions(resources_for(config))
    instance = dg.DagsterInstance.ephemeral()
    champions: list[str | None] = []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}")

    def champion_now() -> str | None:
        try:
            return client.get_model_version_by_alias("flywheel-embedder", "champion").version
        except mlflow.exceptions.MlflowException:
            return None

    def run_week(week: str, job: str):
        result = defs.resolve_job_def(job).execute_in_process(partition_key=week, instance=instance, raise_on_error=False)
        champions.append(champion_now())
        return result

    # the poisoned week, once the labelling gate stopped it, runs again with that gate off
    loose = build_definitions(resources_for(config, judge={"min_kappa": -1.0}))

    def run_without_labelling_gate(week: str, job: str):
        result = loose.resolve_job_def(job).execute_in_process(partition_key=week, instance=instance, raise_on_error=False)
        champions.append(champion_now())
        return result

    figures = run_backfill(config, sim, overrides={}, run_week=run_week, say=print,
                           run_without_labelling_gate=run_without_labelling_gate)
    return settings, sim, figures, champions, champion_now, config


def test_poisoned_week_is_blocked_and_the_champion_stays(backfill):
    settings, _, figures, champions, champion_now, _ = backfill
    rows = json.loads((settings.reports_dir / "trend.json").read_text())["weeks"]
    assert [r["poisoned"] for r in rows] == [False, True]
    assert figures["poisoned_week_blocked"] is True
    assert rows[1]["promoted"] is False and rows[1]["gate"]
    # the champion after the poisoned week is the one before it, in the registry and the figures
    assert champions[0] == champions[-1] == champion_now()
    assert rows[1]["champion"] == rows[0]["champion"]
    ndcg = list(figures["ndcg10_by_week"].values())
    assert ndcg[1] == ndcg[0]
    # the poisoned week was stopped at the labelling gate: its labels disagree with the humans, as
    # a real judge's would (the simulated judge grades the wrong texts it is shown)
    assert rows[1]["judge_kappa"] < 0.4 <= rows[0]["judge_kappa"]


def test_a_poisoned_week_the_labelling_gate_stopped_is_judged_by_the_model_gate_too(backfill):
    """Defence in depth: run again with the judge-agreement check off, the poisoned week reaches
    the model gate, whose verdict on its challenger is what the figures report."""
    settings, _, figures, champions, _, _ = backfill
    rows = json.loads((settings.reports_dir / "trend.json").read_text())["weeks"]
    poisoned = rows[1]
    assert len(champions) == 3  # week 1, the poisoned week, the poisoned week again without the labelling gate
    assert poisoned["gate"].startswith("labelling gate: stopped (judge kappa ")
    assert "with it off, the model gate: " in poisoned["gate"]
    decision = json.loads(settings.decision(poisoned["week"]).read_text())  # the report was reached
    assert decision["first_stage"]["vs_incumbent"]["ci_high"] == pytest.approx(poisoned["eval_ci_high"])
    assert figures["poisoned_ci_high"] == round(poisoned["eval_ci_high"], 4)
    assert figures["poisoned_week_blocked"] is (not decision["promote"] or not poisoned["promoted"])
    assert poisoned["challenger_ndcg10_test"] == poisoned["challenger_ndcg10_test"]  # a challenger was trained


def test_each_week_is_served_by_the_champion_of_its_time(backfill):
    settings, _, figures, champions, _, _ = backfill
    rows = json.loads((settings.reports_dir / "trend.json").read_text())["weeks"]
    assert rows[0]["served_by"] == "base"
    # week 1's decision decides who serves week 2 (fused with BM25 when keyword fusion passed)
    assert rows[1]["served_by"].removesuffix("+bm25") == rows[0]["champion"]
    assert figures["champion_changes"] == sum(r["promoted"] for r in rows)
    # labels per week and judge agreement per week are in the trend
    assert all(r["labels"] > 0 and 0 < r["judge_kappa"] <= 1 for r in rows)
    # the gate's accuracy against the test split is recorded for every week that reached the report
    reported = [r for r in rows if r["test_delta"] == r["test_delta"]]
    assert reported and all(r["test_ci_low"] <= r["test_delta"] <= r["test_ci_high"] for r in reported)
    assert figures["gate_errors"] == sum(bool(r["gate_error"]) for r in rows)
    assert set(figures["pooled_judge_calls"]) == set(figures["ndcg10_by_week"])


def test_trend_report_shows_every_week_and_the_poisoned_one(backfill):
    settings, *_ = backfill
    md = (settings.reports_dir / "trend.md").read_text()
    assert "(poisoned) |" in md and "| blocked |" in md and "## Gate accuracy against the test split" in md
    assert md.count("](data:image/png;base64,") == 1
    page = (settings.reports_dir / "trend.html").read_text()
    assert "<img alt=" in page and "poisoned" in page


def test_a_finished_backfill_resumes_without_rerunning(backfill):
    settings, sim, figures, _, _, config = backfill

    def must_not_run(week, job):
        raise AssertionError(f"week {week} was run again")

    again = run_backfill(config, sim, overrides={}, run_week=must_not_run, say=print)
    assert again["ndcg10_by_week"] == figures["ndcg10_by_week"]
    # the JSON says that every week's figures came from the earlier run
    assert (figures["weeks_resumed"], again["weeks_resumed"]) == (0, figures["weeks"])


def test_a_week_stopped_while_it_runs_is_not_recorded_as_blocked(tmp_path, small_beir, base_model_path):
    """Ctrl-C or SIGTERM during a week's run: Dagster ends the run as failed and the process carries
    on. The backfill must stop there, with nothing recorded for the week, not score it as blocked."""
    import os
    import signal
    import threading
    import time

    config = small_config(tmp_path / "home", small_beir, base_model_path)
    layout = Layout.of(config.paths)
    sim = SimulationConfig(dataset_dir=small_beir, log_dir=layout.log_dir, lancedb_uri=layout.lancedb_dir,
                           model_path=base_model_path, start=config.tiers.start_date, weeks=1, seed=0,
                           encode_max_seq_length=128)

    @dg.asset
    def long_step():
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        time.sleep(5)

    stopped = dg.Definitions(assets=[long_step], jobs=[dg.define_asset_job("week", selection=[long_step])])

    def run_week(week, job):
        return stopped.resolve_job_def("week").execute_in_process(raise_on_error=False)

    with pytest.raises(KeyboardInterrupt, match="was stopped while it ran; nothing is recorded"):
        run_backfill(config, sim, overrides={}, run_week=run_week, say=print)
    state = json.loads(layout.backfill_state.read_text()) if layout.backfill_state.exists() else {"rows": {}}
    assert state["rows"] == {}
