"""The promotion gate's decision rule and the registry moves, without Dagster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel.config import GateSettings, default_of
from flywheel.lib.evaluation.gate import gate_decision
from flywheel.lib.evaluation.weekly import EVAL_SUITE, NEW_QUERIES_SUITE, Candidates, _decide_hybrid, _decide_reranker
from flywheel.lib.registry.promotion import CHALLENGER, CHAMPION, PREVIOUS, changes, promote, retire, serving_model
from flywheel.lib.registry.tracking import Tracker


def long_form(values: dict[str, np.ndarray], suite: str = "eval") -> pd.DataFrame:
    return pd.concat(
        [pd.DataFrame({"model": m, "suite": suite, "query_id": [f"q{i}" for i in range(len(v))], "ndcg@10": v})
         for m, v in values.items()],
        ignore_index=True,
    )


def test_gate_promotes_a_clear_improvement():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 200)
    pq = long_form({"base": base, "champion": base, "challenger": np.clip(base + 0.05 + rng.normal(0, 0.05, 200), 0, 1)})
    d = gate_decision(pq, "eval", margin=0.01, champion_label="base")
    assert d.promote and d.vs_incumbent.ci_low > 0 and "beats" in d.reason
    assert "positive (100% of bootstrap resamples in favour)" in d.reason
    assert 0 < d.vs_incumbent.mde == pytest.approx((1.96 + 0.84) * d.vs_incumbent.se)


def test_gate_blocks_a_regression_and_names_the_champion():
    rng = np.random.default_rng(1)
    champ = rng.uniform(0.3, 0.9, 200)
    pq = long_form({"base": champ - 0.1, "champion": champ, "challenger": champ - 0.08})
    d = gate_decision(pq, "eval", margin=0.01, champion_label="v2")
    assert not d.promote and d.vs_incumbent.ci_high < 0 and "v2" in d.reason and "not better" in d.reason


def test_gate_refuses_a_tie_but_a_negative_min_improvement_allows_it():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.9, 400)
    noise = rng.normal(0, 0.02, 400)
    tie = long_form({"base": base, "champion": base, "challenger": base + noise - noise.mean()})
    assert not gate_decision(tie, "eval", margin=0.02, champion_label="base").promote  # no gain: no churn
    assert gate_decision(tie, "eval", margin=0.02, min_improvement=-0.01, champion_label="base").promote


def test_gate_refuses_a_gain_too_few_bootstrap_resamples_favour():
    """A positive point estimate inside the margin is not enough: the required share of resamples
    (min_confidence) must put the change above zero. The same comparison passes a lower bar."""
    rng = np.random.default_rng(6)
    base = rng.uniform(0.3, 0.9, 100)
    noise = rng.normal(0, 0.1, 100)
    slight = long_form({"base": base, "champion": base, "challenger": base + noise - noise.mean() + 0.003})
    d = gate_decision(slight, "eval", margin=0.03, min_confidence=0.7, champion_label="v3")
    c = d.vs_incumbent
    assert c.delta > 0 and c.ci_low > -0.03 and 0.5 < c.p_better < 0.7
    assert not d.promote and f"{c.p_better:.0%} of bootstrap resamples favour it, fewer than the 70% required" in d.reason
    assert gate_decision(slight, "eval", margin=0.03, min_confidence=0.5, champion_label="v3").promote
    clear = long_form({"base": base, "champion": base, "challenger": base + 0.05 + rng.normal(0, 0.02, 100)})
    assert gate_decision(clear, "eval", margin=0.03, min_confidence=0.7, champion_label="v3").vs_incumbent.p_better == 1.0


def test_gate_refuses_a_gain_whose_interval_includes_a_large_regression():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 0.9, 20)
    noisy = long_form({"base": base, "champion": base, "challenger": np.clip(base + 0.01 + rng.normal(0, 0.2, 20), 0, 1)})
    d = gate_decision(noisy, "eval", margin=0.01, champion_label="base")
    assert d.vs_incumbent.delta > 0 and d.vs_incumbent.ci_low < -0.01
    assert not d.promote and "does not exclude a regression larger than 0.01" in d.reason


def test_gate_refuses_a_challenger_below_the_base_even_when_it_beats_a_bad_champion():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.3, 0.9, 400)
    worse_than_base = long_form({"base": base, "champion": base - 0.3, "challenger": base - 0.1})
    d = gate_decision(worse_than_base, "eval", margin=0.01, champion_label="v1")
    assert not d.promote and "vs base" in d.reason


def test_a_truly_better_challenger_passes_and_a_truly_worse_one_does_not_over_many_draws():
    """The rule's operating characteristic at the flywheel's usual gain (+0.045 NDCG@10) and 160
    eval queries: simulated draws with per-query noise like the backfill's (sd 0.15)."""
    rng = np.random.default_rng(5)
    passed = {+0.045: 0, -0.02: 0}
    for true_delta in passed:
        for _ in range(100):
            base = rng.uniform(0.2, 0.9, 160)
            ch = base + true_delta + rng.normal(0, 0.15, 160)
            pq = long_form({"base": base, "champion": base, "challenger": ch})
            passed[true_delta] += gate_decision(pq, "eval", margin=0.01, champion_label="base", n_resamples=500).promote
    assert passed[+0.045] >= 95 and passed[-0.02] <= 2


def test_default_margin_sees_a_usual_gain_on_few_eval_queries_and_still_stops_a_real_regression():
    """At 40 eval queries (two weeks) the default margin promotes a challenger truly better by +0.03
    far more often than a 0.01 margin would (about 2 in 3 weeks against 1 in 3), and a truly worse one (-0.03) stays rare: the choice
    the README argues. Seeded draws, so the counts are fixed."""
    margin = default_of(GateSettings, "regression_margin")
    rng = np.random.default_rng(7)
    draws = {+0.03: [], -0.03: []}
    for true_delta in draws:
        for _ in range(100):
            base = rng.uniform(0.2, 0.9, 40)
            pq = long_form({"base": base, "champion": base, "challenger": base + true_delta + rng.normal(0, 0.15, 40)})
            draws[true_delta].append(pq)
    promoted = {(d, m): sum(gate_decision(pq, "eval", margin=m, champion_label="v1", n_resamples=300).promote
                            for pq in draws[d]) for d in draws for m in (0.01, margin)}
    assert promoted[(+0.03, margin)] >= promoted[(+0.03, 0.01)] + 20
    assert promoted[(+0.03, margin)] >= 60 and promoted[(-0.03, margin)] <= 5


def test_changes_name_what_moves_and_nothing_when_nothing_passed():
    record = {"promote": False, "serving_reranker_is_new": False, "serving_reranker": None,
              "challenger_version": "3", "reranker_version": "3"}
    assert changes(record, {"embedder": None, "reranker": None}) == []
    assert changes(record, {"embedder": None, "reranker": {"version": "2"}}) == ["reranker v2 retired"]
    assert changes({**record, "promote": True}, {}) == ["first stage -> challenger v3"]
    assert changes({**record, "serving_reranker_is_new": True, "serving_reranker": "champion+reranker"}, {}) == ["reranker -> v3"]


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), "flywheel-test")


def test_promotion_moves_champion_keeps_previous_and_serving_model_follows(tracker, tmp_path, base_model_path):
    from flywheel.lib.registry import index

    assert serving_model(tracker, "emb", base_model_path) == (base_model_path, "base")  # no champion yet
    versions = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        index.load_embedder(base_model_path).save_pretrained(str(folder))
        with tracker.run(f"r{i}", {"partition": "w"}):
            versions.append(tracker.log_embedder(folder, "emb"))
    assert tracker.alias_version("emb", CHALLENGER) == versions[1]
    assert promote(tracker, "emb", versions[0])["previous_champion"] is None
    assert serving_model(tracker, "emb", base_model_path) == (str((tmp_path / "m0").resolve()), f"v{versions[0]}")
    moved = promote(tracker, "emb", versions[1])
    assert moved["previous_champion"] == versions[0]
    assert tracker.alias_version("emb", CHAMPION) == versions[1]
    assert tracker.alias_version("emb", PREVIOUS) == versions[0]
    # the trained folder is gone: the MLflow copy serves
    import shutil

    shutil.rmtree(tmp_path / "m1")
    path, label = serving_model(tracker, "emb", base_model_path)
    assert label == f"v{versions[1]}" and index.load_embedder(path).encode(["x"]).shape == (1, 384)


def test_retiring_a_component_removes_its_champion_alias_and_keeps_it_for_rollback(tracker, tmp_path):
    folder = tmp_path / "rr"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with tracker.run("r", {"partition": "w"}) as run_id:
        version = tracker.log_reranker(run_id, folder, "rr")
    promote(tracker, "rr", version)
    assert tracker.alias_version("rr", CHAMPION) == version
    assert retire(tracker, "rr") == version
    assert tracker.alias_version("rr", CHAMPION) is None and tracker.alias_version("rr", PREVIOUS) == version
    assert retire(tracker, "rr") is None  # nothing serves: nothing to retire


def test_keyword_fusion_is_a_component_of_its_own():
    rng = np.random.default_rng(3)
    first = rng.uniform(0.2, 0.8, 120)
    better = long_form({"champion": first, "champion+bm25": first + 0.05 + rng.normal(0, 0.03, 120)}, EVAL_SUITE)
    worse = long_form({"champion": first, "champion+bm25": first - 0.05 + rng.normal(0, 0.03, 120)}, EVAL_SUITE)
    tie = long_form({"champion": first, "champion+bm25": first + rng.normal(0, 0.03, 120)}, EVAL_SUITE)
    g = GateSettings()
    # not serving yet: it must pass the gate's rule against the dense list alone
    assert _decide_hybrid(better, "champion", "champion+bm25", False, g)[0].promote
    assert not _decide_hybrid(worse, "champion", "champion+bm25", False, g)[0].promote
    # serving: it keeps serving unless the eval sets show it significantly worse
    assert _decide_hybrid(tie, "champion", "champion+bm25", True, g)[0].promote
    stop, _ = _decide_hybrid(worse, "champion", "champion+bm25", True, g)
    assert not stop.promote and "significantly worse, it stops serving" in stop.reason
    # what moves in serving.json
    record = {"promote": False, "serving_reranker_is_new": False, "serving_reranker": None, "challenger_version": "2",
              "reranker_version": "2", "serving_hybrid": "champion+bm25", "hybrid_spec": {"fusion": "zscore", "bm25_weight": 0.5}}
    assert changes(record, {"hybrid": None}) == ["keyword fusion -> BM25 zscore fusion, weight 0.5"]
    assert changes(record, {"hybrid": {"fusion": "zscore", "bm25_weight": 0.5}}) == []
    assert changes({**record, "serving_hybrid": None}, {"hybrid": {"fusion": "zscore", "bm25_weight": 0.5}}) == ["keyword fusion -> off"]


def test_until_keyword_fusion_serves_this_weeks_new_queries_count_as_evidence_too():
    """A first week's eval set is too small to see fusion's gain: the eval queries alone leave a
    regression larger than the margin in the CI. This week's new queries, fused with the champion
    (which never trained on them), add their paired changes; together the rule passes, and the
    decision says how many of each it counted. Once fusion serves, only the eval sets decide."""
    rng = np.random.default_rng(5)
    first = rng.uniform(0.2, 0.8, 40)
    small = long_form({"challenger": first, "challenger+bm25": first + 0.02 + rng.normal(0, 0.25, 40)}, EVAL_SUITE)
    fresh_first = rng.uniform(0.2, 0.8, 90)
    fresh = long_form({"champion": fresh_first, "champion+bm25": fresh_first + 0.08 + rng.normal(0, 0.15, 90)},
                      NEW_QUERIES_SUITE).assign(query_id=lambda d: "n" + d["query_id"])
    g = GateSettings()
    alone, evidence = _decide_hybrid(small, "challenger", "challenger+bm25", False, g)
    assert not alone.promote and alone.vs_incumbent.ci_low < -g.regression_margin and "new_queries" not in evidence
    both, evidence = _decide_hybrid(small, "challenger", "challenger+bm25", False, g, fresh)
    assert both.promote and both.vs_incumbent.n == 130 and both.vs_incumbent.candidate == "challenger+bm25"
    assert "40 eval, 90 new this week fused with the champion" in both.reason
    assert evidence["eval"]["n"] == 40 and evidence["new_queries"]["n"] == 90 and evidence["combined"]["n"] == 130
    assert evidence["new_queries"]["delta"] == pytest.approx(0.08, abs=0.04)
    # serving already: the new queries are not consulted
    kept, evidence = _decide_hybrid(small, "challenger", "challenger+bm25", True, g, fresh)
    assert kept.vs_incumbent.n == 40 and "new_queries" not in evidence


def test_the_first_reranker_must_show_a_significant_gain_a_replacement_only_the_plain_rule():
    """Where nothing reranks yet, a reranker adds latency to every query: a gain whose CI includes
    zero is not enough (the plain rule would pass it). Replacing a serving reranker costs nothing
    extra, so the plain rule applies there."""
    rng = np.random.default_rng(5)
    first = rng.uniform(0.2, 0.8, 70)
    noise = rng.normal(0, 0.1, 70)
    small = first + 0.015 + noise - noise.mean()  # +0.015 exactly: the CI straddles zero, excludes -0.03
    clear = first + 0.06 + rng.normal(0, 0.05, 70)
    cand = lambda serving: Candidates("b", "c", "champion", {}, {"version": "5"}, serving)  # noqa: E731
    g = GateSettings()
    pq = long_form({"champion+bm25": first, "rr-new": small, "rr-old": first}, EVAL_SUITE)
    chosen, (d,) = _decide_reranker(pq, "champion+bm25", "rr-new", None, g, cand(None))
    c = d.vs_incumbent
    assert c.delta > 0 and -0.03 < c.ci_low < 0 < c.ci_high
    assert chosen is None and not d.promote and "not significantly above zero" in d.reason
    assert _decide_reranker(pq, "champion+bm25", "rr-new", None, g.with_(reranker_needs_significant_gain=False),
                            cand(None))[0].promote  # the plain rule alone would have served it
    chosen, _ = _decide_reranker(long_form({"champion+bm25": first, "rr-new": clear}, EVAL_SUITE),
                                 "champion+bm25", "rr-new", None, g, cand(None))
    assert chosen is not None and chosen.promote and chosen.vs_incumbent.ci_low > 0
    # replacing a serving reranker: the plain rule (positive, excluding a regression beyond the margin)
    chosen, decisions = _decide_reranker(pq, "champion+bm25", "rr-new", "rr-old", g, cand({"version": "4"}))
    assert decisions[0].promote and chosen is decisions[0]


def test_component_gate_errors_compare_each_decision_with_its_test_split_verdict():
    from flywheel.backfill import component_gate_errors

    better, worse, unclear = ({"ci_low": 0.03, "ci_high": 0.08}, {"ci_low": -0.08, "ci_high": -0.02},
                              {"ci_low": -0.01, "ci_high": 0.02})
    d = {"hybrid": {"promote": False}, "reranker_decisions": [{"promote": True}],
         "test": {"hybrid_vs_first_stage": better, "reranker_vs_first_stage": worse}}
    assert component_gate_errors(d) == ["keyword fusion: blocked a component the test split shows significantly better",
                                        "reranker: promoted a component the test split shows significantly worse"]
    d["test"] = {"hybrid_vs_first_stage": unclear, "reranker_vs_first_stage": unclear}
    assert component_gate_errors(d) == []
    assert component_gate_errors({"hybrid": None, "reranker_decisions": [], "test": {}}) == []
