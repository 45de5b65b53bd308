"""Benchmark the first stage and inference speed: BM25, hybrid, and the inference precisions.

On the dataset's test split (the bundled SciFact unless FLYWHEEL_DATASET names another BEIR
folder), no training needed:
1. Speed, on samples: the base embedder's corpus encode rate (passages/s at the encode sequence
   length, default 256) on ``--passages`` (500) passages drawn with a fixed seed, its query
   latency (encode one query + LanceDB search) on 50 test queries, and a cross-encoder's rerank
   latency for ``--depth`` (40) candidates on 20 test queries, at each precision side by side.
   Without ``--reranker`` the cross-encoder is the base MiniLM with a fresh scoring head: the
   same network as the flywheel's reranker, so the same cost (its scores mean nothing).
   Precisions: PyTorch fp32, bf16 and int8 (dynamic quantization), and the same network compiled
   on OpenVINO at bf16 and int8 (NNCF post-training quantization, calibrated on the generic
   texts of ``flywheel.lib.registry.openvino_backend``); see ``flywheel.lib.registry.inference``.
   Queries run at ``FLYWHEEL_QUERY_PRECISION`` resolved against each (auto: openvino-bf16 beside an
   openvino-int8 corpus, else the same). Also the focused reranker's passage selection alone
   (``FLYWHEEL_RERANKER_PASSAGES=focused``) on the same 20 queries' candidates, seen for the first
   time and again with their sentences kept (``focused_selection_ms_p50_first_seen`` / ``_kept``).
2. Quality, on the whole test split: the base embedder at each precision (each encodes the full
   corpus once into a LanceDB table of its own; tables are reused by later runs; where its queries
   run at another precision, also with queries at the corpus's: ``ndcg10_base_P_queries_P``), BM25 (LanceDB's
   full-text index), and hybrids: z-score fusion at weight 0.5, RRF, and z-score at the weight
   chosen on up to 300 *train*-split queries (the test split never picks anything).
   With ``--reranker PATH`` (a trained CrossEncoder folder), also the reranker over the hybrid.

Corpus tables go to ``<FLYWHEEL_HOME>/lancedb`` (default ./.flywheel). Encoding SciFact's 5,183
passages takes minutes per precision on 2 cores the first time.

Prints figures as it goes; the last line is one JSON object (ndcg10_base, ndcg10_bm25,
ndcg10_hybrid, recall40_*, encode_passages_per_s[_fp32], rerank_ms_p50[_fp32], ...).
Usage: python benchmarks/retrieval.py [--part all|speed|quality] [--passages 500]
       [--precisions fp32,bf16,int8,openvino-bf16,openvino-int8]
       [--quality-precisions fp32,bf16,openvino-bf16,openvino-int8] [--reranker PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LANCEDB_LOG", "error")

from flywheel.config import load_config  # noqa: E402
from flywheel.lib.beir import load_beir  # noqa: E402
from flywheel.lib.evaluation import cost  # noqa: E402
from flywheel.lib.evaluation.benchmark import (  # noqa: E402
    HybridSpec, ModelSpec, RerankSpec, p50, p95, run_benchmark, test_split_suite,
)
from flywheel.lib.evaluation.metrics import evaluate_rankings, summarize  # noqa: E402
from flywheel.lib.quiet import quiet_libraries  # noqa: E402
from flywheel.lib.registry import hybrid, index  # noqa: E402
from flywheel.lib.registry.inference import PRECISIONS, resolve_precision, resolve_query_precision  # noqa: E402

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def speed(ds, uri, base: str, reranker: str, precisions, args, cfg) -> tuple[list[cost.ModelCost], dict]:
    """Encode rate, query latency and rerank latency at each precision, on fixed samples; and the
    focused passage selection's own time (``focused_selection_ms``)."""
    rng = random.Random(0)
    passages = rng.sample(list(ds.corpus.texts), min(args.passages, len(ds.corpus)))
    test_q = list(test_split_suite(ds)[0].values())
    bm25 = hybrid.ensure_bm25_table(uri, ds.corpus, progress=say)
    rerank_q = test_q[:20]
    texts = ds.corpus.text_by_id
    candidates = {q: [texts[d] for d, _ in hits]
                  for q, hits in zip(rerank_q, hybrid.bm25_search(uri, bm25, rerank_q, args.depth))}
    say(f"speed: {len(passages)} sampled passages (seq {cfg.training.encode_max_seq_length}), "
        f"{min(50, len(test_q))} queries, rerank {len(candidates)} queries x {args.depth} candidates "
        f"(seq {cfg.reranker.max_length}); precisions {', '.join(precisions)}")
    first, kept = focused_selection_ms(candidates, reranker, cfg.reranker.max_length)
    say(f"focused passage selection (FLYWHEEL_RERANKER_PASSAGES=focused) alone: p50 {first:.1f} ms a query "
        f"with its {args.depth} candidates seen for the first time, {kept:.1f} ms with their sentences kept")
    selection = {"focused_selection_ms_p50_first_seen": round(first, 1),
                 "focused_selection_ms_p50_kept": round(kept, 1)}
    return cost.precision_costs(
        base, passages, test_q[:50], reranker_path=reranker, candidates=candidates, precisions=precisions,
        max_seq_length=cfg.training.encode_max_seq_length, rerank_max_length=cfg.reranker.max_length,
        rerank_passages=cfg.reranker.passages,
        batch_size=cfg.training.encode_batch_size, query_precision=cfg.training.query_precision, progress=say,
    ), selection


def focused_selection_ms(candidates: dict[str, list[str]], model_path: str, max_length: int) -> tuple[float, float]:
    """p50 ms per query of the focused reranker's passage selection alone (``focused_passages``,
    ``FLYWHEEL_RERANKER_PASSAGES=focused``) over the rerank sample: every candidate seen for the
    first time, then again with each chunk's sentences and token counts kept."""
    from transformers import AutoTokenizer

    from flywheel.lib.training import reranker

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    reranker.forget_sentences()
    out = []
    for _ in range(2):
        ms = []
        for query, texts in candidates.items():
            started = time.perf_counter()
            reranker.focused_passages(query, texts, tokenizer, max_length)
            ms.append((time.perf_counter() - started) * 1000)
        out.append(p50(ms))
    return out[0], out[1]


def calibration_suite(ds, n: int = 300):
    """Up to ``n`` train-split queries with their human labels: what picks the hybrid's weight."""
    qrels = {q: {d for d, s in docs.items() if s > 0} for q, docs in ds.qrels.get("train", {}).items()}
    picked = sorted(q for q in qrels if q in ds.queries and qrels[q])[:n]
    return {q: ds.queries[q] for q in picked}, {q: qrels[q] for q in picked}


def hits_of(bench, name: str, suite: str) -> dict:
    return {q: list(zip(ids, bench.scores[name][suite][q])) for q, ids in bench.rankings[name][suite].items()}


def quality(ds, uri, base: str, precisions, args, cfg) -> dict:
    """NDCG@10 / Recall@40 of the base at each precision, BM25 and hybrids on the test split."""
    suites = {"test": test_split_suite(ds), "calibration": calibration_suite(ds)}
    models = [ModelSpec(f"base-{p}", base, precision=p, query_precision=cfg.training.query_precision) for p in precisions]
    # where the setting runs queries at another precision than the corpus: the same model with both alike
    models += [ModelSpec(f"base-{p}-queries-{p}", base, precision=p, query_precision=p) for p in precisions
               if resolve_query_precision(cfg.training.query_precision, p, "cpu") != p]
    hybrids = [HybridSpec("bm25")] + [HybridSpec(f"hybrid-{p}", on=f"base-{p}") for p in precisions]
    hybrids.append(HybridSpec("hybrid-rrf", on="base-fp32", fusion="rrf"))
    rerankers = []
    if args.reranker:
        rerankers = [RerankSpec(f"hybrid+reranker-{p}", args.reranker, on=f"hybrid-{p}", depth=args.depth,
                                max_length=cfg.reranker.max_length, fusion=cfg.reranker.fusion,
                                fusion_weight=cfg.reranker.fusion_weight, precision=p,
                                passages=cfg.reranker.passages) for p in precisions]
    bench = run_benchmark(models, ds, suites, uri, hybrids=hybrids, rerankers=rerankers,
                          max_seq_length=cfg.training.encode_max_seq_length,
                          batch_size=cfg.training.encode_batch_size, device="cpu", progress=say)
    weight, tried = hybrid.calibrate_weight(hits_of(bench, "base-fp32", "calibration"),
                                            hits_of(bench, "bm25", "calibration"), suites["calibration"][1])
    say("hybrid weight on train queries: " + ", ".join(f"{w:.1f}: {v:.4f}" for w, v in tried.items())
        + f" -> {weight}")
    fused = hybrid.fuse_all(hits_of(bench, "base-fp32", "test"), hits_of(bench, "bm25", "test"), bm25_weight=weight)
    calibrated = summarize(evaluate_rankings({q: [d for d, _ in h] for q, h in fused.items()}, suites["test"][1]))
    results = {name: bench.summary("test", name) for name in bench.summaries["test"]}
    results["hybrid-calibrated"] = calibrated
    for name, r in results.items():
        ms = bench.latency_ms.get(name, [])
        lat = f", p50 {p50(ms):.1f} ms, p95 {p95(ms):.1f} ms per query" if ms else ""
        say(f"test {name}: NDCG@10 {r['ndcg@10']:.4f}, Recall@10 {r['recall@10']:.4f}, "
            f"Recall@40 {r['recall@40']:.4f}{lat}")
    return {"results": results, "weight": weight, "latency": bench.latency_ms, "queries": results["bm25"]["queries"]}


def quality_figures(q: dict, chosen: str, judged) -> dict:
    res, out = q["results"], {}
    out["ndcg10_base"] = round(res["base-fp32"]["ndcg@10"], 4)
    out["ndcg10_bm25"] = round(res["bm25"]["ndcg@10"], 4)
    out["ndcg10_hybrid"] = round(res[f"hybrid-{chosen}"]["ndcg@10"], 4)
    out["recall40_base"] = round(res["base-fp32"]["recall@40"], 4)
    out["recall40_bm25"] = round(res["bm25"]["recall@40"], 4)
    out["recall40_hybrid"] = round(res[f"hybrid-{chosen}"]["recall@40"], 4)
    out["ndcg10_hybrid_rrf"] = round(res["hybrid-rrf"]["ndcg@10"], 4)
    out["ndcg10_hybrid_calibrated"] = round(res["hybrid-calibrated"]["ndcg@10"], 4)
    out["hybrid_weight_calibrated"] = q["weight"]
    for p in judged:
        out[f"ndcg10_base_{p}"] = round(res[f"base-{p}"]["ndcg@10"], 4)
        out[f"ndcg10_hybrid_{p}"] = round(res[f"hybrid-{p}"]["ndcg@10"], 4)
        if f"base-{p}-queries-{p}" in res:
            out[f"ndcg10_base_{p}_queries_{p}"] = round(res[f"base-{p}-queries-{p}"]["ndcg@10"], 4)
        if f"hybrid+reranker-{p}" in res:
            out[f"ndcg10_full_{p}"] = round(res[f"hybrid+reranker-{p}"]["ndcg@10"], 4)
    if f"ndcg10_full_{chosen}" in out:
        out["ndcg10_full"] = out[f"ndcg10_full_{chosen}"]
    out["bm25_ms_p50"] = round(p50(q["latency"]["bm25"]), 1)
    out["hybrid_ms_p50"] = round(p50(q["latency"][f"hybrid-{chosen}"]), 1)
    out["test_queries"] = q["queries"]
    return out


def speed_figures(costs: list[cost.ModelCost], chosen: str, chosen_rr: str, precisions) -> dict:
    by, out = {(c.name, c.precision): c for c in costs}, {}
    for p in precisions:
        e, r = by[("embedder", p)], by[("reranker", p)]
        out[f"encode_passages_per_s_{p}"] = round(e.passages_per_s, 1)
        out[f"query_ms_p50_{p}"] = round(e.query_ms_p50, 1)
        out[f"query_ms_p95_{p}"] = round(e.query_ms_p95, 1)
        out[f"rerank_ms_p50_{p}"] = round(r.query_ms_p50, 1)
        out[f"rerank_ms_p95_{p}"] = round(r.query_ms_p95, 1)
        out[f"embedder_weights_mb_{p}"] = round(e.weights_mb, 1)
    out["encode_passages_per_s"] = out[f"encode_passages_per_s_{chosen}"]
    out["rerank_ms_p50"] = out[f"rerank_ms_p50_{chosen_rr}"]
    out["passages_timed"] = by[("embedder", chosen)].passages_timed
    out["size_on_disk_mb"] = round(costs[0].size_on_disk_mb, 1)
    return out


def precision_list(text: str) -> list[str]:
    """A comma-separated list of inference precisions, each one this project knows."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(names))


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=500, help="passages timed for the encode rate")
    ap.add_argument("--depth", type=int, default=40, help="candidates per query the reranker scores")
    ap.add_argument("--precisions", type=precision_list, default="fp32,bf16,int8,openvino-bf16,openvino-int8",
                    help="timed side by side; fp32 is always included")
    ap.add_argument("--quality-precisions", type=precision_list, default="fp32,bf16,openvino-bf16,openvino-int8",
                    help="evaluated on the whole test split (each encodes the corpus once); fp32 is always included")
    ap.add_argument("--reranker", default="", help="a trained CrossEncoder folder (quality over the hybrid)")
    ap.add_argument("--part", choices=("all", "speed", "quality"), default="all", help="run only one half")
    args = ap.parse_args()
    quiet_libraries()  # no progress bars or load reports (a fresh scoring head is expected here)
    index.set_torch_threads()
    cfg = load_config()
    precisions = ["fp32"] + [p for p in args.precisions if p != "fp32"]
    chosen = resolve_precision(cfg.training.inference_precision, "cpu")
    chosen_rr = resolve_precision(cfg.reranker.inference_precision, "cpu")
    for p in sorted({chosen, chosen_rr} - set(precisions)):
        precisions.append(p)
    judged = ["fp32"] + [p for p in args.quality_precisions if p != "fp32"]
    for p in sorted({chosen} - set(judged)):
        judged.append(p)
    ds = load_beir(cfg.paths.dataset)
    uri = cfg.paths.home / "lancedb"
    say(f"dataset {ds.root} ({len(ds.corpus)} passages); base {cfg.paths.base_model}; serving precision "
        f"{chosen} (encoding), {chosen_rr} (reranking)")
    out: dict = {}
    if args.part in ("all", "speed"):
        load = os.getloadavg()[0]
        costs, selection = speed(ds, uri, cfg.paths.base_model, args.reranker or cfg.paths.base_model, precisions, args, cfg)
        load = max(load, os.getloadavg()[0])
        say(f"cost side by side (1-minute load average up to {load:.1f} on {os.cpu_count()} cores while timing):\n"
            + cost.cost_table_markdown(costs))
        out.update(speed_figures(costs, chosen, chosen_rr, precisions), **selection,
                   load_average_while_timing=round(load, 1))
    if args.part in ("all", "quality"):
        out.update(quality_figures(quality(ds, uri, cfg.paths.base_model, judged, args, cfg), chosen, judged))
    out.update(precision=chosen, reranker_precision=chosen_rr, total_seconds=round(time.monotonic() - T0, 1))
    return out


if __name__ == "__main__":
    result = main()
    print(json.dumps(result), flush=True)
    sys.exit(0)
