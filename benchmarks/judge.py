"""Benchmark the OpenAI-compatible judge against the local fake server (no network, no bill).

Why: labelling a week is I/O-bound; what matters is how close the bounded thread pool gets to the
ideal throughput (concurrency / latency), whether faults lose labels, and whether a resumed or
re-materialized run pays again. Measures, with a 50 ms simulated model latency:

* labels_per_s and efficiency (measured / ideal) at concurrency 1, 8 and 32 (no faults, no cache);
* labels_missing with 20% injected faults (429 with Retry-After, 500, timeouts, malformed JSON, refusals);
* repeated_calls_after_resume: a run stopped by its budget halfway, then rerun: calls for pairs already paid;
* calls_on_rematerialize: a third run over the same pairs: calls made (the cache should make it 0).

Prints figures as it goes; the last line is one JSON object. Runs in about a minute.
Usage: python benchmarks/judge.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from flywheel.lib.beir import load_beir
from flywheel.lib.labels.judges import HumanLabels, normalize_query
from flywheel.lib.labels.openai_judge import OpenAIJudge, OpenAIJudgeConfig
from flywheel.settings import REPO_ROOT
from flywheel.testing.fake_openai import FakeOpenAIServer, fault_mix, requests_of, scifact_raw_logs

LATENCY_S = 0.05
PAIRS_AT = {1: 60, 8: 400, 32: 1200}
FAULT_RATE = 0.2


def judge_for(server: FakeOpenAIServer, concurrency: int, cache: Path | None = None, **kw) -> OpenAIJudge:
    cfg = dict(model="fake-judge", base_url=server.url, api_key="sk-bench", concurrency=concurrency,
               timeout_s=1.0, max_retries=5, answer_retries=4, price_per_mtok=(0.15, 0.60),
               cache_path=str(cache) if cache else None)
    cfg.update(kw)
    return OpenAIJudge(OpenAIJudgeConfig(**cfg))


def main() -> dict:
    ds = load_beir(REPO_ROOT / "data" / "scifact")
    human = HumanLabels(ds)
    pool = requests_of(scifact_raw_logs(ds, n_queries=800, distractors=1))
    print(f"{len(pool)} unique (query, chunk) pairs from SciFact train, simulated latency {LATENCY_S * 1000:.0f} ms",
          flush=True)
    out: dict = {"latency_s": LATENCY_S, "labels_per_s": {}, "efficiency": {}, "pairs": {}}

    with FakeOpenAIServer(human, api_key="sk-bench", latency_s=LATENCY_S) as srv:
        for c, n in PAIRS_AT.items():
            reqs = pool[:n]
            srv.reset_counts()
            judge = judge_for(srv, c)
            t0 = time.perf_counter()
            res = judge.judge(reqs, progress=lambda _: None)
            dt = time.perf_counter() - t0
            assert all(j.grade is not None for j in res), "a label went missing without faults"
            rate = n / dt
            ideal = c / LATENCY_S
            out["labels_per_s"][str(c)] = round(rate, 1)
            out["efficiency"][str(c)] = round(rate / ideal, 3)
            out["pairs"][str(c)] = n
            print(f"concurrency {c:>2}: {n} labels in {dt:.2f}s = {rate:.1f}/s, ideal {ideal:.0f}/s, "
                  f"efficiency {rate / ideal:.2f}, server calls {srv.calls}", flush=True)

    reqs = pool[:300]
    with FakeOpenAIServer(human, api_key="sk-bench", latency_s=LATENCY_S, faults=fault_mix(FAULT_RATE),
                          slow_s=1.5, seed=1) as srv:
        judge = judge_for(srv, 16)
        t0 = time.perf_counter()
        res = judge.judge(reqs, progress=lambda _: None)
        dt = time.perf_counter() - t0
        missing = sum(j.grade is None for j in res)
        wrong = sum((j.grade >= 2) != human.relevant(r.query, r.chunk_id) for j, r in zip(res, reqs) if j.grade is not None)
        out.update(fault_rate=FAULT_RATE, labels_missing=missing, labels_wrong_under_faults=wrong,
                   faults_injected=dict(srv.faults_injected), fault_run_s=round(dt, 2))
        print(f"faults {FAULT_RATE:.0%}: {len(reqs)} pairs, {srv.calls} calls, injected {dict(srv.faults_injected)}, "
              f"missing {missing}, wrong {wrong}, {dt:.2f}s", flush=True)

    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(human, api_key="sk-bench", latency_s=LATENCY_S) as srv:
        cache = Path(tmp) / "cache.sqlite"
        first = judge_for(srv, 8, cache)
        per_call = None
        # a budget for about half the pairs: the run stops cleanly, as a crash would, halfway
        probe = judge_for(srv, 1)
        probe.judge(reqs[:5], progress=lambda _: None)
        per_call = probe.usage.cost_usd / 5
        srv.reset_counts()
        first = judge_for(srv, 8, cache, budget_usd=per_call * len(reqs) / 2)
        res1 = first.judge(reqs, progress=lambda _: None)
        paid = {(normalize_query(r.query), r.chunk_id) for r, j in zip(reqs, res1) if j.grade is not None}
        stopped = sum(j.reason == "budget exhausted" for j in res1)
        srv.reset_counts()
        second = judge_for(srv, 8, cache)
        res2 = second.judge(reqs, progress=lambda _: None)
        repeated = sum(srv.calls_by_pair[p] for p in paid)
        resume_calls = srv.calls
        srv.reset_counts()
        third = judge_for(srv, 8, cache)
        third.judge(reqs, progress=lambda _: None)
        out.update(
            resume_first_run_labelled=len(paid), resume_first_run_budget_stopped=stopped,
            resume_second_run_calls=resume_calls, repeated_calls_after_resume=repeated,
            labels_missing_after_resume=sum(j.grade is None for j in res2), calls_on_rematerialize=srv.calls,
            cost_first_run_usd=round(first.usage.cost_usd, 6),
        )
        print(f"resume: first run labelled {len(paid)}, {stopped} stopped by budget (${first.usage.cost_usd:.5f}); "
              f"rerun made {resume_calls} calls, {repeated} for pairs already paid; "
              f"re-materialize made {srv.calls} calls", flush=True)
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    result = main()
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    sys.exit(0)
