"""Benchmark the training recipes side by side: one target per positive, or the judge's grades?

The judge grades 0-3 (irrelevant, related, relevant, perfect). Two settings use the grades, not
just relevant vs irrelevant:

- ``FLYWHEEL_TRAIN_CORPUS_TARGETS=graded``: the bi-encoder's corpus loss spreads each query's
  target over every chunk judged >= 1 for it, by gain 2^grade - 1 (``positive``: the row's positive,
  the query's other judged chunks masked);
- ``FLYWHEEL_RERANKER_LOSS=graded``: the cross-encoder learns each training query's judged list
  with ListNet on the grades (``listwise``: each row picks its positive among negatives).

This trains the week's embedder both ways and the reranker both ways (over the ``positive``
embedder, fused with BM25 as the pipeline serves it) from the same labels, with the pipeline's
own ``lib`` functions, and scores everything on the dataset's test split (human labels):
NDCG@10, Recall@10 and Recall@40, the reranker fused as configured and alone.

Labels: ``$FLYWHEEL_HOME`` when it holds relevance_labels (e.g. after ``make demo``), otherwise 8
simulated weeks labelled through the CLI, as ``benchmarks/training.py`` does. Models go to
``<home>/bench-recipes``. Usage: python benchmarks/recipes.py; the last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training import ensure_labels, say  # noqa: E402  (benchmarks/training.py: same label source)

from flywheel.config import load_config  # noqa: E402
from flywheel.layout import RELEVANCE_LABELS, Layout  # noqa: E402
from flywheel.lib.beir import load_beir  # noqa: E402
from flywheel.lib.datasets.weekly import finetune_set_week, labels_to_date  # noqa: E402
from flywheel.lib.evaluation.benchmark import (  # noqa: E402
    HybridSpec, ModelSpec, RerankSpec, run_benchmark, test_split_suite,
)
from flywheel.lib.quiet import quiet_libraries  # noqa: E402
from flywheel.lib.registry.inference import resolve_precision  # noqa: E402
from flywheel.lib.training.week import train_reranker_week, train_week  # noqa: E402

METRICS = ("ndcg@10", "recall@10", "recall@40")


def main() -> dict:
    config = ensure_labels(load_config())
    p, tr, rr = config.paths, config.training, config.reranker
    layout = Layout.of(p)
    work = p.home / "bench-recipes"
    week = layout.weeks_written(RELEVANCE_LABELS)[-1]
    ds = load_beir(p.dataset)
    finetune, stats, _ = finetune_set_week(layout, p.dataset, week, config.tiers)
    labels, weeks = labels_to_date(layout, week)
    say(f"labels: {len(weeks)} weeks up to {week}; finetune_set {stats.rows} rows, {stats.queries} queries")
    fast = resolve_precision(tr.inference_precision, "cpu")
    hybrid_fusion = config.gate.hybrid_fusion if config.gate.hybrid_fusion != "off" else "zscore"

    # 1. the embedder with each corpus target (the same rows, seed and time budget)
    embedders, train_s = {}, {}
    for targets in ("positive", "graded"):
        say(f"training the embedder: corpus targets {targets}")
        out = train_week(finetune, labels, ds.corpus, tr.with_(corpus_targets=targets), base_model=p.base_model,
                         seed=config.tiers.seed, output_dir=work / f"embedder-{targets}", lancedb_uri=layout.lancedb,
                         mining_cache=work / "mining-cache", progress=say)
        embedders[targets], train_s[targets] = out, round(out.result.train_seconds, 1)
        say(f"embedder ({targets}): {out.result.steps} steps in {out.result.train_seconds:.0f}s")

    # 2. the reranker with each loss, from the positive embedder (the default recipe's)
    rerankers, rr_s = {}, {}
    for loss in ("listwise", "graded"):
        say(f"training the reranker: {loss} loss")
        out = train_reranker_week(embedders["positive"].rows, rr.with_(loss=loss), tr, base_model=p.base_model,
                                  seed=config.tiers.seed, output_dir=work / f"reranker-{loss}",
                                  embedder_dir=embedders["positive"].model_dir, labels=labels, corpus=ds.corpus,
                                  lancedb_uri=layout.lancedb, progress=say)
        rerankers[loss], rr_s[loss] = out, round(out.result.train_seconds, 1)
        say(f"reranker ({loss}): {out.result.steps} steps on {out.result.examples} examples in "
            f"{out.result.train_seconds:.0f}s")

    # 3. everything on the test split: the embedders, the hybrid over the default one, the rerankers on it
    models = [ModelSpec("base", p.base_model, precision=fast)] + [
        ModelSpec(f"embedder-{t}", str(e.model_dir), precision=fast) for t, e in embedders.items()]
    kw = dict(depth=rr.depth, max_length=rr.max_length, fusion_weight=rr.fusion_weight, passages=rr.passages,
              precision=resolve_precision(rr.inference_precision, "cpu"))
    specs = []
    for loss, r in rerankers.items():
        specs += [RerankSpec(f"full-{loss}", str(r.model_dir), on="hybrid", fusion=rr.fusion, **kw),
                  RerankSpec(f"alone-{loss}", str(r.model_dir), on="hybrid", fusion="none", **kw)]
    bench = run_benchmark(models, ds, {"test": test_split_suite(ds)}, layout.lancedb,
                          hybrids=[HybridSpec("hybrid", on="embedder-positive", fusion=hybrid_fusion,
                                              bm25_weight=config.gate.hybrid_bm25_weight)],
                          rerankers=specs, max_seq_length=tr.encode_max_seq_length,
                          batch_size=tr.encode_batch_size, progress=say)
    res = {name: bench.summary("test", name) for name in bench.summaries["test"]}
    for name, m in res.items():
        say(f"test {name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRICS))

    def fig(name: str, metric: str = "ndcg@10") -> float:
        return round(res[name][metric], 4)

    return {
        "ndcg10_base": fig("base"), "recall40_base": fig("base", "recall@40"),
        "ndcg10_embedder_positive": fig("embedder-positive"), "ndcg10_embedder_graded": fig("embedder-graded"),
        "recall10_embedder_positive": fig("embedder-positive", "recall@10"),
        "recall10_embedder_graded": fig("embedder-graded", "recall@10"),
        "recall40_embedder_positive": fig("embedder-positive", "recall@40"),
        "recall40_embedder_graded": fig("embedder-graded", "recall@40"),
        "ndcg10_hybrid": fig("hybrid"),
        "ndcg10_full_listwise": fig("full-listwise"), "ndcg10_full_graded": fig("full-graded"),
        "ndcg10_reranker_alone_listwise": fig("alone-listwise"), "ndcg10_reranker_alone_graded": fig("alone-graded"),
        "embedder_train_seconds": train_s, "reranker_train_seconds": rr_s,
        "reranker_train_examples": {k: r.result.examples for k, r in rerankers.items()},
        "test_queries": int(res["base"]["queries"]), "weeks_of_labels": len(weeks),
        "total_seconds": round(time.monotonic() - T0, 1),
    }


T0 = time.monotonic()

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    print(json.dumps(main()), flush=True)
