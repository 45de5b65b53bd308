"""Labelling a week: fusion of judge and feedback, label sources, and the blocking kappa check in Dagster."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import dagster as dg
import pandas as pd
import pytest

from flywheel.defs.labels import judge_agrees_with_reference, relevance_labels
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import JudgeResource, PathsResource, TiersResource
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.labels.fusion import FusionConfig, fuse_grade, label_source, pair_evidence
from flywheel.lib.labels.judges import HumanLabels, SimulatedJudge, normalize_query
from flywheel.lib.labels.weekly import LABEL_COLUMNS, agreement_with_reference, label_week
from flywheel.config import REPO_ROOT
from flywheel.testing.fake_openai import FakeOpenAIServer, scifact_raw_logs

DATASET = REPO_ROOT / "data" / "scifact"
WEEK = "2026-09-28"
KEY = "sk-dagster-test-9f8e7d6c5b4aSECRET"


@pytest.fixture(scope="module")
def dataset():
    return load_beir(DATASET)


# -- fusion ---------------------------------------------------------------------------------------
def impressions(rows):
    base = {"request_id": "r1", "query_key": "q", "clicked": False, "cited": False, "saved": False, "thumbs": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def evidence_of(rows, **cfg):
    ev = pair_evidence(impressions(rows), FusionConfig(**cfg))
    return dict(zip(ev["chunk_id"], ev["feedback"]))


def test_evidence_names_the_strongest_signal():
    ev = evidence_of([
        {"chunk_id": "saved", "rank": 1, "saved": True, "cited": True, "thumbs": "down"},
        {"chunk_id": "up", "rank": 2, "cited": True, "thumbs": "up"},
        {"chunk_id": "down", "rank": 3, "cited": True, "thumbs": "down"},
        {"chunk_id": "cited", "rank": 4, "cited": True},
        {"chunk_id": "nothing", "rank": 9},
    ])
    assert ev == {"saved": "saved", "up": "cited+thumbs_up", "down": "cited+thumbs_down", "cited": "cited",
                  "nothing": None}


def test_clicks_are_corrected_for_position_bias():
    # shown three times at rank 1 and clicked once: 1/3 debiased CTR, not enough
    top = [{"request_id": f"r{i}", "chunk_id": "top", "rank": 1, "clicked": i == 0} for i in range(3)]
    # shown three times at rank 6 and clicked once: 1 / (3/6) = 2 -> relevance evidence
    deep = [{"request_id": f"s{i}", "chunk_id": "deep", "rank": 6, "clicked": i == 0} for i in range(3)]
    ev = pair_evidence(impressions(top + deep))
    ctr = dict(zip(ev["chunk_id"], ev["debiased_ctr"]))
    assert ctr["top"] == pytest.approx(1 / 3) and ctr["deep"] == pytest.approx(2.0)
    fb = dict(zip(ev["chunk_id"], ev["feedback"]))
    assert fb["deep"] == "click"
    # the rank-1 chunk was skipped in the requests where nothing below was clicked: no evidence either way
    assert fb["top"] is None


def test_skip_above_a_click_is_negative_evidence():
    ev = evidence_of([
        {"chunk_id": "a", "rank": 1},
        {"chunk_id": "b", "rank": 2, "clicked": True},
        {"chunk_id": "c", "rank": 3},
    ], click_threshold=0.5)
    assert ev == {"a": "skipped", "b": "click", "c": None}


@pytest.mark.parametrize("judge_grade, evidence, fused, how", [
    (0, None, 0, "judge"),
    (None, None, None, "judge"),
    (0, "saved", 2, "fused"),
    (3, "cited+thumbs_up", 3, "fused"),
    (None, "cited+thumbs_up", 2, "feedback"),
    (3, "cited+thumbs_down", 1, "fused"),
    (0, "cited+thumbs_down", 0, "fused"),
    (1, "click", 2, "fused"),
    (0, "click", 0, "fused"),
    (None, "click", None, "judge"),
    (2, "skipped", 2, "fused"),
])
def test_fusion_rule(judge_grade, evidence, fused, how):
    assert fuse_grade(judge_grade, evidence) == (fused, how)


def test_label_source_names():
    assert label_source("judge", "simulated", None) == "judge:simulated"
    assert label_source("fused", "x", "cited") == "fused:judge+cited"
    assert label_source("feedback", "x", "saved") == "feedback:saved"


# -- label_week -----------------------------------------------------------------------------------
def test_label_week_fuses_and_records_sources(dataset):
    raw = scifact_raw_logs(dataset, n_queries=30, distractors=3)
    human = HumanLabels(dataset)
    # the user cites and thumbs up a relevant chunk of the first request, and saves one of the second
    first, second = raw.iloc[0], raw.iloc[1]
    rel1 = next(r["chunk_id"] for r in first["results"] if human.relevant(first["query"], r["chunk_id"]))
    raw.at[0, "cited"] = [rel1]
    raw.at[0, "thumbs"] = "up"
    irr2 = next(r["chunk_id"] for r in second["results"] if not human.relevant(second["query"], r["chunk_id"]))
    raw.at[1, "saves"] = [irr2]
    # the same query asked again the same week: judged once
    raw = pd.concat([raw, raw.iloc[[2]].assign(request_id="again")], ignore_index=True)

    judge = SimulatedJudge(dataset, miss_rate=0.3, lenient_rate=0.05)
    labels, stats = label_week(raw, WEEK, judge, human=human)
    assert list(labels.columns) == LABEL_COLUMNS
    assert stats.pairs == len(labels) and stats.unique_pairs == len(labels.drop_duplicates(["query_key", "chunk_id"]))
    assert stats.unique_pairs < stats.pairs and judge.usage.calls == stats.unique_pairs
    assert (labels["relevant"] == (labels["grade"].fillna(-1) >= 2)).all()

    row1 = labels[(labels["request_id"] == first["request_id"]) & (labels["chunk_id"] == rel1)].iloc[0]
    assert row1["label_source"] == "fused:judge+cited+thumbs_up" and row1["grade"] >= 2
    row2 = labels[(labels["request_id"] == second["request_id"]) & (labels["chunk_id"] == irr2)].iloc[0]
    assert row2["label_source"] == "fused:judge+saved" and row2["grade"] == 2 and row2["judge_grade"] in (0, 1, 2)
    plain = labels[labels["feedback"].isna()]
    assert (plain["label_source"] == f"judge:{judge.name}").all()
    assert (plain["grade"] == plain["judge_grade"]).all()
    assert stats.label_sources[f"judge:{judge.name}"] == plain.drop_duplicates(["query_key", "chunk_id"]).shape[0]
    kappa, n, ref = agreement_with_reference(labels)
    assert ref == "human" and n == stats.unique_pairs and 0.3 < kappa <= 1.0

    # without fusion, grades are the judge's
    raw_only, _ = label_week(raw, WEEK, judge, human=human, fusion=None)
    assert (raw_only["grade"].fillna(-1) == raw_only["judge_grade"].fillna(-1)).all()


def test_label_week_survives_an_empty_week(dataset):
    empty = scifact_raw_logs(dataset, n_queries=0)
    labels, stats = label_week(empty, WEEK, SimulatedJudge(dataset))
    assert len(labels) == 0 and stats.pairs == 0 and list(labels.columns) == LABEL_COLUMNS


# -- Dagster: the asset and its blocking check ----------------------------------------------------
class Truth:
    """Human-like labels for synthetic queries the dataset does not know (so the reference is feedback)."""

    def __init__(self, relevant: set[tuple[str, str]]):
        self.rel = relevant

    def relevant(self, query, chunk_id):
        return (normalize_query(query), chunk_id) in self.rel


def feedback_only_logs(n_queries: int = 30) -> tuple[pd.DataFrame, Truth]:
    """Synthetic traffic no human label covers: users click the relevant chunk (rank 3 or 4) and skip those above."""
    rows, rel = [], set()
    for n in range(n_queries):
        q = f"synthetic question {n} about topic {n % 7}"
        chunks = [f"s{n}-{r}" for r in range(1, 7)]
        good = chunks[2 + n % 2]
        rel.add((normalize_query(q), good))
        rows.append({
            "request_id": f"r{n:04d}", "timestamp": datetime(2026, 9, 28, 12, n % 60), "query": q,
            "results": [{"chunk_id": c, "text": f"passage {c}", "score": 1.0 - r / 10, "rank": r + 1}
                        for r, c in enumerate(chunks)],
            "clicks": [good], "saves": [], "cited": [], "thumbs": None, "dwell_ms": 20000.0,
        })
    return pd.DataFrame(rows), Truth(rel)


def materialize(tmp_path, server, monkeypatch, raw: pd.DataFrame, min_kappa: float = 0.4):
    monkeypatch.setenv("FLYWHEEL_JUDGE_API_KEY", KEY)
    store.write_table(store.asset_path(tmp_path / "assets", "raw_logs", WEEK), raw)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [dg.AssetSpec("raw_logs", partitions_def=weekly_partitions), relevance_labels, judge_agrees_with_reference],
        partition_key=WEEK,
        instance=instance,
        resources={
            "paths": PathsResource(home=str(tmp_path), dataset=str(DATASET)),
            "tiers": TiersResource(),
            "judge": JudgeResource(
                kind="openai", model="fake-judge", base_url=server.url, api_key=dg.EnvVar("FLYWHEEL_JUDGE_API_KEY"),
                concurrency=4, timeout_s=2.0, max_retries=2, min_kappa=min_kappa,
            ),
        },
        raise_on_error=False,
    )
    return result, instance


def check_result(result):
    evals = result.get_asset_check_evaluations()
    assert len(evals) == 1
    return evals[0]


def test_check_passes_for_a_judge_that_agrees_with_humans_and_the_rerun_is_free(
    dataset, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    raw = scifact_raw_logs(dataset, n_queries=10, distractors=3)
    with FakeOpenAIServer(HumanLabels(dataset), api_key=KEY) as srv:
        result, instance = materialize(tmp_path, srv, monkeypatch, raw)
        assert result.success
        ev = check_result(result)
        assert ev.passed and ev.metadata["reference"].value == "human"
        assert ev.metadata["kappa"].value >= 0.99
        first_calls = srv.calls
        mat = result.asset_materializations_for_node("relevance_labels")[0]
        assert mat.metadata["judge_calls"].value == first_calls > 0
        assert mat.metadata["judge_kappa_reference"].text == "human"

        srv.reset_counts()
        result2, instance2 = materialize(tmp_path, srv, monkeypatch, raw)
        assert result2.success and srv.calls == 0  # the cache: re-materializing the week costs nothing
        mat2 = result2.asset_materializations_for_node("relevance_labels")[0]
        assert mat2.metadata["judge_calls"].value == 0 and mat2.metadata["judge_cached"].value == first_calls

    labels = store.read_table(store.asset_path(tmp_path / "assets", "relevance_labels", WEEK))
    assert labels["label_source"].eq("judge:openai:fake-judge").all() and labels["grade"].notna().all()
    # the key appears nowhere: not in the event log (metadata, run config), not in logs
    for inst, res in ((instance, result), (instance2, result2)):
        for record in inst.all_logs(res.run_id):
            assert KEY not in str(record)
            if record.dagster_event is not None:
                assert KEY not in repr(record.dagster_event)
        assert KEY not in json.dumps(res.dagster_run.run_config, default=str)
    assert KEY not in caplog.text


def test_check_blocks_a_judge_that_contradicts_humans(dataset, tmp_path, monkeypatch):
    raw = scifact_raw_logs(dataset, n_queries=10, distractors=3)
    with FakeOpenAIServer(HumanLabels(dataset), api_key=KEY, invert=True) as srv:
        result, _ = materialize(tmp_path, srv, monkeypatch, raw)
    ev = check_result(result)
    assert not ev.passed and ev.metadata["reference"].value == "human"
    assert ev.metadata["kappa"].value < 0.4


def test_check_uses_explicit_feedback_when_there_are_no_human_labels(tmp_path, monkeypatch):
    raw, truth = feedback_only_logs()
    with FakeOpenAIServer(truth, api_key=KEY) as srv:
        result, _ = materialize(tmp_path, srv, monkeypatch, raw)
    ev = check_result(result)
    assert ev.passed and ev.metadata["reference"].value == "feedback"
    assert ev.metadata["pairs"].value >= 30 and ev.metadata["kappa"].value >= 0.9
    labels = store.read_table(store.asset_path(tmp_path / "assets", "relevance_labels", WEEK))
    assert labels["human_relevant"].isna().all()
    assert set(labels["label_source"]) >= {"fused:judge+click", "fused:judge+skipped", "judge:openai:fake-judge"}


def test_check_fails_when_the_judge_contradicts_explicit_feedback(tmp_path, monkeypatch):
    raw, truth = feedback_only_logs()
    with FakeOpenAIServer(truth, api_key=KEY, invert=True) as srv:
        result, _ = materialize(tmp_path, srv, monkeypatch, raw)
    ev = check_result(result)
    assert not ev.passed and ev.metadata["reference"].value == "feedback"
    assert ev.metadata["kappa"].value < 0
