"""A local OpenAI-compatible chat completions server that grades from human labels and misbehaves on cue.

The judge must be tested over real HTTP with the real ``openai`` client (retries, timeouts,
Retry-After, structured-output negotiation), with no network and no bill. This server plays the
model: it reads the query and chunk id of the *last* user message (the pair to grade; earlier turns
are few-shot examples), answers with the dataset's human label, and can be told to fail:

* ``429`` with ``Retry-After`` (seconds, fractional allowed), ``500``, ``slow`` (answers after
  ``slow_s``, past the client's timeout), ``malformed`` (200 with broken JSON), ``refusal``
  (200 with a refusal and no content);
* deterministically: whether attempt n of a pair fails, and how, is a hash of (seed, pair, n),
  so a rerun injects the same faults whatever the thread interleaving;
* ``reject_json_schema`` answers 400 to ``response_format: json_schema`` (servers without
  structured outputs), ``invert`` answers the opposite of the human label (a judge to distrust),
  ``latency_s`` adds a delay to every answer.

It counts everything (calls, calls per pair, faults by kind, status codes) for tests and
``benchmarks/judge.py``. Stdlib only: ``ThreadingHTTPServer`` on 127.0.0.1, port 0, in a thread.
"""

from __future__ import annotations

import html
import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from flywheel.lib.labels.judges import HumanLabels, normalize_query, stable_uniform

FAULT_KINDS = ("429", "500", "slow", "malformed", "refusal")
_QUERY = re.compile(r"<query>\n?(.*?)\n?</query>", re.S)
_CHUNK = re.compile(r"<chunk id=\"([^\"]*)\">")


def fault_mix(rate: float, kinds: tuple[str, ...] = FAULT_KINDS) -> dict[str, float]:
    """``rate`` of attempts fail, spread evenly over ``kinds``."""
    return {k: rate / len(kinds) for k in kinds}


class FakeOpenAIServer:
    """Use as a context manager; ``url`` is the base_url to give the openai client."""

    def __init__(
        self,
        human: HumanLabels | None = None,
        *,
        api_key: str | None = None,
        faults: dict[str, float] | None = None,
        seed: int = 0,
        latency_s: float = 0.0,
        slow_s: float = 2.0,
        retry_after_s: float = 0.05,
        reject_json_schema: bool = False,
        invert: bool = False,
        keep_bodies: bool = False,
    ):
        faults = dict(faults or {})
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if sum(faults.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        self.human = human
        self.api_key = api_key
        self.faults = faults
        self.seed = seed
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.retry_after_s = retry_after_s
        self.reject_json_schema = reject_json_schema
        self.invert = invert
        self.keep_bodies = keep_bodies
        self._lock = threading.Lock()
        self.reset_counts()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_dataset(cls, dataset_dir: str | Path, **kwargs) -> "FakeOpenAIServer":
        from flywheel.lib.beir import load_beir

        return cls(HumanLabels(load_beir(dataset_dir)), **kwargs)

    # -- counters ---------------------------------------------------------------------------
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
                # headers and body go out in two writes: without NODELAY, Nagle's algorithm and the
                # client's delayed ACK add ~40 ms to every answer, which a benchmark would measure
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length)
                    status, headers, payload = server.handle(self.path, dict(self.headers), body)
                    data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left: exactly what "slow" is for

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
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

    # -- the model --------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, message: str, type_: str, param: str | None = None) -> tuple[int, dict, dict]:
        return status, {}, {"error": {"message": message, "type": type_, "param": param, "code": None}}

    def handle(self, path: str, headers: dict, raw: bytes) -> tuple[int, dict, dict | bytes]:
        headers = {k.lower(): v for k, v in headers.items()}
        if path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {path}", "invalid_request_error")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._count_status(self._error(401, "Incorrect API key provided.", "invalid_request_error"))
        try:
            body = json.loads(raw)
            last_user = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
            q, c = _QUERY.search(last_user), _CHUNK.search(last_user)
            if not (q and c):
                raise ValueError("no <query> or <chunk id=...> in the last user message")
            query, chunk_id = html.unescape(q.group(1)), html.unescape(c.group(1))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return self._count_status(self._error(400, f"cannot read the request: {e}", "invalid_request_error"))
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
        if fmt == "json_schema" and self.reject_json_schema:
            return self._count_status(self._error(
                400, "response_format json_schema is not supported by this server", "invalid_request_error",
                "response_format",
            ))
        fault = self._fault_for(pair, attempt)
        if fault:
            with self._lock:
                self.faults_injected[fault] += 1
        if fault == "429":
            status, h, p = self._error(429, "Rate limit reached, retry after a moment.", "rate_limit_error")
            return self._count_status((status, {"Retry-After": f"{self.retry_after_s:g}"}, p))
        if fault == "500":
            return self._count_status(self._error(500, "The server had an error.", "server_error"))
        if fault == "slow":
            time.sleep(self.slow_s)
        grade, reason = self._grade(query, chunk_id)
        content: str | None = json.dumps({"grade": grade, "reason": reason})
        refusal = None
        if fault == "malformed":
            content = content[: len(content) // 2]  # a truncated object: not JSON
        elif fault == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        prompt_chars = sum(len(str(m.get("content") or "")) for m in body["messages"])
        completion_tokens = 0 if content is None else max(1, len(content) // 4)
        payload = {
            "id": f"chatcmpl-fake-{self.calls}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": "stop",
                "logprobs": None,
            }],
            "usage": {
                "prompt_tokens": max(1, prompt_chars // 4),
                "completion_tokens": completion_tokens,
                "total_tokens": max(1, prompt_chars // 4) + completion_tokens,
            },
        }
        return self._count_status((200, {}, payload))

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


# -- sample traffic for tests and benchmarks ----------------------------------------------------
def scifact_raw_logs(dataset, *, n_queries: int, distractors: int = 3, offset: int = 0, week: str = "2026-09-28"):
    """raw_logs rows for ``n_queries`` train queries: each retrieves its relevant chunks and
    ``distractors`` others (chosen by a stable hash), with no user feedback."""
    from datetime import datetime, timedelta

    import pandas as pd

    qrels = dataset.qrels["train"]
    qids = sorted(qrels, key=lambda q: stable_uniform("sample", q))[offset:offset + n_queries]
    text = dataset.corpus.text_by_id
    ids = dataset.corpus.ids
    start = datetime.fromisoformat(week)
    rows = []
    for n, qid in enumerate(qids):
        relevant = [c for c in qrels[qid] if c in text]
        others = [ids[int(stable_uniform("distractor", qid, i) * len(ids))] for i in range(distractors)]
        chunks = list(dict.fromkeys(relevant + [c for c in others if c not in relevant]))
        chunks.sort(key=lambda c: stable_uniform("order", qid, c))
        rows.append({
            "request_id": f"req-{week}-{n:05d}",
            "timestamp": start + timedelta(minutes=n),
            "query": dataset.queries[qid],
            "results": [
                {"chunk_id": c, "text": text[c], "score": 1.0 - 0.01 * r, "rank": r + 1}
                for r, c in enumerate(chunks)
            ],
            "clicks": [], "saves": [], "cited": [], "thumbs": None, "dwell_ms": None,
        })
    return pd.DataFrame(rows)


def requests_of(raw_logs) -> list:
    """The unique (query, chunk) JudgeRequests of raw_logs rows, in order."""
    from flywheel.lib.labels.judges import JudgeRequest

    seen, out = set(), []
    for rec in raw_logs.itertuples(index=False):
        for r in rec.results:
            key = (normalize_query(rec.query), r["chunk_id"])
            if key not in seen:
                seen.add(key)
                out.append(JudgeRequest(rec.query, r["chunk_id"], r["text"], int(r["rank"])))
    return out
