"""The report stage for one week: measure every candidate, pool the judgments, decide per component.

Steps (``benchmark_week``):
1. Rank the first stages (base, champion, challenger) on the eval sets to date and the test split.
2. Pool: judge every first stage's unjudged top ``pool_depth`` eval chunks (same votes as eval sets).
3. Decide the first stage: challenger against the serving champion (``gate.gate_decision``). While
   keyword fusion serves, both are compared as they would serve, fused with BM25: a dense model
   better alone can be worse once fused, and what the app's users get is the fused list.
4. Keyword fusion: fuse the dense first stage that will serve with BM25 (LanceDB's full-text
   index), pool its top chunks, and decide whether the fused list serves (``_decide_hybrid``).
   Until it serves, the decision also counts this week's new queries (``new_query_evidence``).
5. Rerank the retriever that will serve with the new reranker (and with the serving reranker, if
   one serves), pool their top chunks, and decide the reranker against what serves now.
6. Score everything on the pooled eval sets and on the test split; record the decisions with the
   test split's verdicts beside them (what the backfill counts as gate errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from flywheel.config import GateSettings, RerankerSettings, TiersSettings, TrainingSettings
from flywheel.layout import Layout
from flywheel.lib import store
from flywheel.lib.beir import BeirDataset
from flywheel.lib.datasets.weekly import eval_sets_to_date, new_queries_of_week
from flywheel.lib.evaluation import gate
from flywheel.lib.evaluation.benchmark import (
    Benchmark, HybridSpec, ModelSpec, RerankSpec, rank_first_stages, rank_hybrids, rerank_candidates, score,
    test_split_suite,
)
from flywheel.lib.labels.judges import Judge
from flywheel.lib.labels.pooling import POOL_COLUMNS, PoolStats, extend_pool, pooled_suite

EVAL_SUITE = "eval sets to date (pooled)"
TEST_SUITE = "test split (human labels)"
EVAL_POOL = "eval_pool"  # pooled judgments, one file per week under assets/
NEW_QUERIES_SUITE = "this week's new queries (pooled, one vote)"
NEW_QUERIES_POOL = "new_queries_pool"  # their pooled judgments, one file per week under assets/
NEW_QUERIES_DENSE = "champion"  # the dense model the new queries are ranked with (and fused with BM25)


@dataclass
class Candidates:
    """What competes this week: paths and run records of each component."""

    base_model: str
    champion_path: str
    champion_label: str
    challenger: dict  # trained_model's run info
    reranker: dict  # trained_reranker's run info
    serving_reranker: dict | None = None  # the reranker that serves now (its run info), if any
    serving_hybrid: dict | None = None  # the keyword fusion that serves now ({"fusion", "bm25_weight"}), if any


@dataclass
class WeekBenchmark:
    bench: Benchmark
    first_stage: gate.GateDecision
    reranker: gate.GateDecision | None  # None: no reranker serves after this week
    reranker_decisions: list[gate.GateDecision]
    serving_first_stage: str  # "challenger" or "champion"
    serving_reranker: str | None  # a candidate name in bench, or None
    pool: PoolStats
    eval_weeks: list[str] = field(default_factory=list)
    test: dict = field(default_factory=dict)  # test-split comparisons for the same decisions
    hybrid: gate.GateDecision | None = None  # the keyword-fusion decision (None: fusion is off)
    serving_hybrid: str | None = None  # "<first stage>+bm25" when the fused list serves
    hybrid_spec: dict | None = None  # {"fusion", "bm25_weight"} of the fused candidate
    hybrid_evidence: dict | None = None  # the fusion decision's parts: eval sets, this week's new queries
    first_stage_fused: bool = False  # the first stage was gated fused with BM25 (keyword fusion served)

    @property
    def serving_retriever(self) -> str:
        """What the reranker (if any) reorders: the fused list when keyword fusion serves."""
        return self.serving_hybrid or self.serving_first_stage

    @property
    def long(self) -> pd.DataFrame:
        return self.bench.long_form()

    @property
    def serving_name(self) -> str:
        return self.serving_reranker or self.serving_retriever


def judged_to_date(layout: Layout, week: str) -> tuple[pd.DataFrame, list[str]]:
    """Eval sets to date plus the pooled judgments of earlier weeks (this week's are redone)."""
    evals, weeks = eval_sets_to_date(layout, week)
    pools = [store.read_table(layout.asset(EVAL_POOL, w)) for w in layout.weeks_written(EVAL_POOL) if w < week]
    cols = ["query", "query_key", "chunk_id", "grade", "relevant", "votes"]
    frames = [evals[[c for c in cols if c in evals]]] + [p[cols] for p in pools if not p.empty]
    return pd.concat(frames, ignore_index=True), weeks


class _Pooler:
    """Extends a suite's judgments (the eval suite's by default) with each new batch of rankings;
    keeps what it added."""

    def __init__(self, judged: pd.DataFrame, voters: Sequence[Judge], texts, depth: int, week: str, progress,
                 suite: str = EVAL_SUITE):
        self.judged, self.voters, self.texts, self.depth, self.week = judged, voters, texts, depth, week
        self.progress, self.rows, self.stats, self.suite = progress, [], PoolStats(), suite

    def __call__(self, rankings, suites):
        suite_rankings = {m: r[self.suite] for m, r in rankings.items() if self.suite in r}
        rows, stats = extend_pool(self.judged, suite_rankings, self.voters, self.texts, depth=self.depth,
                                  week=self.week, progress=self.progress)
        if not rows.empty:
            self.rows.append(rows)
            self.judged = pd.concat([self.judged, rows[self.judged.columns.intersection(rows.columns)]], ignore_index=True)
        self.stats.add(stats)
        return {**suites, self.suite: pooled_suite(self.judged)}

    @property
    def new_rows(self) -> pd.DataFrame:
        return pd.concat(self.rows, ignore_index=True) if self.rows else pd.DataFrame(columns=POOL_COLUMNS)


def _reranker_spec(name: str, info: dict, on: str, rer: RerankerSettings) -> RerankSpec:
    return RerankSpec(name, info["model_dir"], on=on, depth=info.get("rerank_depth", rer.depth),
                      max_length=info.get("max_length", rer.max_length), fusion=info.get("fusion", rer.fusion),
                      fusion_weight=info.get("fusion_weight", rer.fusion_weight), precision=rer.inference_precision,
                      # a run from before the setting read each chunk's head
                      passages=info.get("passages", "head"))


def _decide_reranker(long: pd.DataFrame, first: str, new: str, old: str | None, g: GateSettings,
                     cand: Candidates) -> tuple[gate.GateDecision | None, list[gate.GateDecision]]:
    """The new reranker against what serves now (the serving reranker, else its first stage alone),
    and not worse than its first stage alone; the serving reranker, if the new one fails, keeps
    serving unless the eval sets show it significantly worse than its first stage alone."""
    cmp = lambda inc, c: gate.compare(long, EVAL_SUITE, inc, c, n_resamples=g.bootstrap_samples)  # noqa: E731
    new_label = f"reranker v{cand.reranker['version']}"
    decisions = [gate.decide(cmp(old or first, new), cmp(first, new) if old else None, margin=g.regression_margin,
                             min_improvement=g.min_improvement, min_confidence=g.min_confidence,
                             significant=g.reranker_needs_significant_gain and not old,
                             component="reranker", candidate_label=new_label,
                             incumbent_label=f"serving reranker v{cand.serving_reranker['version']}" if old else f"{first} alone")]
    if old:  # the incumbent keeps serving unless the eval sets show it harms its first stage
        c = cmp(first, old)
        keep = not (c.ci_high < 0)
        label = f"serving reranker v{cand.serving_reranker['version']}"
        why = (f"{label} over {first} alone: NDCG@10 change {c.delta:+.4f}, 95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}]: "
               + ("not shown harmful, it keeps serving" if keep else "significantly worse, it is retired"))
        decisions.append(gate.GateDecision("reranker", keep, why, label, f"{first} alone", c, None, g.regression_margin))
    chosen = next((d for d in decisions if d.promote), None)
    return chosen, decisions


def new_query_evidence(layout: Layout, ds: BeirDataset, week: str, champion: ModelSpec, lancedb_uri: str | Path,
                       voters: Sequence[Judge], tiers: TiersSettings, g: GateSettings, enc: dict,
                       progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, PoolStats]:
    """Keyword fusion on this week's new queries (``new_queries_of_week``), fused with the champion:
    per-query results of ``champion`` and ``champion+bm25`` (long form), after pooling the fused
    list's top ``pool_depth`` with the judge's first vote (the vote those queries were labelled
    with; the champion's own list served, so it was judged already).

    Why these queries count: keyword fusion has no weights, and the champion was trained before
    these queries were first asked, so neither side of the comparison has seen them, as for eval
    queries. The challenger and the reranker trained on them: they are never measured here.
    While the eval sets are small (the first weeks) they cannot see a gain of the size keyword
    fusion brings; these queries multiply the evidence at the cost of pooling one vote a pair."""
    judged = new_queries_of_week(layout, ds.root, week, tiers)
    champion = replace(champion, name=NEW_QUERIES_DENSE)
    if judged.empty:
        return pd.DataFrame(columns=["model", "suite", "query_id"]), PoolStats()
    suite = pooled_suite(judged)
    if progress:
        progress(f"keyword fusion: {len(suite[0])} new queries this week count as evidence until it serves "
                 f"(fused with the {champion.name}, which never trained on them)")
    bench = Benchmark(per_query={}, queries={NEW_QUERIES_SUITE: dict(suite[0])}, suites={NEW_QUERIES_SUITE: suite})
    rank_first_stages(bench, [champion], ds, lancedb_uri, latency_sample=1, progress=progress, **enc)
    fused = _fused_spec(champion.name, g)
    rank_hybrids(bench, [fused], ds, lancedb_uri, latency_sample=1, progress=progress)
    pooler = _Pooler(judged, list(voters)[:1], ds.corpus.text_by_id, g.pool_depth, week, progress, suite=NEW_QUERIES_SUITE)
    score(bench, [champion.name, fused.name], pool=pooler)
    store.write_table(layout.asset(NEW_QUERIES_POOL, week), pooler.new_rows)
    return bench.long_form(), pooler.stats


def _paired(long: pd.DataFrame, suite: str, without: str, with_: str, prefix: str) -> pd.DataFrame:
    rows = long[(long["suite"] == suite) & long["model"].isin([without, with_])]
    return rows.assign(model=rows["model"].map({without: "without", with_: "with"}), suite="evidence",
                       query_id=prefix + rows["query_id"].astype(str))


def _decide_hybrid(long: pd.DataFrame, first: str, fused: str, serving_now: bool, g: GateSettings,
                   new_queries: pd.DataFrame | None = None) -> tuple[gate.GateDecision, dict]:
    """Keyword fusion against its dense first stage alone. Not serving yet: it serves when it passes
    the gate's rule, on the eval sets plus this week's new queries fused with the champion
    (``new_query_evidence``; each query's change measured with a dense model that never trained on
    it). Serving already: it keeps serving unless the eval sets show it significantly worse than
    the dense list alone (it has no weights to retrain, so it is not re-won weekly). Returns the
    decision and its evidence (the comparison on each part)."""
    c = gate.compare(long, EVAL_SUITE, first, fused, n_resamples=g.bootstrap_samples)
    evidence = {"eval": c.as_dict()}
    if not serving_now:
        where = "eval queries"
        if new_queries is not None and not new_queries.empty:
            champ = NEW_QUERIES_DENSE
            new = gate.compare(new_queries, NEW_QUERIES_SUITE, champ, f"{champ}+bm25", n_resamples=g.bootstrap_samples)
            both = pd.concat([_paired(long, EVAL_SUITE, first, fused, "eval:"),
                              _paired(new_queries, NEW_QUERIES_SUITE, champ, f"{champ}+bm25", "new:")], ignore_index=True)
            c = replace(gate.compare(both, "evidence", "without", "with", n_resamples=g.bootstrap_samples),
                        candidate=fused, incumbent=first)
            evidence.update(new_queries=new.as_dict(), combined=c.as_dict())
            where = (f"queries ({evidence['eval']['n']} eval, {new.n} new this week fused with the {champ}, "
                     "which never trained on them)")
        return gate.decide(c, None, margin=g.regression_margin, min_improvement=g.min_improvement,
                           min_confidence=g.min_confidence, evidence=where,
                           component="keyword fusion", candidate_label=fused, incumbent_label=f"{first} alone"), evidence
    keep = not (c.ci_high < 0)
    why = (f"{fused} (serving) over {first} alone: NDCG@10 change {c.delta:+.4f}, 95% CI [{c.ci_low:+.4f}, "
           f"{c.ci_high:+.4f}]: " + ("not shown harmful, it keeps serving" if keep else "significantly worse, it stops serving"))
    return gate.GateDecision("keyword fusion", keep, why, fused, f"{first} alone", c, None, g.regression_margin), evidence


def _fused_spec(first: str, g: GateSettings) -> HybridSpec:
    """A dense first stage fused with BM25 as the gate's settings fuse it (named ``<first>+bm25``)."""
    return HybridSpec(f"{first}+bm25", on=first, fusion=g.hybrid_fusion, bm25_weight=g.hybrid_bm25_weight)


def _add_hybrid(bench: Benchmark, ds: BeirDataset, first: str, lancedb_uri, g: GateSettings, pooler,
                progress) -> str | None:
    """Rank the dense first stage fused with BM25 and pool its top chunks; its name, or None when off."""
    if g.hybrid_fusion == "off":
        return None
    fused = _fused_spec(first, g)
    if fused.name not in bench.rankings:
        rank_hybrids(bench, [fused], ds, lancedb_uri, progress=progress)
        score(bench, list(bench.rankings), pool=pooler)
    return fused.name


def benchmark_week(layout: Layout, ds: BeirDataset, week: str, cand: Candidates, lancedb_uri: str | Path, *,
                   voters: Sequence[Judge], training: TrainingSettings, rer: RerankerSettings, g: GateSettings,
                   tiers: TiersSettings, progress: Callable[[str], None] | None = None) -> WeekBenchmark:
    judged, eval_weeks = judged_to_date(layout, week)
    suites = {EVAL_SUITE: pooled_suite(judged)}
    if ds.has_test_split:
        suites[TEST_SUITE] = test_split_suite(ds)
    bench = Benchmark(per_query={}, queries={n: dict(s[0]) for n, s in suites.items()}, suites=suites)
    enc = dict(max_seq_length=training.encode_max_seq_length, batch_size=training.encode_batch_size, device=training.device,
               cache_dir=layout.openvino_cache)
    # 1-3: first stages, pooled, decided
    prec = dict(precision=training.inference_precision, query_precision=training.query_precision,
                units=training.sentence_units)  # the same for all
    firsts = [ModelSpec("base", cand.base_model, **prec), ModelSpec("champion", cand.champion_path, **prec),
              ModelSpec("challenger", cand.challenger["model_dir"], cand.challenger["model_id"], **prec)]
    rank_first_stages(bench, firsts, ds, lancedb_uri, progress=progress, **enc)
    pooler = _Pooler(judged, voters, ds.corpus.text_by_id, g.pool_depth, week, progress)
    # while keyword fusion serves, each dense first stage is gated as it would serve: fused with BM25
    fused_gate = g.hybrid_fusion != "off" and bool(cand.serving_hybrid)
    fused_specs = [_fused_spec(m.name, g) for m in firsts] if fused_gate else []
    if fused_specs:
        rank_hybrids(bench, fused_specs, ds, lancedb_uri, progress=progress)
    gated = {m.name: spec.name for m, spec in zip(firsts, fused_specs or firsts)}  # the names the gate compares
    score(bench, list(bench.rankings), pool=pooler)
    decide_first = lambda long: gate.gate_decision(  # noqa: E731
        long, EVAL_SUITE, margin=g.regression_margin, min_improvement=g.min_improvement, min_confidence=g.min_confidence,
        champion_label=cand.champion_label, n_resamples=g.bootstrap_samples, challenger=gated["challenger"],
        champion=gated["champion"], base=gated["base"],
        evidence="eval queries, each first stage fused with BM25 as it serves" if fused_gate else "eval queries")
    new_queries, new_stats = None, PoolStats()
    if g.hybrid_fusion != "off" and not fused_gate:  # more evidence for fusion while it does not serve
        new_queries, new_stats = new_query_evidence(layout, ds, week, firsts[1], lancedb_uri, voters, tiers, g, enc, progress)
        new_stats.by_model = {f"{m} (new queries)": n for m, n in new_stats.by_model.items()}
    decide_hybrid = lambda long, first, fused: (  # noqa: E731
        _decide_hybrid(long, first, fused, bool(cand.serving_hybrid), g, new_queries) if fused else (None, None))
    # 4-6, until the decisions settle: the later candidates' pooled judgments can move an earlier
    # decision (a newly found relevant chunk raises every model's ideal DCG on that query)
    for _ in range(3):
        first = decide_first(bench.long_form())
        serving_first = "challenger" if first.promote else "champion"
        fused = _add_hybrid(bench, ds, serving_first, lancedb_uri, g, pooler, progress)  # 4: keyword fusion
        hyb, _ = decide_hybrid(bench.long_form(), serving_first, fused)
        retriever = fused if hyb is not None and hyb.promote else serving_first
        new, old = f"{retriever}+reranker", (f"{retriever}+serving-reranker" if cand.serving_reranker else None)
        specs = [_reranker_spec(new, cand.reranker, retriever, rer)] + (
            [_reranker_spec(old, cand.serving_reranker, retriever, rer)] if old else [])
        rerank_candidates(bench, [s for s in specs if s.name not in bench.rankings], ds,  # 5: rerankers
                          batch_size=training.encode_batch_size, device=training.device,
                          cache_dir=layout.openvino_cache, progress=progress)
        score(bench, list(bench.rankings), pool=pooler)  # 6: everything on the pooled judgments
        long = bench.long_form()
        first_again, (hyb_again, hyb_evidence) = decide_first(long), decide_hybrid(long, serving_first, fused)
        if first_again.promote == first.promote and (hyb is None or hyb_again.promote == hyb.promote):
            first, hyb = first_again, hyb_again
            break
    chosen, rdecisions = _decide_reranker(long, retriever, new, old, g, cand)
    serving_reranker = None if chosen is None else (new if chosen is rdecisions[0] else old)
    pooler.stats.add(new_stats)
    out = WeekBenchmark(bench, first, chosen, rdecisions, serving_first, serving_reranker, pooler.stats, eval_weeks,
                        hybrid=hyb, serving_hybrid=retriever if retriever != serving_first else None,
                        hybrid_spec={"fusion": g.hybrid_fusion, "bm25_weight": g.hybrid_bm25_weight} if fused else None,
                        hybrid_evidence=hyb_evidence, first_stage_fused=fused_gate)
    out.test = test_verdicts(long, out, g) if TEST_SUITE in bench.suites else {}
    store.write_table(layout.asset(EVAL_POOL, week), pooler.new_rows)
    return out


def test_verdicts(long: pd.DataFrame, wb: WeekBenchmark, g: GateSettings) -> dict:
    """The same comparisons on the human-labelled test split (never used to decide)."""
    cmp = lambda inc, c: gate.compare(long, TEST_SUITE, inc, c, n_resamples=g.bootstrap_samples).as_dict()  # noqa: E731
    r, f = wb.serving_retriever, wb.first_stage.vs_incumbent
    before = f.incumbent  # what served before this week's decisions (fused when fusion served)
    return {
        "first_stage": cmp(f.incumbent, f.candidate),  # as the gate compared them
        "first_stage_dense": cmp("champion", "challenger"),
        "challenger_vs_base": cmp("base", "challenger"),
        "serving_after_vs_before": cmp(before, wb.serving_name) if wb.serving_name != before else None,
        "hybrid_vs_first_stage": cmp(wb.serving_first_stage, wb.hybrid.candidate_label) if wb.hybrid else None,
        "reranker_vs_first_stage": cmp(r, f"{r}+reranker"),
    }


def gate_error(decision_promoted: bool, test: dict | None) -> str | None:
    """A promotion of a candidate significantly worse on the test split, or a block of one
    significantly better, is a gate error (paired 95% CI wholly below / above zero)."""
    if not test:
        return None
    if decision_promoted and test["ci_high"] < 0:
        return "promoted a model the test split shows significantly worse"
    if not decision_promoted and test["ci_low"] > 0:
        return "blocked a model the test split shows significantly better"
    return None
