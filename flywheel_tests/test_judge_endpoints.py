"""The judge against each server behaviour teams really meet (fake servers with the real statuses,
bodies and headers): at most 1% unlabelled and 1.2 calls per label where the endpoint can answer,
a clear stop at once where it cannot."""

from __future__ import annotations

import pytest

from flywheel.config import REPO_ROOT, JudgeSettings
from flywheel.lib.beir import load_beir
from flywheel.lib.labels.endpoint import classify_status
from flywheel.lib.labels.judges import HumanLabels
from flywheel.lib.labels.openai_judge import OpenAIJudge
from flywheel.testing.fake_openai import FakeOpenAIServer, requests_of, scifact_raw_logs
from flywheel.testing.judge_scenarios import SCENARIOS, run_scenario

DATASET = REPO_ROOT / "data" / "scifact"


@pytest.fixture(scope="module")
def human():
    return HumanLabels(load_beir(DATASET))


@pytest.fixture(scope="module")
def requests():
    return requests_of(scifact_raw_logs(load_beir(DATASET), n_queries=30, distractors=3))


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.answerable and n != "azure_content_filter"])
def test_answerable_endpoints_label_everything_at_little_extra_cost(name, human, requests):
    r = run_scenario(name, human, requests)
    assert r["stopped"] is None
    assert r["missing"] <= 0.01 * len(requests), r["judge"].usage.extra
    assert r["calls"] <= 1.2 * r["labelled"], r["calls"]
    wrong = [j for j, q in zip(r["out"], requests) if j.grade is not None and (j.grade >= 2) != human.relevant(q.query, q.chunk_id)]
    assert not wrong  # adapted, not guessed: every grade is the one the server gave


def test_content_filter_refusals_are_unlabelled_with_their_reason_not_retried(human, requests):
    r = run_scenario("azure_content_filter", human, requests * 1)
    missing = [j for j in r["out"] if j.grade is None]
    assert all(j.error.startswith("content_filter") for j in missing)
    assert r["calls"] == len(requests)  # a filtered pair is asked once; the format is never downgraded
    assert r["judge"].traits.response_format == "json_schema"


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not s.answerable])
def test_what_cannot_succeed_stops_at_once_with_one_clear_message(name, human, requests):
    r = run_scenario(name, human, requests)
    assert r["stopped"] and SCENARIOS[name].stop in r["stopped"], r["stopped"]
    assert "labels received so far are cached" in r["stopped"]
    assert r["calls"] <= 3  # the first pair is asked alone: no per-pair retries of a dead endpoint


def test_what_the_judge_learned_is_remembered_for_the_next_run(human, requests, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    with FakeOpenAIServer(human, persona="reasoning") as srv:
        first = OpenAIJudge(JudgeSettings(model="fake-judge", base_url=srv.url), api_key="k", cache_path=cache)
        first.judge(requests[:10])
        assert first.traits.send_temperature is False and first.traits.max_tokens == 2048
        assert srv.calls == 12  # one 400 for temperature, one empty answer for "length", then ten labels
        srv.reset_counts()
        again = OpenAIJudge(JudgeSettings(model="fake-judge", base_url=srv.url), api_key="k", cache_path=cache)
        again.judge(requests[10:20])
    assert srv.calls == 10 and srv.statuses[400] == 0  # no call spent finding out again


def test_missing_usage_is_estimated_and_said_so(human, requests):
    r = run_scenario("no_usage", human, requests[:10])
    extra = r["judge"].usage.extra
    assert extra["cost_estimated"] and extra["usage_estimated_calls"] == 10


def test_a_local_endpoint_costs_nothing_unless_priced(human, requests):
    with FakeOpenAIServer(human) as srv:
        judge = OpenAIJudge(JudgeSettings(model="llama3.1:8b", base_url=srv.url), api_key="k")
        judge.judge(requests[:5])
    assert judge.usage.calls == 5 and judge.usage.cost_usd == 0.0


@pytest.mark.parametrize("status, body, kind", [
    (400, {"message": "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens "
                      "(1950 in the messages, 150 in the completion).", "type": "BadRequestError", "code": 400}, "context_length"),
    (400, {"message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
           "type": "invalid_request_error", "param": "response_format", "code": None}, "response_format"),
    (400, {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
           "type": None, "param": "prompt", "code": "content_filter"}, "content_filter"),
    (400, {"message": "Unsupported parameter: 'max_completion_tokens' is not supported with this model.",
           "param": "max_completion_tokens"}, "max_completion_tokens"),
    (400, {"message": "Budget has been exceeded! Current cost: 10.2, Max budget: 10.0", "type": "budget_exceeded",
           "code": "400"}, "quota"),
    (422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens "
          "and 150 `max_new_tokens`", "context_length"),
    (400, {"message": "some other problem with the request"}, "invalid_request"),
])
def test_errors_are_read_by_cause_not_by_status(status, body, kind):
    assert classify_status(status, body, "").kind == kind
