"""The whole flywheel through Dagster on a real slice of SciFact: simulate three weeks of
traffic, label and cut datasets for each, train the embedder and the reranker for the latest,
benchmark them, promote the challenger through the gate, and show the gate refusing a model
trained on shuffled labels (the report still says why; the champion alias does not move).

Tiny training configs (8 steps, sequence length 64) keep this fast. With 9 eval queries and 8
training steps, whether the challenger is better is not something a test can rely on, so the
whole-graph run's gate allows a tie within 0.2 NDCG@10 (``min_improvement`` -0.2, margin 0.2, no
share of bootstrap resamples required; the defaults are 0, 0.03 and 70%): these tests check the wiring, and the rule itself is tested on
constructed per-query results in test_promotion.py."""

from __future__ import annotations

import json
import shutil
from datetime import date

import dagster as dg
import mlflow
import pandas as pd
import pytest

from flywheel.defs import build_definitions
from flywheel.defs.resources import resources_for
from flywheel.layout import Layout
from flywheel.lib.registry import index
from flywheel.lib import store
from flywheel.lib.simulate.traffic import SimulationConfig, simulate, week_starts

from conftest import small_config

WEEKS = [w.isoformat() for w in week_starts(date(2026, 9, 28), 3)]
LENIENT_GATE = {"regression_margin": 0.2, "min_improvement": -0.2, "min_confidence": 0.0}


def decision_line(report: str) -> str:
    return next(line for line in report.splitlines() if line.startswith("**"))


def checks_of(result) -> dict[str, bool]:
    return {
        e.event_specific_data.asset_check_key.name: e.event_specific_data.passed
        for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def materialized(result) -> set[str]:
    return {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
    }


@pytest.fixture(scope="module")
def flywheel_run(tmp_path_factory, small_beir, base_model_path):
    home = tmp_path_factory.mktemp("home")
    config = small_config(home, small_beir, base_model_path, gate=LENIENT_GATE)
    settings = Layout.of(config.paths)
    summary = simulate(SimulationConfig(
        dataset_dir=small_beir, log_dir=settings.log_dir, lancedb_uri=settings.lancedb_dir,
        model_path=base_model_path, start=config.tiers.start_date, weeks=3, seed=0, encode_max_seq_length=128,
    ))
    defs = build_definitions(resources_for(config))
    instance = dg.DagsterInstance.ephemeral()
    labels_job = defs.resolve_job_def("weekly_labels")
    for week in WEEKS[:-1]:
        assert labels_job.execute_in_process(partition_key=week, instance=instance).success
    result = defs.resolve_job_def("flywheel_weekly").execute_in_process(
        partition_key=WEEKS[-1], instance=instance, raise_on_error=False
    )
    return settings, summary, result, instance, config


def test_simulated_traffic_is_logged_for_every_week(flywheel_run):
    settings, summary, _, _, _ = flywheel_run
    assert summary.weeks == WEEKS
    assert all(n > 0 for n in summary.searches_per_week.values())
    assert summary.repeats > 0 and summary.feedback_events > 0
    assert any(settings.log_dir.rglob("*.jsonl"))


def test_every_stage_materializes_and_every_check_passes(flywheel_run):
    _, _, result, _, _ = flywheel_run
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert materialized(result) == {
        "raw_logs", "relevance_labels", "eval_set", "fewshot_set", "finetune_set", "trained_model",
        "trained_reranker", "benchmark_report", "champion",
    }
    checks = checks_of(result)
    assert checks and all(checks.values()), checks
    assert {"eval_set_size", "finetune_disjoint_from_eval", "challenger_beats_champion"} <= set(checks)


def test_datasets_draw_on_all_weeks_and_keep_eval_out_of_training(flywheel_run):
    settings, _, _, _, config = flywheel_run
    ft = store.read_table(settings.asset("finetune_set", WEEKS[-1]))
    assert len(ft) == 120
    assert set(ft["week"]) == set(WEEKS)  # all labelled weeks to date feed training
    evals = pd.concat(store.read_table(settings.asset("eval_set", w)) for w in WEEKS)
    per_week = evals.groupby("week")["query_key"].nunique()
    assert per_week[WEEKS[0]] == 6 and per_week[WEEKS[1:]].eq(3).all()  # the first week draws more
    assert not set(ft["query_key"]) & set(evals["query_key"])
    labels = pd.concat(store.read_table(settings.asset("relevance_labels", w)) for w in WEEKS)
    # every hard negative was retrieved for its query and judged irrelevant
    judged = labels.set_index(["query_key", "chunk_id"])["grade"]
    assert all(judged.loc[(q, n)].min() == 0 for q, n in zip(ft["query_key"], ft["negative_id"]))


def test_model_is_tracked_registered_and_indexed(flywheel_run):
    settings, _, result, _, _ = flywheel_run
    mats = {
        e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization
        for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
    }
    md = mats["trained_model"].metadata
    run_id = md["mlflow_run_id"].value
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["partition"] == WEEKS[-1]
    assert run.data.params["finetune_sha256"] == md["finetune_sha256"].value
    assert "test_trained_ndcg_at_10" in run.data.metrics and "train_loss" in run.data.metrics
    assert run.data.tags["dagster_run_id"] == result.run_id and run.data.tags["model_kind"] == "embedder"
    assert "training_rows_sha256" in run.data.params and "general_slice_sha256" in run.data.params
    assert "negatives_mined_negatives" in run.data.metrics and "negatives_judged_negatives" in run.data.metrics
    assert "eval_validation_cosine_ndcg@10" in run.data.metrics or "eval_validation_cosine_ndcg_at_10" in run.data.metrics
    assert md["negatives_judged"].value + md["negatives_mined"].value == len(
        store.read_table(settings.asset("finetune_set", WEEKS[-1]))
    )
    version = client.get_model_version_by_alias("flywheel-embedder", "challenger")
    assert version.run_id == run_id
    # the first gate compared against the base (no champion yet) and promoted this version
    assert client.get_model_version_by_alias("flywheel-embedder", "champion").version == version.version
    rr = client.get_model_version_by_alias("flywheel-reranker", "challenger")
    assert client.get_run(rr.run_id).data.tags["model_kind"] == "reranker"
    assert mats["trained_reranker"].metadata["mlflow_run_id"].value == rr.run_id
    assert mats["champion"].metadata["serving_version"].value == str(version.version)
    assert "serving" in index.table_names(settings.lancedb_dir)
    # the saved files load back and the corpus table for the new model exists
    model_dir = md["model_dir"].value
    assert index.model_fingerprint(model_dir) == md["model_id"].value
    assert md["lancedb_table"].value in index.table_names(settings.lancedb_dir)


def test_report_compares_base_and_trained_on_eval_sets_and_test_split(flywheel_run):
    settings, _, result, _, _ = flywheel_run
    report = (settings.reports_dir / f"benchmark-{WEEKS[-1]}.md").read_text()
    assert decision_line(report).startswith(f"**Week {WEEKS[-1]}: first stage: PROMOTE challenger v1")
    # 6 eval queries in the first week, 3 in each later one, drawn whatever the serving model found;
    # a query scores once some compared model surfaced a chunk the judge calls relevant
    record = json.loads(settings.decision(WEEKS[-1]).read_text())
    assert 0 < record["eval_queries"] <= 6 + 3 * (len(WEEKS) - 1)
    # keyword fusion did not serve before this week: the dense first stages are gated alone
    assert (record["first_stage"]["vs_incumbent"]["candidate"], record["test"]["first_stage"]["candidate"]) == \
        ("challenger", "challenger")
    assert f"## eval sets to date (pooled) ({record['eval_queries']} queries)" in report
    assert "test split (human labels) (15 queries)" in report
    # keyword fusion (BM25 from LanceDB's full-text index) is a candidate of its own, pooled and gated;
    # with this test's wide margin it serves, and the reranker reorders the fused list
    assert record["hybrid"]["component"] == "keyword fusion" and record["serving_hybrid"] == "challenger+bm25"
    assert "keyword fusion: SERVE" in decision_line(report) and "- Keyword fusion: challenger+bm25" in report
    assert "| base | challenger | challenger+bm25 | challenger+bm25+reranker |" in report
    assert record["test"]["hybrid_vs_first_stage"]["candidate"] == "challenger+bm25"
    # until it serves, fusion's evidence also counts the week's new queries, fused with the champion
    # (the base here), which never trained on them; their pooled judgments are kept per week
    evidence = record["hybrid_evidence"]
    assert evidence["new_queries"]["n"] > 0 and evidence["combined"]["n"] == evidence["eval"]["n"] + evidence["new_queries"]["n"]
    assert record["hybrid"]["vs_incumbent"]["n"] == evidence["combined"]["n"] and "this week's new queries" in report
    assert settings.asset("new_queries_pool", WEEKS[-1]).exists()
    # the evidence: the rule in words, the minimum detectable change, and what pooling added
    assert "Rule: A candidate replaces what serves" in report and "minimum detectable NDCG@10 change" in report
    assert "Pooling: every compared model's top eval chunks are judged before scoring" in report
    for metric in ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@20", "recall@40", "mrr@10"):
        assert f"| {metric} |" in report
    assert "First relevant chunk" in report
    assert "| challenger+bm25+reranker vs challenger+bm25 |" in report and "wins / losses / ties" in report
    assert "| challenger+bm25+reranker | rerank (cross-encoder) |" in report  # latency p50/p95
    assert "| challenger+bm25 | retrieval (encode query + LanceDB search + BM25 search) |" in report
    served = json.loads(settings.serving_record.read_text())
    assert served["hybrid"] == {"fusion": "zscore", "bm25_weight": 0.5}
    mat = next(
        e.event_specific_data.materialization for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
        and e.event_specific_data.materialization.asset_key.to_user_string() == "benchmark_report"
    )
    assert 0.0 < mat.metadata["ndcg@10_base"].value <= 1.0
    # plots: embedded in the metadata Markdown (2 per suite), as PNG files, in the HTML page and in MLflow
    assert mat.metadata["report"].value.count("](data:image/png;base64,") == 4
    pngs = sorted(p.name for p in settings.reports_dir.glob(f"benchmark-{WEEKS[-1]}-*.png"))
    assert len(pngs) == 4 and all((settings.reports_dir / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    page = (settings.reports_dir / f"benchmark-{WEEKS[-1]}.html").read_text()
    assert mat.metadata["report_html"].value.endswith(".html") and page.count('<img alt="') == 4
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{settings.mlflow_dir / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(mat.metadata["mlflow_run_id"].value, "report")}
    assert {"report/benchmark_report.md", "report/benchmark_report.html",
            "report/test-split-human-labels-recall-at-k.png"} <= logged, logged


def test_rematerializing_a_week_replaces_it(flywheel_run):
    settings, _, _, instance, config = flywheel_run
    path = settings.asset("finetune_set", WEEKS[-1])
    before = store.read_table(path)
    defs = build_definitions(resources_for(config))
    res = defs.resolve_job_def("flywheel_weekly").execute_in_process(
        partition_key=WEEKS[-1], instance=instance,
        asset_selection=[dg.AssetKey(k) for k in ("raw_logs", "relevance_labels", "eval_set", "finetune_set")],
    )
    assert res.success
    pd.testing.assert_frame_equal(before, store.read_table(path))


def test_gate_blocks_a_model_trained_on_shuffled_labels(flywheel_run, tmp_path):
    settings, _, _, _, config = flywheel_run
    home = tmp_path / "home"
    shutil.copytree(settings.home, home)  # the registry too: v1 is the champion to beat
    serving = json.loads((home / "serving.json").read_text())
    (home / "serving.json").write_text(json.dumps({**serving, "reranker": None}))  # the first stage serves alone
    # the default rule (a gain is required) with the test's wide margin; a reranker over the top 1
    # changes nothing, so it cannot pass either: nothing may move
    resources = resources_for(
        config, paths={"home": str(home), "log_dir": str(home / "logs"), "mlflow_uri": ""},
        gate={"min_improvement": 0.0}, reranker={"depth": 1},
        training={"shuffle_labels": True, "learning_rate": 1e-3, "max_steps": 20},
    )
    tracking = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    champion_before = client.get_model_version_by_alias("flywheel-embedder", "champion").version
    defs = build_definitions(resources)
    result = defs.resolve_job_def("flywheel_weekly").execute_in_process(
        partition_key=WEEKS[-1], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
        asset_selection=[dg.AssetKey(k) for k in ("trained_model", "trained_reranker", "benchmark_report", "champion")],
    )
    checks = checks_of(result)
    assert checks["challenger_beats_champion"] is False
    assert {"trained_model", "trained_reranker", "benchmark_report"} <= materialized(result)
    assert "champion" not in materialized(result)  # the blocking gate stopped the promotion
    assert not result.success
    # the report says so, and why
    report = (home / "reports" / f"benchmark-{WEEKS[-1]}.md").read_text()
    line = decision_line(report)
    assert f"first stage: KEEP v{champion_before}" in line and "reranker: NONE" in line
    # keyword fusion serves (week 3 put it there): the first stages are compared as they would serve,
    # fused with BM25, on the eval sets and in the test split's verdict; the dense ones alone beside it
    assert "challenger+bm25 is not better than champion+bm25" in report
    assert "compared fused with BM25 as it serves" in line
    record = json.loads(Layout(home=home, log_dir=home / "logs").decision(WEEKS[-1]).read_text())
    gated = record["first_stage"]["vs_incumbent"]
    assert (gated["incumbent"], gated["candidate"]) == ("champion+bm25", "challenger+bm25")
    assert record["first_stage"]["vs_base"]["incumbent"] == "base+bm25"
    assert record["test"]["first_stage"]["candidate"] == "challenger+bm25"
    assert record["test"]["first_stage_dense"]["candidate"] == "challenger"
    # the champion alias did not move; the shuffled model is only a challenger
    assert client.get_model_version_by_alias("flywheel-embedder", "champion").version == champion_before
    assert client.get_model_version_by_alias("flywheel-embedder", "challenger").version != champion_before
