"""An LLM relevance judge on any OpenAI-compatible endpoint: OpenAI, Azure, vLLM, TGI, Ollama,
llama.cpp, LiteLLM and the reasoning models, each as they really behave.

Settings come from :class:`flywheel.config.JudgeSettings` (one place for every default).

Adapts, once per endpoint and model, and remembers it in the label cache: a rejected
``response_format`` steps down json_schema -> json_object -> none (only when the error is about
the format); a rejected ``temperature`` is dropped; ``max_completion_tokens`` and ``max_tokens`` are
swapped when one is refused; a reasoning model that spends its budget thinking (empty content,
finish_reason "length") gets ``reasoning_max_tokens``; a context-length error teaches the prompt
size that fits (few-shot examples go first, then the passage is shortened). The first pair is asked
alone, so this costs a handful of calls per endpoint, not one per pair.

Per pair: a content-filter refusal is recorded as unlabelled with that reason; an unusable answer
(unparseable, refused, empty) is asked again ``answer_retries`` times; the openai client's own
retries handle 429 (Retry-After), 5xx and timeouts. What cannot succeed stops the run with one
clear error (:class:`JudgeConfigError`): exhausted quota or budget (not retried, see
``endpoint.NoRetryTransport``), a refused key, an unknown model, a Retry-After longer than
``max_retry_wait_s``, a first request the endpoint cannot answer, or ``max_failures_in_a_row``.

Trust: answers are parsed by ``parsing`` (tolerant of fences and prose, strict on the grade);
chunks and queries with instructions aimed at the grader are judged with that text cut out and a
hardened prompt (or not at all), and flagged (``injection``). Afford: every answer is cached
(``cache``) the moment it arrives; cost uses the configured price, OpenAI's list price on OpenAI's
API, zero elsewhere; calls without ``usage`` are estimated and counted as such. The key is never
logged, put in metadata or shown by ``repr``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence

import pandas as pd

from flywheel.config import JudgeSettings
from flywheel.lib.labels import injection
from flywheel.lib.labels.cache import CachedLabel, CacheKey, JudgeCache
from flywheel.lib.labels.endpoint import (  # noqa: F401  (re-exported)
    DEFAULT_PRICE_PER_MTOK, PRICES_PER_MTOK, Cause, JudgeConfigError, NoRetryTransport, choose_api_key, classify,
    classify_status, is_reasoning_model, price_for, prices,
)
from flywheel.lib.labels.fewshot import DefaultEmbedder, Embed, FewshotSelector
from flywheel.lib.labels.judges import JudgeRequest, Judgement, JudgeUsage
from flywheel.lib.labels.parsing import JudgeAnswerError, parse_answer  # noqa: F401  (re-exported)
from flywheel.lib.labels.prompts import ANSWER_SCHEMA, PROMPT_VERSION, build_messages, format_pair  # noqa: F401
from flywheel.lib.labels.traits import Traits, adapt
from flywheel.lib.progress import Progress

log = logging.getLogger(__name__)

BUDGET_EXHAUSTED = "budget exhausted"
CLIENT_MAX_RETRY_AFTER_S = 120  # the openai client honours a Retry-After up to this itself
OPENAI_BASE_URL = "https://api.openai.com/v1"
STOP_MESSAGES = {
    "quota": "the endpoint says the quota or budget is spent ({msg}); no label can be bought until it is raised",
    "auth": "the endpoint refused the API key ({status}): set FLYWHEEL_JUDGE_API_KEY for {url}",
    "model": "model {model!r} is not served at {url} ({status}: {msg}); check FLYWHEEL_JUDGE_MODEL and "
             "FLYWHEEL_JUDGE_BASE_URL (it usually ends in /v1)",
    "rate_limit_long": "the endpoint asks to wait {wait:.0f}s (Retry-After), longer than "
                       "FLYWHEEL_JUDGE_MAX_RETRY_WAIT_S={max_wait:g}; rerun later",
}


def stop_message(cause: Cause, settings: JudgeSettings) -> str:
    template = STOP_MESSAGES.get(cause.kind, "the endpoint cannot judge ({status}: {msg}); check FLYWHEEL_JUDGE_BASE_URL and the model")
    return template.format(msg=cause.message[:160].strip(), status=cause.status or "no status", model=settings.model,
                           url=settings.base_url or OPENAI_BASE_URL, wait=cause.retry_after_s or 0,
                           max_wait=settings.max_retry_wait_s) + "; labels received so far are cached"


class OpenAIJudge:
    """The Judge protocol over an OpenAI-compatible chat completions endpoint."""

    def __init__(self, settings: JudgeSettings, *, api_key: str | None = None, cache_path: str | None = None,
                 prompt_version: str = PROMPT_VERSION, embed: Embed | None = None, client=None):
        import openai

        self.settings = settings
        self.prompt_version = prompt_version
        self.name = f"openai:{settings.model}"
        self.usage = JudgeUsage()
        self.embed = embed
        self._key = api_key or choose_api_key(settings.base_url, None, None)
        self._client = client or openai.OpenAI(
            api_key=self._key, base_url=settings.base_url or OPENAI_BASE_URL, timeout=settings.timeout_s,
            max_retries=settings.max_retries, http_client=openai.DefaultHttpxClient(transport=NoRetryTransport()),
        )
        self.prices = prices(settings.model, settings.base_url, settings.price_prompt_per_mtok,
                             settings.price_completion_per_mtok)
        if settings.budget_usd is not None and self.prices == (0.0, 0.0):
            log.warning("judge budget_usd=%s cannot stop anything: %s has no price (set "
                        "FLYWHEEL_JUDGE_PRICE_PROMPT_PER_MTOK / _COMPLETION_PER_MTOK)", settings.budget_usd, self.name)
        self.cache = JudgeCache(cache_path) if cache_path else None
        self._endpoint = settings.base_url or OPENAI_BASE_URL
        stored = self.cache.get_traits(self._endpoint, settings.model) if self.cache else None
        self.traits = Traits.initial(settings, is_reasoning_model(settings.model), stored)
        self._lock = threading.Lock()
        self._reserved = 0.0
        self._budget_hit = False
        self._fatal: str | None = None
        self._in_a_row = 0
        self._successes = 0

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.settings.model!r}, base_url={self.settings.base_url!r})"

    def redact(self, text: str) -> str:
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        return text

    # -- budget -----------------------------------------------------------------------------
    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prices[0] + completion_tokens * self.prices[1]) / 1e6

    def _reserve(self, messages: list[dict]) -> float | None:
        """Hold an upper estimate of a call's cost so concurrent calls cannot overshoot the budget."""
        estimate = self._cost(sum(len(m["content"]) for m in messages) // 3 + 8 * len(messages), self.traits.max_tokens)
        with self._lock:
            budget = self.settings.budget_usd
            if self._budget_hit or (budget is not None and self.usage.cost_usd + self._reserved + estimate > budget):
                self._budget_hit = True
                return None
            self._reserved += estimate
            return estimate

    def _settle(self, estimate: float, resp=None, messages=(), content: str | None = None) -> tuple[int, int, float]:
        """Release the reservation; charge a paid answer (usage as reported, else estimated)."""
        with self._lock:
            self._reserved -= estimate
            if resp is None:
                return 0, 0, 0.0
            usage = getattr(resp, "usage", None)
            if usage is not None and getattr(usage, "prompt_tokens", None) is not None:
                pt, ct = int(usage.prompt_tokens), int(usage.completion_tokens or 0)
            else:  # ~4 characters per token for English; counted, and reported as an estimate
                pt, ct = sum(len(m["content"]) for m in messages) // 4, len(content or "") // 4 + 1
                self.usage.extra["usage_estimated_calls"] = self.usage.extra.get("usage_estimated_calls", 0) + 1
            cost = self._cost(pt, ct)
            self.usage.calls += 1
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            self.usage.cost_usd += cost
            return pt, ct, cost

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.usage.extra[key] = self.usage.extra.get(key, 0) + n

    # -- one call ---------------------------------------------------------------------------
    def _create(self, messages: list[dict], traits: Traits):
        kwargs = {"model": self.settings.model, "messages": messages, traits.token_param: traits.max_tokens}
        if traits.send_temperature:
            kwargs["temperature"] = self.settings.temperature
        if traits.response_format == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "relevance_label", "strict": True, "schema": ANSWER_SCHEMA},
            }
        elif traits.response_format == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        return self._client.chat.completions.create(**kwargs)

    def _adapt(self, cause: Cause, used: Traits, prompt_chars: int) -> bool:
        """Change (and remember) how the endpoint is asked; False when nothing is left to change."""
        with self._lock:
            if self.traits != used:
                return True  # another thread adapted already: ask again with the new traits
            new = adapt(used, cause, prompt_chars, self.settings)
            if new is None:
                return False
            self.traits = new
            self.usage.extra.setdefault("adaptations", []).append(cause.kind)
        log.warning("judge endpoint %s: %s; now asking with %s", self._endpoint, cause.kind, new.describe())
        if self.cache is not None:
            self.cache.put_traits(self._endpoint, self.settings.model, dataclasses.asdict(new))
        return True

    def _stop(self, cause: Cause) -> Judgement:
        with self._lock:
            self._fatal = self._fatal or self.redact(stop_message(cause, self.settings))
        return Judgement(None, "", error=f"run_stopped: {self._fatal}")

    def _fail(self, code: str, detail: str) -> Judgement:
        return Judgement(None, "", error=self.redact(f"{code}: {detail}")[:300])

    def _judge_one(self, req: JudgeRequest, key: CacheKey, examples: list[dict], hardened: bool) -> Judgement:
        import openai

        s = self.settings
        attempts, adaptations, last = 1 + s.answer_retries, 0, ("unparseable", "no attempt made")
        while attempts > 0 and adaptations <= 6:
            if self._fatal:
                return Judgement(None, "", error=f"run_stopped: {self._fatal}")
            traits = self.traits
            messages = build_messages(req, examples, s.max_chunk_chars, hardened=hardened,
                                      max_prompt_chars=traits.prompt_char_cap)
            estimate = self._reserve(messages)
            if estimate is None:
                self._count("budget_exhausted")
                return Judgement(None, BUDGET_EXHAUSTED, error="budget_exhausted: the run's budget_usd is spent")
            try:
                resp = self._create(messages, traits)
            except openai.APIError as e:
                self._settle(estimate)
                cause = classify(e, s.max_retry_wait_s)
                if cause.fatal:
                    return self._stop(cause)
                if cause.kind in ("response_format", "temperature", "max_tokens", "max_completion_tokens", "context_length"):
                    adaptations += 1
                    if self._adapt(cause, traits, sum(len(m["content"]) for m in messages)):
                        continue
                    return self._fail(cause.kind, f"still refused after adapting: {cause.message[:200]}")
                if cause.kind == "content_filter":
                    return self._fail("content_filter", cause.message[:200])
                attempts -= 1
                last = ("endpoint_error" if cause.kind in ("transient", "rate_limit") else cause.kind,
                        f"{cause.status or ''} {cause.message[:200]}".strip())
                if cause.kind == "rate_limit" and (cause.retry_after_s or 0) > CLIENT_MAX_RETRY_AFTER_S:
                    time.sleep(cause.retry_after_s)  # longer than the client waits, within max_retry_wait_s
                elif cause.kind in ("transient", "rate_limit"):
                    attempts = 0  # the client has already retried these with backoff
                continue
            outcome = self._read(resp, messages, estimate, traits)
            if outcome[0] == "label":
                _, j, (pt, ct, cost) = outcome
                if self.cache is not None:
                    self.cache.put(key, CachedLabel(j.grade, j.reason, pt, ct, cost))
                return j
            if outcome[0] == "final":
                return outcome[1]
            if outcome[0] == "adapted":
                adaptations += 1
                continue
            attempts -= 1
            last = outcome[1:]
        return self._fail(last[0], f"no valid answer after {1 + s.answer_retries} attempts: {last[1]}")

    def _read(self, resp, messages: list[dict], estimate: float, traits: Traits) -> tuple:
        """("label", Judgement, (prompt tokens, completion tokens, cost)), ("final", Judgement),
        ("adapted",) to ask again at once, or ("retry", code, detail) for an unusable answer."""
        choices = getattr(resp, "choices", None)
        if isinstance(resp, (str, bytes)) or not choices:
            self._settle(estimate)  # not an answer: nothing is charged
            body = resp if isinstance(resp, (str, bytes)) else (getattr(resp, "model_extra", None) or {})
            if isinstance(body, dict) and body.get("error"):
                cause = classify_status(200, body, str(body["error"])[:300])
                if cause.fatal:
                    return ("final", self._stop(cause))
                return ("retry", "endpoint_error", f"200 with an error body: {str(body['error'])[:160]}")
            return ("retry", "endpoint_error", f"200 with a body that is not a chat completion: {str(body)[:80]!r}")
        choice = choices[0]
        message = choice.message
        content = getattr(message, "content", None)
        paid = self._settle(estimate, resp, messages, content)
        if choice.finish_reason == "content_filter":
            return ("final", self._fail("content_filter", "the endpoint filtered the answer (finish_reason content_filter)"))
        if getattr(message, "refusal", None):
            self._count("refusals")
            return ("retry", "refused", str(message.refusal)[:200])
        if not (content or "").strip() and choice.finish_reason == "length":
            if self._adapt(Cause("length", "empty answer with finish_reason length"), traits, 0):
                return ("adapted",)
            return ("retry", "empty_answer", "empty answer with finish_reason length even at reasoning_max_tokens")
        try:
            grade, reason = parse_answer(content)
        except JudgeAnswerError as e:
            self._count("unparseable_answers")
            return ("retry", "unparseable", str(e))
        return ("label", Judgement(grade, reason), paid)

    # -- the Judge protocol -----------------------------------------------------------------
    def judge(self, requests: Sequence[JudgeRequest], *, fewshot: pd.DataFrame | None = None,
              progress: Callable[[str], None] | None = None) -> list[Judgement]:
        s = self.settings
        self._budget_hit, self._fatal, self._in_a_row = False, None, 0
        flags = [bool(injection.scan(r.query) or injection.scan(r.chunk_text)) for r in requests]
        keys = [CacheKey.of(self.prompt_version + ("+hardened" if f else ""), s.model, r.query, r.chunk_id, r.chunk_text)
                for r, f in zip(requests, flags)]
        hits = self.cache.get_many(keys) if self.cache is not None else {}
        results: list[Judgement | None] = [None] * len(requests)
        todo: dict[CacheKey, list[int]] = {}
        for i, key in enumerate(keys):
            if key in hits:
                results[i] = Judgement(hits[key].grade, hits[key].reason, injection_flag=flags[i])
            elif flags[i] and s.injection_policy == "skip":
                results[i] = Judgement(None, "", error="injection_skipped: instructions aimed at the grader",
                                       injection_flag=True)
            else:
                todo.setdefault(key, []).append(i)
        with self._lock:
            self.usage.cached += sum(k in hits for k in keys)
            self.usage.extra["injection_flagged"] = sum(flags)
        say = progress or (lambda msg: log.info(msg))
        say(f"judge {self.name}: {len(requests)} pairs, {self.usage.cached} from cache, {len(todo)} to ask "
            f"(concurrency {s.concurrency}, {sum(flags)} flagged for injection)")
        selector = self._selector(requests, todo, fewshot)
        jobs = []
        for key, idx in todo.items():
            r = requests[idx[0]]
            examples = selector.select(r.query, exclude_chunk_id=r.chunk_id) if selector else []
            if flags[idx[0]]:
                r = JudgeRequest(injection.redact(r.query), r.chunk_id, injection.redact(r.chunk_text), r.rank)
            jobs.append((key, idx, r, examples, flags[idx[0]]))
        self._run(jobs, results, say)
        out = [r if r is not None else Judgement(None, "", error="not_judged: the run stopped first") for r in results]
        out = [dataclasses.replace(j, injection_flag=f) for j, f in zip(out, flags)]
        self._finish(out, todo)
        return out

    def _selector(self, requests, todo, fewshot) -> FewshotSelector | None:
        if not (todo and fewshot is not None and len(fewshot) and self.settings.fewshot_k > 0):
            return None
        if self.embed is None:
            self.embed = DefaultEmbedder()
        selector = FewshotSelector(fewshot, self.embed, self.settings.fewshot_k)
        selector.prepare([requests[ix[0]].query for ix in todo.values()])
        return selector

    def _record(self, job, j: Judgement, results) -> None:
        for i in job[1]:
            results[i] = j
        with self._lock:
            if j.grade is not None:
                self._in_a_row, self._successes = 0, self._successes + 1
            elif (j.error or "").split(":")[0] in ("endpoint_error", "invalid_request"):
                self._in_a_row += 1
                limit = 1 if self._successes == 0 else self.settings.max_failures_in_a_row
                if self._in_a_row >= limit and not self._fatal:
                    first = "the first pair" if self._successes == 0 else f"{self._in_a_row} pairs in a row"
                    self._fatal = self.redact(f"{first} failed at the endpoint ({j.error[:200]}); check "
                                              f"FLYWHEEL_JUDGE_BASE_URL and the model; labels received so far are cached")

    def _run(self, jobs, results, say) -> None:
        meter, done = Progress(f"judge {self.name}", len(jobs), say, unit="asked"), 0
        if jobs:  # the first pair alone: it settles the endpoint's traits before the others ask
            key, idx, r, ex, hard = jobs[0]
            self._record(jobs[0], self._judge_one(r, key, ex, hard), results)
            done = 1
        with ThreadPoolExecutor(max_workers=self.settings.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self._judge_one, job[2], job[0], job[3], job[4]): job for job in jobs[1:]}
            for fut in as_completed(futures):
                self._record(futures[fut], fut.result(), results)
                done += 1
                meter.update(done, force=done == len(jobs), detail=(
                    f"{sum(r is not None and r.grade is None for r in results)} unlabelled, "
                    f"${self.usage.cost_usd:.4f} spent{' (estimated)' if self.usage.extra.get('usage_estimated_calls') else ''}"))

    def _finish(self, out: list[Judgement], todo) -> None:
        reasons: dict[str, int] = {}
        for j in out:
            if j.grade is None:
                code = (j.error or "unknown").split(":")[0]
                reasons[code] = reasons.get(code, 0) + 1
        with self._lock:
            self.usage.failures += sum(n for c, n in reasons.items() if c != "budget_exhausted")
            self.usage.extra.update(unlabelled_by_reason=reasons, **self.traits.as_extra(),
                                    cost_estimated=bool(self.usage.extra.get("usage_estimated_calls")))
        if self._fatal:
            raise JudgeConfigError(self._fatal)
