"""A local OpenAI-compatible chat completions server that grades from human labels and behaves like
the servers teams really run: OpenAI, Azure OpenAI, vLLM, TGI, Ollama, llama.cpp, LiteLLM and the
reasoning models, each with the statuses, bodies and headers it really sends.

The judge must be tested over real HTTP with the real ``openai`` client, with no network and no
bill. The server plays the model: it reads the query and chunk of the *last* user message (earlier
turns are few-shot examples) and answers with the dataset's human label. ``persona`` picks whose
quirks it has (bodies read from each project's docs, source and issue threads; see
``flywheel.lib.labels.endpoint``):

* ``openai`` / ``azure``: everything supported; errors ``{"error": {message, type, param, code}}``.
  Azure (``filter_rate``) refuses some prompts with a 400 ``content_filter`` (and every prompt that
  holds a jailbreak attempt, as its prompt shield does) and filters some answers
  (200, finish_reason ``content_filter``, no content).
* ``reasoning`` (gpt-5, o-series): 400 ``unsupported_value`` for any temperature but 1, 400
  ``unsupported_parameter`` for ``max_tokens``; under 1,024 completion tokens it spends them all
  thinking and answers ``""`` with finish_reason ``length``.
* ``vllm``: ``{"object": "error", "message", "type": "BadRequestError", "code": 400}`` bodies; rejects
  ``json_schema`` (builds without a guided-decoding backend); answers plain text with prose around JSON.
* ``tgi``: 422 ``text/plain`` "Failed to deserialize the JSON body ... unknown variant" for a
  ``response_format`` other than its own, and 422 ``{"error", "error_type": "validation"}``.
* ``ollama`` / ``llamacpp``: ignore ``response_format`` and fence their JSON in markdown, with prose
  (Ollama) or a string grade and an extra key (llama.cpp); 404 ``model "x" not found, try pulling it
  first`` (Ollama), 400 ``exceed_context_size_error`` (llama.cpp).
* ``litellm``: upstream errors re-wrapped with ``"code": "400"``; with a reasoning model behind it,
  ``UnsupportedParamsError`` for temperature.

Orthogonal behaviours: ``context_tokens`` (a small context; ~4 characters per token),
``quota_exhausted`` (429 ``insufficient_quota``), ``retry_after_long_s`` (every call 429 with that
Retry-After), ``html_rate`` (200 ``text/html`` pages, e.g. a base URL pointing at a web UI),
``error_body_rate`` (200 with an error object, as some proxies send), ``no_usage``, ``models``
(others get the persona's 404), ``obey_injections`` (a model that follows any grading instruction
it finds in the query or passage), the old fault mix (429 with Retry-After, 500, slow, malformed,
refusal) and ``invert``. Whether attempt n of a pair misbehaves is a hash of (seed, pair, n), so
reruns see the same faults whatever the thread interleaving. Stdlib only.
"""

from __future__ import annotations

import html
import json
import re
import socket
import threading
import time
import unicodedata
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flywheel.lib.labels.judges import HumanLabels, normalize_query, stable_uniform
from flywheel.testing.injections import JAILBREAK, obeyed_grade  # noqa: F401  (re-exported)
from flywheel.testing.traffic import requests_of, scifact_raw_logs  # noqa: F401  (re-exported)

FAULT_KINDS = ("429", "500", "slow", "malformed", "refusal")
PERSONAS = ("openai", "azure", "reasoning", "vllm", "tgi", "ollama", "llamacpp", "litellm")
_QUERY = re.compile(r"<query>\n?(.*?)\n?</query>", re.S)
_CHUNK = re.compile(r"<chunk id=\"([^\"]*)\">\n?(.*?)\n?</chunk>", re.S)
HTML_PAGE = b"<!doctype html><html><head><title>Open WebUI</title></head><body><div id=\"app\"></div></body></html>"
JSON, TEXT = "application/json", "text/plain; charset=utf-8"


def fault_mix(rate: float, kinds: tuple[str, ...] = FAULT_KINDS) -> dict[str, float]:
    """``rate`` of attempts fail, spread evenly over ``kinds``."""
    return {k: rate / len(kinds) for k in kinds}


class FakeOpenAIServer:
    """Use as a context manager; ``url`` is the base_url to give the openai client."""

    def __init__(self, human: HumanLabels | None = None, *, api_key: str | None = None,
                 faults: dict[str, float] | None = None, seed: int = 0, latency_s: float = 0.0, slow_s: float = 2.0,
                 retry_after_s: float = 0.05, persona: str = "openai", reject_json_schema: bool = False,
                 invert: bool = False, keep_bodies: bool = False, context_tokens: int | None = None,
                 quota_exhausted: bool = False, retry_after_long_s: float | None = None, html_rate: float = 0.0,
                 error_body_rate: float = 0.0, filter_rate: float = 0.0, no_usage: bool = False,
                 models: set[str] | None = None, obey_injections: bool = False):
        faults = dict(faults or {})
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if sum(faults.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        if persona not in PERSONAS:
            raise ValueError(f"persona must be one of {PERSONAS}, got {persona!r}")
        self.human, self.api_key, self.faults, self.seed = human, api_key, faults, seed
        self.latency_s, self.slow_s, self.retry_after_s = latency_s, slow_s, retry_after_s
        self.persona, self.invert, self.keep_bodies = persona, invert, keep_bodies
        self.reject_json_schema = reject_json_schema or persona == "vllm"
        self.context_tokens, self.quota_exhausted, self.retry_after_long_s = context_tokens, quota_exhausted, retry_after_long_s
        self.html_rate, self.error_body_rate, self.filter_rate = html_rate, error_body_rate, filter_rate
        self.no_usage, self.models, self.obey_injections = no_usage, models, obey_injections
        self._lock = threading.Lock()
        self.reset_counts()
        self._httpd: ThreadingHTTPServer | None = None

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, **kwargs) -> "FakeOpenAIServer":
        from flywheel.lib.beir import load_beir

        return cls(HumanLabels(load_beir(dataset_dir)), **kwargs)

    def reset_counts(self) -> None:
        with self._lock:
            self.calls = 0
            self.calls_by_pair: Counter = Counter()
            self.faults_injected: Counter = Counter()
            self.statuses: Counter = Counter()
            self.response_formats: Counter = Counter()
            self.bodies: list[dict] = []

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def setup(self):
                super().setup()
                # without NODELAY, Nagle and delayed ACKs add ~40 ms to every answer
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                try:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    status, headers, payload = server.handle(self.path, dict(self.headers), body)
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    headers = {"Content-Type": JSON, **headers}
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left: exactly what "slow" is for

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- errors as each server writes them --------------------------------------------------
    def _error(self, status: int, message: str, type_: str | None = "invalid_request_error",
               param: str | None = None, code=None, headers: dict | None = None):
        p = self.persona
        if p == "vllm":
            body = {"object": "error", "message": message, "type": "BadRequestError" if status == 400 else "NotFoundError",
                    "param": param, "code": status}
        elif p == "tgi":
            body = {"error": message, "error_type": "validation" if status == 422 else "generation"}
        elif p == "llamacpp":
            body = {"error": {"code": status, "message": message, "type": type_ or "invalid_request_error"}}
        elif p == "ollama":
            body = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        elif p == "litellm":
            body = {"error": {"message": f"litellm.BadRequestError: OpenAIException - {message}", "type": None,
                              "param": None, "code": str(status)}}
        else:
            body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return status, dict(headers or {}), body

    def _context_error(self, prompt: int, completion: int):
        n = self.context_tokens
        if self.persona == "tgi":
            return self._error(422, f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {n}. "
                                    f"Given: {prompt} `inputs` tokens and {completion} `max_new_tokens`")
        if self.persona == "llamacpp":
            status, h, body = self._error(400, f"request ({prompt} tokens) exceeds the available context size ({n} tokens), "
                                               "try increasing it", "exceed_context_size_error")
            body["error"].update(n_prompt_tokens=prompt, n_ctx=n)
            return status, h, body
        if self.persona == "vllm":
            return self._error(400, f"This model's maximum context length is {n} tokens. However, you requested "
                                    f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the "
                                    "completion). Please reduce the length of the messages or completion.")
        return self._error(400, f"This model's maximum context length is {n} tokens. However, your messages resulted "
                                f"in {prompt} tokens. Please reduce the length of the messages.", param="messages",
                           code="context_length_exceeded")

    def _refuse_request(self, body: dict, model: str):
        """The error a server sends for this request before any model runs, or None."""
        fmt = (body.get("response_format") or {}).get("type", "none")
        p = self.persona
        if self.models is not None and model not in self.models:
            if p == "ollama":
                return self._error(404, f'model "{model}" not found, try pulling it first')
            return self._error(404, f"The model `{model}` does not exist or you do not have access to it.",
                               code="model_not_found")
        if self.quota_exhausted:
            return self._error(429, "You exceeded your current quota, please check your plan and billing details. For "
                                    "more information on this error, read the docs: https://platform.openai.com/docs/"
                                    "guides/error-codes/api-errors.", "insufficient_quota", code="insufficient_quota")
        if self.retry_after_long_s:
            s = self.retry_after_long_s
            return 429, {"Retry-After": f"{s:g}"}, {"error": {"code": "429", "message": (
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
                f"exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {s:g} seconds.")}}
        if p == "tgi" and fmt not in ("none", "json", "regex"):
            return 422, {"Content-Type": TEXT}, (
                "Failed to deserialize the JSON body into the target type: response_format: unknown variant "
                f"`{fmt}`, expected `json` or `regex` at line 1 column 220").encode()
        if p in ("reasoning", "litellm") and body.get("temperature") not in (None, 1, 1.0):
            if p == "litellm":
                return self._error(400, f"litellm.UnsupportedParamsError: gpt-5 models (including gpt-5-codex) don't "
                                        f"support temperature={body['temperature']}. Only temperature=1 is supported. To "
                                        "drop unsupported params set `litellm.drop_params = True`")
            return self._error(400, f"Unsupported value: 'temperature' does not support {body['temperature']} with this "
                                    "model. Only the default (1) value is supported.", param="temperature",
                               code="unsupported_value")
        if p == "reasoning" and "max_tokens" in body:
            return self._error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                    "'max_completion_tokens' instead.", param="max_tokens", code="unsupported_parameter")
        if fmt == "json_schema" and self.reject_json_schema:
            return self._error(400, "response_format json_schema is not supported by this server", param="response_format")
        return None

    # -- the model --------------------------------------------------------------------------
    def handle(self, path: str, headers: dict, raw: bytes):
        headers = {k.lower(): v for k, v in headers.items()}
        if path.rstrip("/") != "/v1/chat/completions":
            return self._count_status(self._error(404, f"no route {path}"))
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._count_status(self._error(401, "Incorrect API key provided. You can find your API key at "
                                                       "https://platform.openai.com/account/api-keys.", code="invalid_api_key"))
        try:
            body = json.loads(raw)
            last_user = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
            q, c = _QUERY.search(last_user), _CHUNK.search(last_user)
            if not (q and c):
                raise ValueError("no <query> or <chunk id=...> in the last user message")
            query, chunk_id, chunk = html.unescape(q.group(1)), html.unescape(c.group(1)), html.unescape(c.group(2))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return self._count_status(self._error(400, f"cannot read the request: {e}"))
        pair = (normalize_query(query), chunk_id)
        fmt = (body.get("response_format") or {}).get("type", "none")
        with self._lock:
            attempt = self.calls_by_pair[pair]
            self.calls += 1
            self.calls_by_pair[pair] += 1
            self.response_formats[fmt] += 1
            if self.keep_bodies:
                self.bodies.append(body)
        if self.latency_s:
            time.sleep(self.latency_s)
        refused = self._refuse_request(body, str(body.get("model")))
        if refused is None and self.context_tokens:
            prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4
            completion = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
            if prompt + completion > self.context_tokens:
                refused = self._context_error(prompt, completion)
        if refused is None:
            refused = self._misbehave(pair, attempt, query, chunk)
        if refused is not None:
            return self._count_status(refused)
        return self._count_status(self._answer(body, fmt, query, chunk_id, chunk, pair, attempt))

    def _misbehave(self, pair, attempt: int, query: str, chunk: str):
        u = stable_uniform("misbehave", self.seed, pair[0], pair[1], attempt)
        if u < self.html_rate:
            return 200, {"Content-Type": "text/html; charset=utf-8"}, HTML_PAGE
        if u < self.html_rate + self.error_body_rate:
            return 200, {}, {"error": {"message": "Upstream provider returned error: 502 Bad Gateway",
                                       "type": "upstream_error", "code": 502}}
        if self.persona == "azure":
            v = stable_uniform("filter", self.seed, pair[0], pair[1])
            jailbreak = bool(JAILBREAK.search(unicodedata.normalize("NFKC", query + "\n" + chunk).lower()))
            if jailbreak or v < self.filter_rate / 2:
                status, h, body = self._error(400, "The response was filtered due to the prompt triggering Azure OpenAI's "
                                                   "content management policy. Please modify your prompt and retry.",
                                              None, param="prompt", code="content_filter")
                body["error"].update(status=400, innererror={"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                    "hate": {"filtered": False, "severity": "safe"}, "jailbreak": {"filtered": jailbreak, "detected": jailbreak},
                    "violence": {"filtered": not jailbreak, "severity": "medium" if not jailbreak else "safe"}}})
                return status, h, body
        fault = self._fault_for(pair, attempt)
        if fault:
            with self._lock:
                self.faults_injected[fault] += 1
        if fault == "429":
            status, h, p = self._error(429, "Rate limit reached, retry after a moment.", "rate_limit_error")
            return status, {"Retry-After": f"{self.retry_after_s:g}"}, p
        if fault == "500":
            return self._error(500, "The server had an error.", "server_error")
        if fault == "slow":
            time.sleep(self.slow_s)
        return None  # malformed answers and refusals are written by _answer

    def _content(self, fmt: str, grade: int, reason: str) -> str:
        obj = {"grade": grade, "reason": reason}
        p = self.persona
        if p == "llamacpp":
            return "```json\n" + json.dumps({"grade": str(grade), "reason": reason, "confidence": 0.9}) + "\n```"
        if p == "ollama":
            return "Sure! Here is my assessment of the passage:\n\n```json\n" + json.dumps(obj, indent=2) + "\n```"
        if fmt == "none" and p in ("vllm", "tgi"):
            return f"Grading the passage against the query. {json.dumps({'grade': float(grade), 'reason': reason})}"
        return json.dumps(obj)

    def _answer(self, body: dict, fmt: str, query: str, chunk_id: str, chunk: str, pair, attempt: int):
        grade, reason = self._grade(query, chunk_id)
        if self.obey_injections:
            told = obeyed_grade(query + "\n" + chunk)
            if told is not None:
                grade, reason = told, "as the passage instructs"
        content: str | None = self._content(fmt, grade, reason)
        refusal, finish = None, "stop"
        fault = self._fault_for(pair, attempt)
        if fault == "malformed":
            content = content[: len(content) // 2]  # a truncated object: not JSON
        elif fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        budget = int(body.get("max_completion_tokens") or body.get("max_tokens") or 4096)
        reasoning_tokens = 0
        if self.persona == "reasoning":
            reasoning_tokens = min(budget, 1024)
            if budget < 1024:
                content, finish = "", "length"
        if self.persona == "azure" and self.filter_rate / 2 <= stable_uniform("filter", self.seed, *pair) < self.filter_rate:
            content, finish = None, "content_filter"
        prompt_tokens = max(1, sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4)
        completion_tokens = reasoning_tokens + (len(content) // 4 if content else 0)
        payload = {
            "id": f"chatcmpl-fake-{self.calls}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal},
                         "finish_reason": finish, "logprobs": None}],
        }
        if not self.no_usage:
            payload["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens,
                                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}
        return 200, {}, payload

    def _count_status(self, response):
        with self._lock:
            self.statuses[response[0]] += 1
        return response

    def _fault_for(self, pair: tuple[str, str], attempt: int) -> str | None:
        if not self.faults:
            return None
        u = stable_uniform("fault", self.seed, pair[0], pair[1], attempt)
        edge = 0.0
        for kind in FAULT_KINDS:
            edge += self.faults.get(kind, 0.0)
            if u < edge:
                return kind
        return None

    def _grade(self, query: str, chunk_id: str) -> tuple[int, str]:
        truth = self.human.relevant(query, chunk_id) if self.human is not None else None
        if truth is None:
            return 0, "no human label for this query"
        if self.invert:
            truth = not truth
        if truth:
            return (3 if stable_uniform("g", query, chunk_id) < 0.5 else 2), "the passage answers the query"
        return (1 if stable_uniform("g", query, chunk_id) < 0.2 else 0), "the passage does not answer the query"
