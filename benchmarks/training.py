"""Benchmark the training stage: does the flywheel's recipe make retrieval measurably better?

The project's own code path, end to end on the bundled SciFact data:
simulated traffic + simulated-judge labels (every week written so far) -> finetune_set (2,000 rows,
eval-set and test-split queries and their near-duplicates held out) -> judged + mined hard
negatives -> fine-tune the bi-encoder -> fine-tune the cross-encoder -> evaluate on SciFact's test
split (300 queries, human labels): base vs embedder vs embedder + reranker (top 40), each first
stage searched as the pipeline searches it (serving precision, sentence units: ``FLYWHEEL_SENTENCE_UNITS``)
and, for base and embedder, also at fp32 with one vector per chunk (``ndcg10_*_chunks_fp32``).

It calls the same ``lib`` functions as the assets (``flywheel.lib.datasets.weekly`` for the
fine-tuning set, ``flywheel.lib.training.week`` for both models), so every decision (mining or
not, the loss, the forgetting guard) is the pipeline's own.

Labels: reuses ``$FLYWHEEL_HOME`` (default ./.flywheel) when it already holds relevance_labels
(e.g. after ``make demo``); otherwise simulates 8 weeks and labels them with the ``flywheel`` CLI
(``simulate``, ``run --job weekly_labels``) in a home of its own (``$FLYWHEEL_HOME/bench-training/home``). Models, mining
cache and report go to ``<home>/bench-training``; corpus embeddings go to ``<home>/lancedb``
(one table per model fingerprint, so the base table is reused).

Then the first stage with keyword search beside it (``first_stage_and_speed``): BM25 (LanceDB's
full-text index), the hybrid (embedder + BM25) and the full pipeline (hybrid + reranker), each at
the serving precision (``FLYWHEEL_ENCODE_PRECISION`` / ``FLYWHEEL_QUERY_PRECISION`` /
``FLYWHEEL_RERANKER_PRECISION``, auto: openvino-int8, its queries at openvino-bf16, where OpenVINO
is installed) and at fp32, side by side; where the queries run at another precision than the
corpus, the embedder also with its queries at the corpus's (``ndcg10_embedder_P_queries_P``); corpus
encode rate on 500 passages both ways. The fp32 rows search one vector per chunk (a fp32
sentence-unit table would be the run's longest embedding, at fp32's encode rate); the
serving-precision embedder is also shown that way (``ndcg10_embedder_P_chunks``), so the precisions compare like for like. The
embedder + reranker row ("reranked") runs at the serving precision.

Prints figures as it goes; the last line is one JSON object with ndcg10_/recall10_ for base,
embedder and reranked, ndcg10_bm25, ndcg10_hybrid, ndcg10_full, recall40_base/_embedder,
train_examples, train_seconds (bi-encoder trainer time), rerank_ms_p50 and rerank_ms_p50_fp32 (the
full pipeline's reranker at the serving precision and at fp32, timed side by side in one run;
rerank_ms_p50_over_embedder times the "reranked" row), encode_passages_per_s and _fp32, and more.
Usage: python benchmarks/training.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from flywheel.config import load_config  # noqa: E402
from flywheel.layout import RELEVANCE_LABELS, Layout  # noqa: E402
from flywheel.lib.beir import load_beir  # noqa: E402
from flywheel.lib.datasets.weekly import finetune_set_week, labels_to_date  # noqa: E402
from flywheel.lib.evaluation import cost  # noqa: E402
from flywheel.lib.evaluation.benchmark import (  # noqa: E402
    HybridSpec, ModelSpec, RerankSpec, p50, p95, run_benchmark, test_split_suite,
)
from flywheel.lib.registry.inference import resolve_precision, resolve_query_precision  # noqa: E402
from flywheel.lib.quiet import quiet_libraries  # noqa: E402
from flywheel.lib.training.week import train_reranker_week, train_week  # noqa: E402

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def ensure_labels(config):
    """A configuration whose home holds relevance_labels for every simulated week: the given one,
    or (when it has none) a home of its own, filled through the ``flywheel`` CLI a user would run."""
    if Layout.of(config.paths).weeks_written(RELEVANCE_LABELS):
        return config
    from flywheel.lib.simulate.traffic import week_starts

    home = config.paths.home / "bench-training" / "home"
    env = {**os.environ, "FLYWHEEL_HOME": str(home)}
    say(f"no labels under {config.paths.home}: simulating 8 weeks of traffic into {home} and labelling them")
    subprocess.run([sys.executable, "-m", "flywheel.cli", "simulate", "--weeks", "8"], env=env, check=True)
    for week in week_starts(config.tiers.start_date, 8):
        subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "--week", week.isoformat(), "--job",
                        "weekly_labels"], env=env, check=True)
        say(f"labelled week {week}")
    return load_config(env)


def first_stage_and_speed(config, ds, layout, embedder_dir, reranker_dir) -> dict:
    """BM25, the hybrid first stage (embedder + BM25, z-score fusion) and the full pipeline
    (hybrid + reranker), at the serving precision and at fp32 side by side on the test split;
    the embedder's corpus encode rate both ways on 500 passages drawn with a fixed seed."""
    tr, rr = config.training, config.reranker
    fast, rfast = resolve_precision(tr.inference_precision, "cpu"), resolve_precision(rr.inference_precision, "cpu")
    qfast = resolve_query_precision(tr.query_precision, fast, "cpu")
    units = tr.sentence_units
    models = [ModelSpec("embedder-fp32", str(embedder_dir))]  # fp32: one vector per chunk (see the module's doc)
    if fast != "fp32":
        models.append(ModelSpec(f"embedder-{fast}", str(embedder_dir), precision=fast, query_precision=qfast,
                                units=units))
        if units:  # the same precision with one vector per chunk, beside fp32's
            models.append(ModelSpec(f"embedder-{fast}-chunks", str(embedder_dir), precision=fast, query_precision=qfast))
    if qfast != fast:  # the serving embedder beside the same one with its queries at the corpus's precision
        models.append(ModelSpec(f"embedder-{fast}-queries-{fast}", str(embedder_dir), precision=fast,
                                query_precision=fast, units=units))
    hybrids = [HybridSpec("bm25"), HybridSpec("hybrid-fp32", on="embedder-fp32")]
    if fast != "fp32":
        hybrids.append(HybridSpec(f"hybrid-{fast}", on=f"embedder-{fast}"))
    kw = dict(depth=rr.depth, max_length=rr.max_length, fusion=rr.fusion, fusion_weight=rr.fusion_weight,
              passages=rr.passages)
    rerankers = [RerankSpec("full-fp32", str(reranker_dir), on="hybrid-fp32", precision="fp32", **kw)]
    if (fast, rfast) != ("fp32", "fp32"):
        rerankers.append(RerankSpec("full", str(reranker_dir), on=f"hybrid-{fast}", precision=rfast, **kw))
    say(f"first stage: BM25 and hybrid (embedder at {', '.join(m.name.removeprefix('embedder-') for m in models)}; serving queries at "
        f"{qfast}), reranker at "
        f"{', '.join(r.precision for r in rerankers)} on the hybrid's top {rr.depth}")
    suites = {"test": test_split_suite(ds)}
    bench = run_benchmark(models, ds, suites, layout.lancedb, hybrids=hybrids, rerankers=rerankers,
                          max_seq_length=tr.encode_max_seq_length, batch_size=tr.encode_batch_size, progress=say)
    res = {name: bench.summary("test", name) for name in bench.summaries["test"]}
    res.setdefault("full", res["full-fp32"])
    for name, m in res.items():
        ms = bench.latency_ms.get(name, [])
        say(f"test {name}: NDCG@10 {m['ndcg@10']:.4f}, Recall@40 {m['recall@40']:.4f}"
            + (f", p50 {p50(ms):.1f} ms per query" if ms else ""))
    sample = random.Random(0).sample(list(ds.corpus.texts), min(500, len(ds.corpus)))
    costs = {c.precision: c for c in cost.precision_costs(
        embedder_dir, sample, list(suites["test"][0].values())[:50], precisions=sorted({"fp32", fast}),
        max_seq_length=tr.encode_max_seq_length, batch_size=tr.encode_batch_size, query_precision=tr.query_precision,
        progress=say)}
    full_ms = bench.latency_ms.get("full", bench.latency_ms["full-fp32"])
    return {
        "ndcg10_bm25": round(res["bm25"]["ndcg@10"], 4),
        "recall40_bm25": round(res["bm25"]["recall@40"], 4),
        "ndcg10_hybrid": round(res[f"hybrid-{fast}"]["ndcg@10"], 4),
        "recall40_hybrid": round(res[f"hybrid-{fast}"]["recall@40"], 4),
        "ndcg10_hybrid_fp32": round(res["hybrid-fp32"]["ndcg@10"], 4),
        "ndcg10_full": round(res["full"]["ndcg@10"], 4),
        "ndcg10_full_fp32": round(res["full-fp32"]["ndcg@10"], 4),
        f"ndcg10_embedder_{fast}": round(res[f"embedder-{fast}"]["ndcg@10"], 4),
        "ndcg10_embedder_fp32": round(res["embedder-fp32"]["ndcg@10"], 4),
        **({f"ndcg10_embedder_{fast}_chunks": round(res[f"embedder-{fast}-chunks"]["ndcg@10"], 4)}
           if f"embedder-{fast}-chunks" in res else {}),
        **({f"ndcg10_embedder_{fast}_queries_{fast}": round(res[f"embedder-{fast}-queries-{fast}"]["ndcg@10"], 4)}
           if qfast != fast else {}),
        "rerank_ms_p50": round(p50(full_ms), 1),  # the serving pipeline's, beside fp32's in this run
        "rerank_ms_p95": round(p95(full_ms), 1),
        "rerank_ms_p50_fp32": round(p50(bench.latency_ms["full-fp32"]), 1),
        "rerank_ms_p95_fp32": round(p95(bench.latency_ms["full-fp32"]), 1),
        "hybrid_ms_p50": round(p50(bench.latency_ms[f"hybrid-{fast}"]), 1),
        "bm25_ms_p50": round(p50(bench.latency_ms["bm25"]), 1),
        "encode_passages_per_s": round(costs[fast].passages_per_s, 1),
        "encode_passages_per_s_fp32": round(costs["fp32"].passages_per_s, 1),
        "query_ms_p50": round(costs[fast].query_ms_p50, 1),
        "query_ms_p50_fp32": round(costs["fp32"].query_ms_p50, 1),
        "encode_passages_timed": len(sample),
        "inference_precision": fast,
        "query_precision": qfast,
        "reranker_precision": rfast,
        "load_average_1m": round(os.getloadavg()[0], 1),
    }


def main() -> dict:
    config = ensure_labels(load_config())
    p, tr, rr = config.paths, config.training, config.reranker
    layout = Layout.of(p)
    work = p.home / "bench-training"
    weeks = layout.weeks_written(RELEVANCE_LABELS)
    week = weeks[-1]
    ds = load_beir(p.dataset)
    say(f"labels: {len(weeks)} weeks up to {week} from {p.home}")

    # 1. finetune_set, as the finetune_set asset builds it (all weeks to date, held-out queries excluded)
    finetune, stats, _ = finetune_set_week(layout, p.dataset, week, config.tiers)
    labels, _ = labels_to_date(layout, week)
    say(f"finetune_set: {stats.rows} rows, {stats.queries} queries, {stats.near_duplicates_excluded} near-duplicates "
        f"of held-out queries excluded")

    # 2. the embedder, as the trained_model asset trains it (negatives mined with the base: the
    #    first week's champion; the corpus loss scores every chunk instead)
    say(f"training the embedder: {tr.loss} loss, lr {tr.learning_rate}, batch {tr.batch_size}, "
        f"seq {tr.max_seq_length}, epochs {tr.epochs}")
    emb_week = train_week(finetune, labels, ds.corpus, tr, base_model=p.base_model, seed=config.tiers.seed,
                          output_dir=work / "embedder", lancedb_uri=layout.lancedb,
                          mining_cache=work / "mining-cache", progress=say)
    emb, neg = emb_week.result, emb_week.negatives
    say(f"embedder trained in {emb.train_seconds:.0f}s ({emb.steps} steps; estimated {emb.estimated_seconds:.0f}s)")

    # 3. evaluate base vs embedder on the test split (human labels): as the pipeline searches
    #    (serving precision, sentence units), and at fp32 with one vector per chunk
    suites = {"test": test_split_suite(ds)}
    fast = resolve_precision(tr.inference_precision, "cpu")
    served = dict(precision=fast, query_precision=tr.query_precision, units=tr.sentence_units)
    bench = run_benchmark(
        [ModelSpec("base", p.base_model, **served), ModelSpec("embedder", str(emb.model_dir), **served),
         ModelSpec("base-chunks-fp32", p.base_model), ModelSpec("embedder-chunks-fp32", str(emb.model_dir))],
        ds, suites, layout.lancedb, max_seq_length=tr.encode_max_seq_length, progress=say,
    )
    b, e = bench.summary("test", "base"), bench.summary("test", "embedder")
    bc, ec = bench.summary("test", "base-chunks-fp32"), bench.summary("test", "embedder-chunks-fp32")
    say(f"test NDCG@10 at fp32, one vector per chunk: base {bc['ndcg@10']:.4f} -> embedder {ec['ndcg@10']:.4f}; "
        f"Recall@40 {bc['recall@40']:.4f} -> {ec['recall@40']:.4f}")
    say(f"test NDCG@10 base {b['ndcg@10']:.4f} -> embedder {e['ndcg@10']:.4f} "
        f"({(e['ndcg@10'] - b['ndcg@10']) / b['ndcg@10'] * 100:+.1f}%); Recall@10 {b['recall@10']:.4f} -> {e['recall@10']:.4f}")

    # 4. the reranker on the same rows, as the trained_reranker asset trains it; rerank the embedder's top
    say(f"training the reranker: {rr.loss} loss from the {rr.init} weights, lr {rr.learning_rate}, "
        f"seq {rr.max_length}, fusion {rr.fusion}")
    rr_week = train_reranker_week(emb_week.rows, rr, tr, base_model=p.base_model, seed=config.tiers.seed,
                                  output_dir=work / "reranker", embedder_dir=emb.model_dir, labels=labels,
                                  corpus=ds.corpus, lancedb_uri=layout.lancedb, progress=say)
    rres = rr_week.result
    say(f"reranker trained in {rres.train_seconds:.0f}s on {rres.train_pairs} pairs, after a warm-up of "
        f"{rres.warmup_steps} steps on {rres.warmup_lists} inverse-cloze lists ({rres.warmup_seconds:.0f}s)")
    bench2 = run_benchmark(
        [ModelSpec("embedder", str(emb.model_dir), **served)], ds, suites, layout.lancedb,
        rerankers=[RerankSpec("reranked", str(rres.model_dir), on="embedder", depth=rr.depth,
                              max_length=rr.max_length, fusion=rr.fusion, fusion_weight=rr.fusion_weight,
                              precision=rr.inference_precision, passages=rr.passages)],
        max_seq_length=tr.encode_max_seq_length, progress=say,
    )
    r = bench2.summary("test", "reranked")
    say(f"test NDCG@10 embedder {e['ndcg@10']:.4f} -> reranked {r['ndcg@10']:.4f} "
        f"({(r['ndcg@10'] - e['ndcg@10']) / e['ndcg@10'] * 100:+.1f}%)")

    # 5. the first stage with BM25 beside it, the full pipeline, and fp32 vs the serving precision
    fs = first_stage_and_speed(config, ds, layout, emb.model_dir, rres.model_dir)

    return fs | {
        "ndcg10_base": round(b["ndcg@10"], 4),
        "ndcg10_embedder": round(e["ndcg@10"], 4),
        "ndcg10_reranked": round(r["ndcg@10"], 4),
        "recall10_base": round(b["recall@10"], 4),
        "recall10_embedder": round(e["recall@10"], 4),
        "recall10_reranked": round(r["recall@10"], 4),
        "recall40_base": round(b["recall@40"], 4),
        "recall40_embedder": round(e["recall@40"], 4),
        "ndcg10_base_chunks_fp32": round(bc["ndcg@10"], 4),
        "ndcg10_embedder_chunks_fp32": round(ec["ndcg@10"], 4),
        "recall40_base_chunks_fp32": round(bc["recall@40"], 4),
        "recall40_embedder_chunks_fp32": round(ec["recall@40"], 4),
        "sentence_units": tr.sentence_units,
        "embedder_rel_gain_pct": round((e["ndcg@10"] - b["ndcg@10"]) / b["ndcg@10"] * 100, 2),
        "reranker_rel_gain_pct": round((r["ndcg@10"] - e["ndcg@10"]) / e["ndcg@10"] * 100, 2),
        "train_examples": int(emb.train_rows),
        "validation_examples": int(emb.validation_rows),
        "train_seconds": round(emb.train_seconds, 1),
        "estimated_train_seconds": round(emb.estimated_seconds, 1),
        "train_steps": emb.steps,
        "best_step": emb.best_step,
        "reranker_train_seconds": round(rres.train_seconds, 1),
        "reranker_train_pairs": rres.train_pairs,
        "reranker_warmup_lists": rres.warmup_lists,
        "reranker_warmup_seconds": round(rres.warmup_seconds, 1),
        "rerank_ms_p50_over_embedder": round(p50(bench2.rerank_ms), 1),
        "negatives_judged": neg["judged_negatives"],
        "negatives_mined": neg["mined_negatives"],
        "negatives_from_corpus": emb_week.corpus_chunks,
        "mined_dropped_judged_relevant": neg["mined_dropped_judged_relevant"],
        "mining_seconds": neg["mining_seconds"],
        "general_ndcg10_base": round(emb.general_before, 4),
        "general_ndcg10_embedder": round(emb.general_after, 4),
        "merged_with_base": emb.merged,
        "merge_alpha": emb.merge_alpha,
        "test_queries": int(b["queries"]),
        "weeks_of_labels": len(weeks),
        "learning_rate": tr.learning_rate,
        "train_loss": tr.loss,
        "train_corpus_scale": tr.corpus_scale,
        "train_epochs": tr.epochs,
        "reranker": f"{rr.loss}, init {rr.init}, fusion {rr.fusion} (weight {rr.fusion_weight}), "
                    f"depth {rr.depth}, {rr.passages} passages, {rres.steps} steps",
        "train_max_seq_length": tr.max_seq_length,
        "total_seconds": round(time.monotonic() - T0, 1),
    }


if __name__ == "__main__":
    quiet_libraries()
    result = main()
    print(json.dumps(result), flush=True)
    sys.exit(0)
