"""The weekly report: decision first, paired CIs and per-query wins/losses, plots, latency."""

import numpy as np

from flywheel.lib.evaluation import metrics as evaluation
from flywheel.lib.evaluation.benchmark import Benchmark, build_report, p95, wins_losses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench() -> Benchmark:
    relevant = {f"q{i}": {f"d{i}"} for i in range(6)}
    # base finds each relevant chunk at rank 8; the challenger moves 4 queries to rank 1,
    # leaves 1 alone and loses 1 (rank 8 -> missing)
    base = {q: [f"x{j}" for j in range(7)] + [f"d{i}"] for i, q in enumerate(relevant)}
    moved = {q: ([f"d{i}"] if i < 4 else []) + [f"x{j}" for j in range(7)] + ([f"d{i}"] if i == 4 else [])
             for i, q in enumerate(relevant)}
    suite = "test split"
    per_query = {
        "base": {suite: evaluation.evaluate_rankings(base, relevant)},
        "challenger": {suite: evaluation.evaluate_rankings(moved, relevant)},
    }
    bench = Benchmark(per_query=per_query, queries={suite: {q: f"query text {q}" for q in relevant}})
    bench.summaries[suite] = {m: evaluation.summarize(per_query[m][suite]) for m in per_query}
    bench.latency_ms = {"base": [10.0, 12.0, 30.0], "challenger": [11.0, 11.0, 11.0]}
    return bench


def test_wins_and_losses_are_counted_per_query():
    assert wins_losses(_bench(), "test split", "base", "challenger") == {"wins": 4, "losses": 1, "ties": 1}


def test_report_has_decision_first_cis_wins_plots_and_latency():
    report = build_report(_bench(), ["base", "challenger"], title="week 1", decision="NOT PROMOTED: because",
                          pairs=[("base", "challenger")])
    md = report.markdown
    assert md.splitlines()[2] == "**NOT PROMOTED: because**"
    for metric in ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@20", "recall@40", "mrr@10"):
        assert f"| {metric} |" in md
    line = next(x for x in md.splitlines() if x.startswith("| challenger vs base |"))
    assert line.endswith("| 4 / 1 / 1 |") and "[" in line  # CI bracket and wins/losses/ties
    # the largest wins (3 of the 4 that moved to rank 1) and the loss, by their text
    assert sum(f"query text q{i} |" in md for i in range(4)) == 3 and "| query text q5 | 0.315 -> 0.000 | 8 -> - |" in md
    assert set(report.figures) == {"test-split-first-relevant-rank.png", "test-split-recall-at-k.png"}
    assert all(png.startswith(PNG_MAGIC) for png in report.figures.values())
    assert md.count("](data:image/png;base64,") == 2
    latency = next(x for x in md.splitlines() if x.startswith("| base | retrieval"))
    assert f"| {np.median([10, 12, 30]):.1f} | {p95([10, 12, 30]):.1f} | 3 |" in latency


def test_report_without_pairs_or_latency_still_renders():
    bench = _bench()
    bench.latency_ms = {}
    md = build_report(bench, ["base"], title="t", decision="d").markdown
    assert "Paired comparisons" not in md and "Latency" not in md
