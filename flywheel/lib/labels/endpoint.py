"""What an OpenAI-compatible endpoint said, by cause: the judge adapts, skips the pair, or stops.

Servers differ (statuses and bodies as they really send them):
* OpenAI / Azure: ``{"error": {"message", "type", "param", "code"}}``; context length is a 400 with
  code ``context_length_exceeded``; reasoning models (gpt-5, o-series) reject ``temperature`` with
  code ``unsupported_value``; quota exhaustion is a 429 with ``insufficient_quota`` that never
  succeeds on retry; Azure's prompt filter is a 400 with code ``content_filter``.
* vLLM: ``{"object": "error", "message", "type": "BadRequestError", "code": 400}`` (older) or the
  same inside ``"error"``; "This model's maximum context length is N tokens. However, you requested M".
* TGI: 422 ``{"error": "Input validation error: ...", "error_type": "validation"}``, and a plain-text
  422 "Failed to deserialize the JSON body ... unknown variant `json_schema`".
* llama.cpp: 400 ``{"error": {"code": 400, "type": "exceed_context_size_error", "n_ctx", ...}}``.
* Ollama: 404 ``model "x" not found, try pulling it first``.
* LiteLLM: the upstream error re-wrapped, ``"code": "400"``, ``param`` null, message prefixed
  ``litellm.BadRequestError`` / ``UnsupportedParamsError`` / ``ContentPolicyViolationError``;
  a spent key budget is type ``budget_exceeded``.

``classify`` maps any of them to a :class:`Cause`; ``NoRetryTransport`` tells the openai client
not to retry what cannot succeed (quota), through the documented ``x-should-retry`` header, so its
own retries keep handling the rest. Also here: which key goes where and what a token costs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx2

OPENAI_HOSTS = ("api.openai.com",)
REASONING_PREFIXES = ("gpt-5", "o1", "o3", "o4")

# USD per million (prompt, completion) tokens, OpenAI list prices as of 2025. A model name matches its
# longest listed prefix ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"). Used only on OpenAI's own API.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "o4-mini": (1.10, 4.40),
    "o3-mini": (1.10, 4.40),
}
# an OpenAI model missing from the table is priced like gpt-4o, so a budget cap errs on the safe side
DEFAULT_PRICE_PER_MTOK: tuple[float, float] = (2.50, 10.00)


class JudgeConfigError(RuntimeError):
    """The endpoint cannot judge anything as configured (key, quota, model, URL): the run stops."""


def is_openai(base_url: str | None) -> bool:
    """True for OpenAI's own API: no base URL, or one on api.openai.com."""
    return not base_url or (urlparse(base_url).hostname or "").lower() in OPENAI_HOSTS


def choose_api_key(base_url: str | None, judge_key: str | None, openai_key: str | None) -> str:
    """The key to send: FLYWHEEL_JUDGE_API_KEY anywhere; OPENAI_API_KEY only to OpenAI's own API."""
    if judge_key:
        return judge_key
    if is_openai(base_url):
        if openai_key:
            return openai_key
        raise JudgeConfigError("no API key for the OpenAI API: set FLYWHEEL_JUDGE_API_KEY (or OPENAI_API_KEY)")
    return "no-key"  # a local server that asks for none; OPENAI_API_KEY is never sent elsewhere


def price_for(model: str) -> tuple[float, float]:
    """OpenAI's (prompt, completion) USD per million tokens for a model name."""
    matches = [name for name in PRICES_PER_MTOK if model == name or model.startswith(name + "-")]
    return PRICES_PER_MTOK[max(matches, key=len)] if matches else DEFAULT_PRICE_PER_MTOK


def prices(model: str, base_url: str | None, prompt: float | None, completion: float | None) -> tuple[float, float]:
    """Prices set by the user win; else OpenAI's list price on OpenAI's API and zero elsewhere."""
    if prompt is not None or completion is not None:
        p = prompt if prompt is not None else completion
        return float(p), float(completion if completion is not None else p)
    return price_for(model) if is_openai(base_url) else (0.0, 0.0)


def is_reasoning_model(model: str) -> bool:
    name = model.rsplit("/", 1)[-1].lower()
    return any(name == p or name.startswith(p + "-") for p in REASONING_PREFIXES)


@dataclass(frozen=True)
class Cause:
    """kind: response_format, temperature, max_completion_tokens, max_tokens, context_length,
    content_filter, quota, auth, model, rate_limit, rate_limit_long, transient, invalid_request."""

    kind: str
    message: str
    status: int | None = None
    retry_after_s: float | None = None
    limit_tokens: int | None = None
    prompt_tokens: int | None = None

    @property
    def fatal(self) -> bool:
        return self.kind in ("quota", "auth", "model", "rate_limit_long")


def _text_of(body, fallback: str) -> str:
    if isinstance(body, (dict, list)):
        return json.dumps(body)
    return str(body) if body not in (None, "") else fallback


_CONTEXT = re.compile(r"context_length_exceeded|maximum context length|context size|exceed_context_size|context window|"
                      r"contextwindowexceeded|`inputs` tokens \+ `max_new_tokens`|must have less than \d+ tokens|"
                      r"input is too long|prompt is too long|too many tokens|input length exceeds")
_FORMAT = re.compile(r"response_format|json_schema|json_object|guided_json|structured output|grammar")
_FILTER = re.compile(r"content_filter|contentpolicyviolation|responsibleaipolicyviolation|content management policy")
_QUOTA = re.compile(r"insufficient_quota|exceeded your current quota|budget_exceeded|budget has been exceeded|billing")
_MODEL = re.compile(r"model_not_found|does not exist|not found, try pulling|no such model|unknown model|invalid model")
_UNSUPPORTED = r"(?:unsupported|not supported|does not support|doesn't support|unrecognized|unknown|extra inputs|not permitted|only the default)"


def _numbers(text: str) -> tuple[int | None, int | None]:
    """(context limit, prompt tokens) from a context-length message, where it says them."""
    limit = re.search(r"maximum context length is (\d+)|must be <= (\d+)|less than (\d+) tokens|context size \((\d+)|\"n_ctx\": ?(\d+)", text)
    used = re.search(r"resulted in (\d+)|\((\d+) in the messages|given: (\d+) `inputs`|request \((\d+) tokens\)|"
                     r"\"n_prompt_tokens\": ?(\d+)|you requested (\d+)", text)
    first = lambda m: int(next(g for g in m.groups() if g)) if m else None  # noqa: E731
    return first(limit), first(used)


def classify_status(status: int | None, body, message: str, headers=None, max_wait_s: float = 120.0) -> Cause:
    """The cause of an error answer from its status, body (JSON or text) and headers."""
    text = (_text_of(body, message) + " " + (message or "")).lower()
    if _QUOTA.search(text):
        return Cause("quota", message, status)
    if status == 429 or "rate limit" in text:
        wait = retry_after(headers)
        if wait is not None and wait > max_wait_s:
            return Cause("rate_limit_long", message, status, retry_after_s=wait)
        return Cause("rate_limit", message, status, retry_after_s=wait)
    if status in (401, 403) or "invalid_api_key" in text or "incorrect api key" in text:
        return Cause("auth", message, status)
    if status == 404 or _MODEL.search(text):
        return Cause("model", message, status)
    if status is not None and status >= 500:
        return Cause("transient", message, status)
    if _FILTER.search(text):
        return Cause("content_filter", message, status)
    if _CONTEXT.search(text):
        limit, used = _numbers(text)
        return Cause("context_length", message, status, limit_tokens=limit, prompt_tokens=used)
    for param in ("max_completion_tokens", "max_tokens", "temperature"):
        if re.search(rf"{_UNSUPPORTED}[^.]{{0,80}}{param}|'?{param}'?[^.]{{0,60}}{_UNSUPPORTED}", text) or \
                f'"param": "{param}"' in text:
            return Cause(param, message, status)
    if _FORMAT.search(text):
        return Cause("response_format", message, status)
    return Cause("invalid_request", message, status)


def classify(exc, max_wait_s: float = 120.0) -> Cause:
    """The cause of an exception the openai client raised."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return Cause("transient", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        raw = ""
        try:
            raw = exc.response.text
        except Exception:  # a streamed or closed body
            pass
        return classify_status(exc.status_code, exc.body if exc.body is not None else raw, f"{exc.message} {raw}",
                               exc.response.headers, max_wait_s)
    return Cause("transient", f"{type(exc).__name__}: {exc}")


def retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (a number; HTTP dates count as unknown)."""
    if not headers:
        return None
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        return None
    return None


class NoRetryTransport(httpx2.HTTPTransport):
    """Marks answers that no retry can fix (exhausted quota or budget) with ``x-should-retry: false``,
    which the openai client obeys; every other status keeps the client's own retry policy."""

    def handle_request(self, request):
        response = super().handle_request(request)
        if response.status_code in (400, 402, 403, 429):
            response.read()
            if _QUOTA.search(response.text.lower()):
                response.headers["x-should-retry"] = "false"
        return response
