"""Benchmark the OpenAI-compatible judge against local fake servers (no network, no bill).

Why: labelling a week is I/O-bound, and the endpoints teams run (vLLM, TGI, Ollama, llama.cpp,
LiteLLM, Azure, reasoning models) each break a naive judge in their own way. Measures:

* labels_per_s at concurrency 1, 8 and 32 (50 ms simulated latency, no faults, no cache);
* scenarios: for each server behaviour of ``flywheel.testing.judge_scenarios`` (300 SciFact pairs),
  labelled / missing / calls, and whether the endpoint can answer at all. Goals: at most 1% missing
  and 1.2 calls per label where it can; a stop within a few calls where it cannot;
* faults_20pct: the old fault mix (429 with Retry-After, 500, timeouts, malformed JSON, refusals);
* injection_relevant_share: of the (query, chunk) pairs carrying a prompt injection, the share that
  ends up relevant in a fine-tuning or eval set, judged by a model that obeys any instruction it finds
  (goal: at most 2%); also the share of SciFact's corpus the detector flags (false positives);
* repeated_calls_after_resume: a run stopped by its budget halfway, then rerun: calls for pairs
  already paid; calls_on_rematerialize: a third run over the same pairs (the cache makes it 0).

Prints figures as it goes; the last line is one JSON object. About a minute on 2 cores.
Usage: python benchmarks/judge.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from flywheel.config import REPO_ROOT, JudgeSettings
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.tiers import build_eval_set, build_finetune_set
from flywheel.lib.labels.injection import scan
from flywheel.lib.labels.judges import HumanLabels, JudgeRequest, normalize_query
from flywheel.lib.labels.openai_judge import OpenAIJudge
from flywheel.lib.labels.weekly import label_week
from flywheel.testing.fake_openai import FakeOpenAIServer, fault_mix, obeyed_grade, requests_of, scifact_raw_logs
from flywheel.testing.injections import ATTACKS, QUERY_ATTACKS, inject
from flywheel.testing.judge_scenarios import SCENARIOS, run_scenario

LATENCY_S = 0.05
PAIRS_AT = {1: 60, 8: 400, 32: 1200}
SCENARIO_PAIRS = 300
WEEK = "2026-09-28"


def judge_for(url: str, concurrency: int, cache: Path | None = None, **settings) -> OpenAIJudge:
    s = JudgeSettings(model="fake-judge", base_url=url, concurrency=concurrency, timeout_s=1.0, max_retries=5,
                      answer_retries=4, price_prompt_per_mtok=0.15, price_completion_per_mtok=0.60, **settings)
    return OpenAIJudge(s, api_key="sk-bench", cache_path=str(cache) if cache else None)


def throughput(human, pool, out: dict) -> None:
    with FakeOpenAIServer(human, api_key="sk-bench", latency_s=LATENCY_S) as srv:
        for c, n in PAIRS_AT.items():
            srv.reset_counts()
            t0 = time.perf_counter()
            res = judge_for(srv.url, c).judge(pool[:n], progress=lambda _: None)
            dt = time.perf_counter() - t0
            assert all(j.grade is not None for j in res), "a label went missing without faults"
            out["labels_per_s"][str(c)] = round(n / dt, 1)
            out["efficiency"][str(c)] = round(n / dt / (c / LATENCY_S), 3)
            print(f"concurrency {c:>2}: {n} labels in {dt:.2f}s = {n / dt:.1f}/s, ideal {c / LATENCY_S:.0f}/s, "
                  f"server calls {srv.calls}", flush=True)


def scenarios(human, reqs, out: dict) -> None:
    for name in SCENARIOS:
        t0 = time.perf_counter()
        r = run_scenario(name, human, reqs)
        extra = r["judge"].usage.extra
        out["scenarios"][name] = {k: r[k] for k in ("labelled", "missing", "calls", "answerable")}
        out["scenarios"][name]["calls_per_label"] = round(r["calls"] / r["labelled"], 3) if r["labelled"] else None
        out["scenarios"][name]["stopped"] = bool(r["stopped"])
        why = f"stopped: {r['stopped'][:90]}" if r["stopped"] else f"missing by reason {extra.get('unlabelled_by_reason')}"
        print(f"{name:32s} labelled {r['labelled']:>3}/{len(reqs)}, {r['calls']:>3} calls "
              f"({out['scenarios'][name]['calls_per_label']} per label), {time.perf_counter() - t0:.1f}s; {why}", flush=True)


def faults_20pct(human, reqs, out: dict) -> None:
    with FakeOpenAIServer(human, api_key="sk-bench", latency_s=LATENCY_S, faults=fault_mix(0.2), slow_s=1.5, seed=1) as srv:
        res = judge_for(srv.url, 16).judge(reqs, progress=lambda _: None)
        missing = sum(j.grade is None for j in res)
        out["faults_20pct"] = {"missing": missing, "calls": srv.calls, "injected": dict(srv.faults_injected)}
        print(f"faults 20%: {len(reqs)} pairs, {srv.calls} calls, missing {missing}", flush=True)


def injection(ds, human, out: dict) -> None:
    raw = scifact_raw_logs(ds, n_queries=200, distractors=3, offset=300)
    raw.at[0, "query"] = f"{raw.at[0, 'query']} {QUERY_ATTACKS[0]}"
    attacked = {(normalize_query(raw.at[0, "query"]), r["chunk_id"]) for r in raw.at[0, "results"]}
    n = 0
    for i, rec in raw.iterrows():
        results = []
        for r in rec["results"]:
            if i and not human.relevant(rec["query"], r["chunk_id"]) and obeyed_grade(r["text"]) is None and n < 4 * len(ATTACKS):
                r = {**r, "text": inject(JudgeRequest(rec["query"], r["chunk_id"], r["text"], r["rank"]), ATTACKS[n % len(ATTACKS)], seed=n).chunk_text}
                attacked.add((normalize_query(rec["query"]), r["chunk_id"]))
                n += 1
            results.append(r)
        raw.at[i, "results"] = results
    with FakeOpenAIServer(human, obey_injections=True) as srv:
        labels, _ = label_week(raw, WEEK, judge_for(srv.url, 8), human=human, progress=lambda _: None)
    finetune, _ = build_finetune_set(labels, n_examples=5000, seed=0, exclude_queries=set())
    evals = build_eval_set(labels, n_queries=20, seed=0, seen_before=set())
    rel = set(zip(finetune["query_key"], finetune["positive_id"]))
    rel |= set(zip(evals.loc[evals["relevant"].astype(bool), "query_key"], evals.loc[evals["relevant"].astype(bool), "chunk_id"]))
    flagged = set(zip(labels.loc[labels["injection_flag"], "query_key"], labels.loc[labels["injection_flag"], "chunk_id"]))
    corpus_flagged = sum(bool(scan(t)) for t in ds.corpus.text_by_id.values())
    out.update(injection_relevant_share=round(len(rel & attacked) / len(attacked), 4), injection_pairs=len(attacked),
               injection_detected_share=round(len(flagged & attacked) / len(attacked), 4),
               injection_false_flags=len(flagged - attacked),
               injection_corpus_flagged_share=round(corpus_flagged / len(ds.corpus.ids), 5))
    print(f"injection: {len(attacked)} attacked pairs, {len(flagged & attacked)} flagged, {len(flagged - attacked)} "
          f"other pairs flagged, {len(rel & attacked)} relevant in fine-tune/eval sets; "
          f"{corpus_flagged}/{len(ds.corpus.ids)} SciFact passages flagged", flush=True)


def resume(human, reqs, out: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(human, api_key="sk-bench", latency_s=LATENCY_S) as srv:
        cache = Path(tmp) / "cache.sqlite"
        probe = judge_for(srv.url, 1)
        probe.judge(reqs[:5], progress=lambda _: None)
        per_call = probe.usage.cost_usd / 5
        srv.reset_counts()
        first = judge_for(srv.url, 8, cache, budget_usd=per_call * len(reqs) / 2)  # stops cleanly halfway
        res1 = first.judge(reqs, progress=lambda _: None)
        paid = {(normalize_query(r.query), r.chunk_id) for r, j in zip(reqs, res1) if j.grade is not None}
        srv.reset_counts()
        res2 = judge_for(srv.url, 8, cache).judge(reqs, progress=lambda _: None)
        repeated, resume_calls = sum(srv.calls_by_pair[p] for p in paid), srv.calls
        srv.reset_counts()
        judge_for(srv.url, 8, cache).judge(reqs, progress=lambda _: None)
        out.update(resume_first_run_labelled=len(paid), resume_second_run_calls=resume_calls,
                   repeated_calls_after_resume=repeated, labels_missing_after_resume=sum(j.grade is None for j in res2),
                   calls_on_rematerialize=srv.calls)
        print(f"resume: first run labelled {len(paid)} within its budget; rerun made {resume_calls} calls, {repeated} "
              f"for pairs already paid; re-materialize made {srv.calls} calls", flush=True)


def main() -> dict:
    ds = load_beir(REPO_ROOT / "data" / "scifact")
    human = HumanLabels(ds)
    pool = requests_of(scifact_raw_logs(ds, n_queries=800, distractors=1))
    reqs = pool[:SCENARIO_PAIRS]
    print(f"{len(pool)} unique (query, chunk) pairs from SciFact train", flush=True)
    out: dict = {"latency_s": LATENCY_S, "labels_per_s": {}, "efficiency": {}, "scenarios": {}}
    throughput(human, pool, out)
    scenarios(human, reqs, out)
    faults_20pct(human, reqs, out)
    injection(ds, human, out)
    resume(human, reqs, out)
    ok = [s for s in out["scenarios"].values() if s["answerable"]]
    out["worst_missing_share_answerable"] = round(max(s["missing"] / SCENARIO_PAIRS for s in ok), 4)
    out["worst_calls_per_label_answerable"] = max(s["calls_per_label"] for s in ok)
    out["max_calls_before_stop"] = max(s["calls"] for s in out["scenarios"].values() if not s["answerable"])
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    result = main()
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    sys.exit(0)
