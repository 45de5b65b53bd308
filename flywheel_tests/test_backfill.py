"""The flywheel over weeks: each week served by the champion of its time, a poisoned week blocked
by the gate while the champion stays, the trend report, and resuming a finished backfill."""

from __future__ import annotations

import json
from datetime import date

import dagster as dg
import mlflow
import pytest

from flywheel.backfill import run_backfill
from flywheel.defs import build_definitions
from flywheel.defs.resources import resources_for
from flywheel.lib.simulate.traffic import SimulationConfig
from flywheel.settings import Settings


@pytest.fixture(scope="module")
def backfill(tmp_path_factory, small_beir, base_model_path):
    home = tmp_path_factory.mktemp("backfill-home")
    settings = Settings(
        home=home, dataset_dir=small_beir, base_model=base_model_path, start_date=date(2026, 9, 28),
        eval_queries=3, fewshot_examples=30, finetune_examples=120,
        # enough steps at a high enough rate that a week's labels really shape its model
        train_batch_size=16, train_max_seq_length=64, train_max_steps=20, train_learning_rate=3e-4,
        encode_max_seq_length=128, mine_range_max=10,
        reranker_max_steps=8, reranker_max_length=64, rerank_depth=20,
    )
    sim = SimulationConfig(
        dataset_dir=small_beir, log_dir=settings.log_dir, lancedb_uri=settings.lancedb_dir,
        model_path=base_model_path, start=settings.start_date, weeks=2, seed=0, encode_max_seq_length=128,
        poison_weeks=(1,),  # the second week's labels point at shuffled texts
    )
    # the default gate (regression margin 0.01 NDCG@10)
    defs = build_definitions(resources_for(settings))
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

    figures = run_backfill(settings, sim, light=False, run_week=run_week, say=print)
    return settings, sim, figures, champions, champion_now


def test_poisoned_week_is_blocked_and_the_champion_stays(backfill):
    settings, _, figures, champions, champion_now = backfill
    rows = json.loads((settings.reports_dir / "trend.json").read_text())["weeks"]
    assert [r["poisoned"] for r in rows] == [False, True]
    assert figures["poisoned_week_blocked"] is True
    assert rows[1]["promoted"] is False and "regression" in rows[1]["gate"]
    # the champion after the poisoned week is the one before it, in the registry and the figures
    assert champions[1] == champions[0] == champion_now()
    assert rows[1]["champion"] == rows[0]["champion"]
    ndcg = list(figures["ndcg10_by_week"].values())
    assert ndcg[1] == ndcg[0]
    # the poisoned challenger really was worse on the test split than the champion it lost to
    assert rows[1]["challenger_ndcg10_test"] < rows[1]["champion_ndcg10_test"]


def test_each_week_is_served_by_the_champion_of_its_time(backfill):
    settings, _, figures, champions, _ = backfill
    rows = json.loads((settings.reports_dir / "trend.json").read_text())["weeks"]
    assert rows[0]["served_by"] == "base"
    assert rows[1]["served_by"] == rows[0]["champion"]  # week 1's decision decides who serves week 2
    assert figures["champion_changes"] == sum(r["promoted"] for r in rows)
    # labels per week and judge agreement per week are in the trend
    assert all(r["labels"] > 0 and 0 < r["judge_kappa"] <= 1 for r in rows)


def test_trend_report_shows_every_week_and_the_poisoned_one(backfill):
    settings, *_ = backfill
    md = (settings.reports_dir / "trend.md").read_text()
    assert "(poisoned) |" in md and "| blocked |" in md
    assert md.count("](data:image/png;base64,") == 1
    page = (settings.reports_dir / "trend.html").read_text()
    assert "<img alt=" in page and "poisoned" in page


def test_a_finished_backfill_resumes_without_rerunning(backfill):
    settings, sim, figures, _, _ = backfill

    def must_not_run(week, job):
        raise AssertionError(f"week {week} was run again")

    again = run_backfill(settings, sim, light=False, run_week=must_not_run, say=print)
    assert again["ndcg10_by_week"] == figures["ndcg10_by_week"]
