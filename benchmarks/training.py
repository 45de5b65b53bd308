"""Benchmark the training stage: does the flywheel's recipe make retrieval measurably better?

The project's own code path, end to end on the bundled SciFact data:
simulated traffic + simulated-judge labels (every week written so far) -> finetune_set (2,000 rows,
eval-set and test-split queries and their near-duplicates held out) -> judged + mined hard
negatives -> fine-tune the bi-encoder -> fine-tune the cross-encoder -> evaluate on SciFact's test
split (300 queries, human labels): base vs embedder vs embedder + reranker (top 40).

Labels: reuses ``$FLYWHEEL_HOME`` (default ./.flywheel) when it already holds relevance_labels
(e.g. after ``make demo``); otherwise simulates 8 weeks and labels them through the Dagster
``weekly_labels`` job in a home of its own (``$FLYWHEEL_HOME/bench-training``). Models, mining
cache and report go to ``<home>/bench-training``; corpus embeddings go to ``<home>/lancedb``
(one table per model fingerprint, so the base table is reused).

Prints figures as it goes; the last line is one JSON object with ndcg10_/recall10_ for base,
embedder and reranked, train_examples, train_seconds (bi-encoder trainer time), rerank_ms_p50 and
more. Usage: python benchmarks/training.py
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

from flywheel.defs.datasets import held_out_queries, held_out_texts, labels_to_date  # noqa: E402
from flywheel.defs.resources import resources_for  # noqa: E402
from flywheel.lib import store  # noqa: E402
from flywheel.lib.evaluation.benchmark import ModelSpec, RerankSpec, p50, run_benchmark, test_split_suite  # noqa: E402
from flywheel.lib.beir import load_beir  # noqa: E402
from flywheel.lib.datasets.tiers import build_finetune_set  # noqa: E402
from flywheel.lib.datasets.mining import MiningConfig, build_training_rows  # noqa: E402
from flywheel.lib.training.reranker import RerankerConfig, train_reranker  # noqa: E402
from flywheel.lib.training.embedder import TrainConfig, frozen_corpus, related_chunks, train_bi_encoder  # noqa: E402
from flywheel.settings import get_settings  # noqa: E402

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def ensure_labels(settings):
    """A settings object whose home holds relevance_labels for every simulated week."""
    if store.weeks_written(settings.assets_dir, "relevance_labels"):
        return settings
    import dagster as dg

    from flywheel.defs import build_definitions
    from flywheel.lib.simulate.traffic import SimulationConfig, simulate, week_starts

    own = settings.with_(home=settings.home / "bench-training" / "home")
    say(f"no labels under {settings.home}: simulating 8 weeks of traffic into {own.home}")
    simulate(SimulationConfig(
        dataset_dir=own.dataset_dir, log_dir=own.log_dir, lancedb_uri=own.lancedb_dir,
        model_path=own.base_model, start=own.start_date, weeks=8, seed=own.seed,
        encode_max_seq_length=own.encode_max_seq_length,
    ), progress=say)
    defs = build_definitions(resources_for(own))
    job = defs.resolve_job_def("weekly_labels")
    instance = dg.DagsterInstance.ephemeral()
    for week in week_starts(own.start_date, 8):
        assert job.execute_in_process(partition_key=week.isoformat(), instance=instance).success
        say(f"labelled week {week}")
    return own


def main() -> dict:
    settings = ensure_labels(get_settings())
    paths = resources_for(settings)["paths"]
    work = settings.home / "bench-training"
    weeks = store.weeks_written(settings.assets_dir, "relevance_labels")
    week = weeks[-1]
    ds = load_beir(settings.dataset_dir)
    say(f"labels: {len(weeks)} weeks up to {week} from {settings.home}")

    # 1. finetune_set, as the finetune_set asset builds it (all weeks to date, held-out queries excluded)
    labels, _ = labels_to_date(paths, week)
    eval_q, test_q = held_out_queries(paths, week)
    finetune, stats = build_finetune_set(
        labels, n_examples=settings.finetune_examples, seed=settings.seed, exclude_queries=eval_q | test_q,
        near_duplicate_of=held_out_texts(paths, week), near_duplicate_jaccard=paths.near_duplicate_jaccard,
    )
    say(f"finetune_set: {stats.rows} rows, {stats.queries} queries, {stats.near_duplicates_excluded} near-duplicates "
        f"of held-out queries excluded")

    # 2. hard negatives: judged (already in the rows) + mined with the base model (the first week's
    #    champion); the corpus loss scores every chunk instead of mining
    query_only = settings.train_loss == "corpus"
    mine = settings.mine_negatives and not query_only
    rows, neg = build_training_rows(
        finetune, labels[["query_key", "chunk_id", "grade"]], settings.base_model,
        list(ds.corpus.ids), list(ds.corpus.texts),
        MiningConfig(range_max=settings.mine_range_max, relative_margin=settings.mine_relative_margin),
        max_seq_length=settings.train_max_seq_length, cache_folder=str(work / "mining-cache"), progress=say,
    ) if mine else build_training_rows(finetune, None, None, [], [])

    # 3. the bi-encoder, default settings
    cfg = TrainConfig(
        base_model=settings.base_model, output_dir=work / "embedder", epochs=settings.train_epochs,
        batch_size=settings.train_batch_size, learning_rate=settings.train_learning_rate,
        max_seq_length=settings.train_max_seq_length, max_steps=settings.train_max_steps,
        time_budget_s=settings.train_time_budget_s, merge_alpha=settings.merge_alpha,
        forgetting_margin=settings.forgetting_margin, seed=settings.seed, loss=settings.train_loss,
        corpus_scale=settings.train_corpus_scale,
    )
    say(f"training the embedder: lr {cfg.learning_rate}, batch {cfg.batch_size}, seq {cfg.max_seq_length}, "
        f"epochs {cfg.epochs}")
    corpus = frozen_corpus(
        settings.lancedb_dir, settings.base_model, ds.corpus, max_seq_length=settings.encode_max_seq_length,
        progress=say,
    ) if query_only else None
    emb = train_bi_encoder(rows, cfg, corpus=corpus, related=related_chunks(labels), progress=say)
    say(f"embedder trained in {emb.train_seconds:.0f}s ({emb.steps} steps; estimated {emb.estimated_seconds:.0f}s)")

    # 4. evaluate base vs embedder on the test split (human labels); corpus encoded at 256
    suites = {"test": test_split_suite(ds)}
    bench = run_benchmark(
        [ModelSpec("base", settings.base_model), ModelSpec("embedder", str(emb.model_dir))], ds, suites,
        settings.lancedb_dir, max_seq_length=settings.encode_max_seq_length, progress=say,
    )
    b, e = bench.summary("test", "base"), bench.summary("test", "embedder")
    say(f"test NDCG@10 base {b['ndcg@10']:.4f} -> embedder {e['ndcg@10']:.4f} "
        f"({(e['ndcg@10'] - b['ndcg@10']) / b['ndcg@10'] * 100:+.1f}%); Recall@10 {b['recall@10']:.4f} -> {e['recall@10']:.4f}")

    # 5. the reranker on the same rows, then rerank the embedder's top 40
    rcfg = RerankerConfig(
        base_model=settings.base_model, output_dir=work / "reranker", epochs=settings.reranker_epochs,
        batch_size=settings.reranker_batch_size, learning_rate=settings.reranker_learning_rate,
        head_learning_rate=settings.reranker_head_learning_rate,
        max_length=settings.reranker_max_length, max_steps=settings.reranker_max_steps,
        rerank_depth=settings.rerank_depth, seed=settings.seed,
        init_model=str(emb.model_dir) if settings.reranker_init == "embedder" else None,
        loss=settings.reranker_loss, num_negatives=settings.reranker_num_negatives, fusion=settings.reranker_fusion,
        fusion_weight=settings.reranker_fusion_weight,
    )
    say(f"training the reranker: {rcfg.loss} loss from the {settings.reranker_init} weights, lr {rcfg.learning_rate}, "
        f"seq {rcfg.max_length}, fusion {rcfg.fusion}")
    rr = train_reranker(rows, rcfg, progress=say)
    say(f"reranker trained in {rr.train_seconds:.0f}s on {rr.train_pairs} pairs")
    bench2 = run_benchmark(
        [ModelSpec("embedder", str(emb.model_dir))], ds, suites, settings.lancedb_dir,
        rerankers=[RerankSpec("reranked", str(rr.model_dir), on="embedder", depth=rcfg.rerank_depth,
                              max_length=rcfg.max_length, fusion=rcfg.fusion,
                              fusion_weight=rcfg.fusion_weight)],
        max_seq_length=settings.encode_max_seq_length, progress=say,
    )
    r = bench2.summary("test", "reranked")
    say(f"test NDCG@10 embedder {e['ndcg@10']:.4f} -> reranked {r['ndcg@10']:.4f} "
        f"({(r['ndcg@10'] - e['ndcg@10']) / e['ndcg@10'] * 100:+.1f}%)")

    out = {
        "ndcg10_base": round(b["ndcg@10"], 4),
        "ndcg10_embedder": round(e["ndcg@10"], 4),
        "ndcg10_reranked": round(r["ndcg@10"], 4),
        "recall10_base": round(b["recall@10"], 4),
        "recall10_embedder": round(e["recall@10"], 4),
        "recall10_reranked": round(r["recall@10"], 4),
        "embedder_rel_gain_pct": round((e["ndcg@10"] - b["ndcg@10"]) / b["ndcg@10"] * 100, 2),
        "reranker_rel_gain_pct": round((r["ndcg@10"] - e["ndcg@10"]) / e["ndcg@10"] * 100, 2),
        "train_examples": int(emb.train_rows),
        "validation_examples": int(emb.validation_rows),
        "train_seconds": round(emb.train_seconds, 1),
        "estimated_train_seconds": round(emb.estimated_seconds, 1),
        "train_steps": emb.steps,
        "best_step": emb.best_step,
        "reranker_train_seconds": round(rr.train_seconds, 1),
        "reranker_train_pairs": rr.train_pairs,
        "rerank_ms_p50": round(p50(bench2.rerank_ms), 1),
        "negatives_judged": neg["judged_negatives"],
        "negatives_mined": neg["mined_negatives"],
        "negatives_from_corpus": len(ds.corpus) if query_only else 0,
        "mined_dropped_judged_relevant": neg["mined_dropped_judged_relevant"],
        "mining_seconds": neg["mining_seconds"],
        "general_ndcg10_base": round(emb.general_before, 4),
        "general_ndcg10_embedder": round(emb.general_after, 4),
        "merged_with_base": emb.merged,
        "test_queries": int(b["queries"]),
        "weeks_of_labels": len(weeks),
        "learning_rate": cfg.learning_rate,
        "train_loss": cfg.loss,
        "train_corpus_scale": cfg.corpus_scale,
        "train_epochs": cfg.epochs,
        "reranker": f"{rcfg.loss}, init {settings.reranker_init}, fusion {rcfg.fusion} (weight {rcfg.fusion_weight}), "
                    f"depth {rcfg.rerank_depth}, {rr.steps} steps",
        "train_max_seq_length": cfg.max_seq_length,
        "total_seconds": round(time.monotonic() - T0, 1),
    }
    return out


if __name__ == "__main__":
    result = main()
    print(json.dumps(result), flush=True)
    sys.exit(0)
