"""Server behaviours the judge must survive, shared by ``flywheel_tests/test_judge_endpoints.py`` and
``benchmarks/judge.py``: how to start the fake server for each, and whether the endpoint can answer
at all (``answerable`` False: the run must stop at once with ``stop`` in its message)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.config import JudgeSettings
from flywheel.lib.labels.endpoint import JudgeConfigError
from flywheel.lib.labels.openai_judge import OpenAIJudge
from flywheel.testing.fake_openai import FakeOpenAIServer, fault_mix

KEY = "sk-scenario-key"


@dataclass(frozen=True)
class Scenario:
    server: dict = field(default_factory=dict)
    answerable: bool = True
    stop: str = ""  # a fragment of the stop message, for what cannot succeed
    model: str = "fake-judge"
    key: str = KEY


SCENARIOS: dict[str, Scenario] = {
    "openai": Scenario(),
    "azure_content_filter": Scenario({"persona": "azure", "filter_rate": 0.01}),
    "vllm_rejects_json_schema": Scenario({"persona": "vllm"}),
    "vllm_context_length": Scenario({"persona": "vllm", "context_tokens": 700}),
    "tgi_422": Scenario({"persona": "tgi", "context_tokens": 700}),
    "ollama_prose_and_fences": Scenario({"persona": "ollama"}),
    "llamacpp_fences_context": Scenario({"persona": "llamacpp", "context_tokens": 700}),
    "litellm_unsupported_temperature": Scenario({"persona": "litellm"}),
    "reasoning_known_name": Scenario({"persona": "reasoning"}, model="gpt-5-mini"),
    "reasoning_unknown_name": Scenario({"persona": "reasoning"}),
    "no_usage": Scenario({"no_usage": True}),
    "html_200_sometimes": Scenario({"html_rate": 0.05}),
    "error_200_sometimes": Scenario({"error_body_rate": 0.05}),
    "faults_10pct": Scenario({"faults": fault_mix(0.1), "slow_s": 1.5, "seed": 1}),
    "insufficient_quota": Scenario({"quota_exhausted": True}, answerable=False, stop="quota or budget is spent"),
    "wrong_key": Scenario({}, answerable=False, stop="refused the API key", key="sk-wrong"),
    "unknown_model": Scenario({"persona": "ollama", "models": {"llama3.1:8b"}}, answerable=False, stop="is not served at"),
    "html_200_always": Scenario({"html_rate": 1.0}, answerable=False, stop="not a chat completion"),
    "retry_after_longer_than_limit": Scenario({"retry_after_long_s": 86400}, answerable=False, stop="asks to wait 86400s"),
}


def run_scenario(name: str, human, requests, *, concurrency: int = 8, cache_path: str | None = None) -> dict:
    """Judge ``requests`` against the scenario's server: labelled, missing, calls, the stop message."""
    sc = SCENARIOS[name]
    settings = JudgeSettings(model=sc.model, concurrency=concurrency, timeout_s=1.0, max_retries=3,
                             price_prompt_per_mtok=0.15, price_completion_per_mtok=0.6)
    with FakeOpenAIServer(human, api_key=KEY, **sc.server) as srv:
        judge = OpenAIJudge(settings.with_(base_url=srv.url), api_key=sc.key, cache_path=cache_path)
        stopped, out = None, []
        try:
            out = judge.judge(requests, progress=lambda _: None)
        except JudgeConfigError as e:
            stopped = str(e)
        labelled = sum(j.grade is not None for j in out)
        # every HTTP request answered, refused ones (401) included
        return {"labelled": labelled, "missing": len(requests) - labelled, "calls": sum(srv.statuses.values()),
                "answerable": sc.answerable, "stopped": stopped, "judge": judge, "out": out}
