"""The labelling gate in Dagster: a week with too many unlabelled pairs, or whose kappa cannot be
computed, is blocked with the reason; labels are reported by reason; keys go only where they belong."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from flywheel.defs.labels import judge_agrees_with_reference, relevance_labels
from flywheel.defs.partitions import weekly_partitions
from flywheel.defs.resources import JudgeResource, PathsResource, TiersResource
from flywheel.config import REPO_ROOT
from flywheel.lib import store
from flywheel.lib.beir import load_beir
from flywheel.lib.labels.endpoint import JudgeConfigError, choose_api_key, prices
from flywheel.lib.labels.gate import check_labels, labels_by_reason
from flywheel.lib.labels.judges import HumanLabels
from flywheel.testing.fake_openai import FakeOpenAIServer, scifact_raw_logs

DATASET = REPO_ROOT / "data" / "scifact"
WEEK = "2026-09-28"
KEY = "sk-gate-test-5e4d3c2b1aSECRET"


@pytest.fixture(scope="module")
def dataset():
    return load_beir(DATASET)


def materialize(tmp_path, server, monkeypatch, raw: pd.DataFrame, **judge):
    monkeypatch.setenv("FLYWHEEL_JUDGE_API_KEY", KEY)
    store.write_table(store.asset_path(tmp_path / "assets", "raw_logs", WEEK), raw)
    result = dg.materialize(
        [dg.AssetSpec("raw_logs", partitions_def=weekly_partitions), relevance_labels, judge_agrees_with_reference],
        partition_key=WEEK,
        instance=dg.DagsterInstance.ephemeral(),
        resources={
            "paths": PathsResource(home=str(tmp_path), dataset=str(DATASET)),
            "tiers": TiersResource(),
            "judge": JudgeResource(kind="openai", model="fake-judge", base_url=server.url,
                                   api_key=dg.EnvVar("FLYWHEEL_JUDGE_API_KEY"), concurrency=4, timeout_s=2.0,
                                   max_retries=1, **judge),
        },
        raise_on_error=False,
    )
    evals = result.get_asset_check_evaluations()
    assert len(evals) == 1
    return result, evals[0]


def test_a_week_with_more_than_5_percent_unlabelled_is_blocked_with_the_reason(dataset, tmp_path, monkeypatch):
    raw = scifact_raw_logs(dataset, n_queries=25, distractors=3)
    # Azure refusing ~20% of prompts with its content filter: the judge itself agrees with humans
    with FakeOpenAIServer(HumanLabels(dataset), api_key=KEY, persona="azure", filter_rate=0.2) as srv:
        result, ev = materialize(tmp_path, srv, monkeypatch, raw)
    assert result.success is False or not ev.passed
    assert not ev.passed
    assert ev.metadata["kappa"].value >= 0.99  # agreement alone would have passed
    assert ev.metadata["unlabelled_share"].value > 0.05
    assert "are unlabelled, more than 5.0% allowed (content_filter" in ev.description
    assert "| content_filter |" in ev.metadata["labels_by_reason"].md_str


def test_the_same_week_passes_when_few_pairs_are_unlabelled(dataset, tmp_path, monkeypatch):
    raw = scifact_raw_logs(dataset, n_queries=25, distractors=3)
    with FakeOpenAIServer(HumanLabels(dataset), api_key=KEY, persona="azure", filter_rate=0.0) as srv:
        _, ev = materialize(tmp_path, srv, monkeypatch, raw)
    assert ev.passed, ev.description
    assert ev.metadata["unlabelled"].value == 0


def test_a_week_without_a_reference_fails_unless_allowed(tmp_path, monkeypatch):
    # synthetic queries no human label covers, and no feedback: kappa cannot be computed
    rows = [{"request_id": f"r{n}", "timestamp": pd.Timestamp("2026-09-28 12:00"), "query": f"unlabelled question {n}",
             "results": [{"chunk_id": f"c{n}-{r}", "text": f"passage {r}", "score": 1.0 - r / 10, "rank": r + 1}
                         for r in range(4)],
             "clicks": [], "saves": [], "cited": [], "thumbs": None, "dwell_ms": None} for n in range(10)]
    raw = pd.DataFrame(rows)
    with FakeOpenAIServer(None, api_key=KEY) as srv:
        _, blocked = materialize(tmp_path / "a", srv, monkeypatch, raw)
        _, allowed = materialize(tmp_path / "b", srv, monkeypatch, raw, allow_no_kappa=True)
    assert not blocked.passed and "kappa cannot be computed: no human labels or explicit feedback" in blocked.description
    assert "FLYWHEEL_JUDGE_ALLOW_NO_KAPPA" in blocked.description
    assert allowed.passed and "allowed by allow_no_kappa" in allowed.description


def test_gate_rules_on_a_table():
    base = {"week": WEEK, "query": "q", "reason": "", "label_source": "judge", "injection_flag": False}
    rows = []
    for i in range(40):
        human = i % 2 == 0
        grade = None if i < 3 else (3 if human else 0)
        rows.append({**base, "query_key": f"q{i // 4}", "chunk_id": f"c{i}", "grade": grade, "judge_grade": grade,
                     "human_relevant": human, "feedback_relevant": None,
                     "judge_error": "context_length: too long" if grade is None else None})
    labels = pd.DataFrame(rows)
    labels["grade"] = labels["grade"].astype("Int64")
    labels["judge_grade"] = labels["judge_grade"].astype("Int64")
    labels["human_relevant"] = labels["human_relevant"].astype("boolean")
    labels["feedback_relevant"] = labels["feedback_relevant"].astype("boolean")
    assert labels_by_reason(labels) == {"labelled": 37, "context_length": 3}
    blocked = check_labels(labels, min_kappa=0.4, max_unlabelled_share=0.05)
    assert not blocked.passed and "3 of 40 pairs (7.5%) are unlabelled" in blocked.description
    assert check_labels(labels, min_kappa=0.4, max_unlabelled_share=0.1).passed
    empty = check_labels(labels.iloc[0:0], min_kappa=0.4, max_unlabelled_share=0.05)
    assert not empty.passed and "no (query, chunk) pairs" in empty.description


def test_openai_key_goes_only_to_openai():
    assert choose_api_key(None, None, "sk-openai") == "sk-openai"
    assert choose_api_key("https://api.openai.com/v1", None, "sk-openai") == "sk-openai"
    assert choose_api_key("http://localhost:8000/v1", None, "sk-openai") == "no-key"  # never the user's OpenAI key
    assert choose_api_key("http://localhost:8000/v1", "sk-judge", "sk-openai") == "sk-judge"
    with pytest.raises(JudgeConfigError, match="FLYWHEEL_JUDGE_API_KEY"):
        choose_api_key(None, None, None)


def test_local_endpoints_cost_nothing_unless_priced():
    assert prices("gpt-4o-mini", None, None, None) == (0.15, 0.60)
    assert prices("llama3.1:8b", "http://localhost:11434/v1", None, None) == (0.0, 0.0)
    assert prices("gpt-4o-mini", "https://x.openai.azure.com/openai/v1/", 0.15, 0.6) == (0.15, 0.6)
