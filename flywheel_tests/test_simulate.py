"""Demo traffic: deterministic, train queries only, week by week, and the poisoned-week switch."""

import json
from dataclasses import replace
from datetime import date

import pytest

from flywheel.config import TrainingSettings, default_of
from flywheel.lib.beir import load_beir
from flywheel.lib.simulate.traffic import SimulationConfig, plan_traffic, simulate


def read_records(log_dir):
    out = []
    for path in sorted(log_dir.rglob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def lancedb_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lancedb")


def config(small_beir, base_model_path, log_dir, lancedb_dir, **kw):
    return SimulationConfig(
        dataset_dir=small_beir, log_dir=log_dir, lancedb_uri=lancedb_dir, model_path=base_model_path,
        start=date(2026, 9, 28), weeks=3, seed=0, encode_max_seq_length=128, **kw,
    )


def test_plan_uses_every_train_query_with_repeats_and_is_seeded(small_beir, base_model_path, tmp_path):
    cfg = config(small_beir, base_model_path, tmp_path, tmp_path)
    ids = list(load_beir(small_beir).split_queries("train"))
    plan = plan_traffic(ids, cfg)
    assert {q for _, q, _ in plan} == set(ids) and len(plan) > len(ids)
    assert plan == plan_traffic(ids, cfg)
    assert plan != plan_traffic(ids, replace(cfg, seed=1))
    assert all(ts.date() >= date(2026, 9, 28) for _, _, ts in plan)


def test_logs_are_deterministic_and_never_use_test_queries(small_beir, base_model_path, tmp_path, lancedb_dir):
    a = simulate(config(small_beir, base_model_path, tmp_path / "a", lancedb_dir))
    simulate(config(small_beir, base_model_path, tmp_path / "b", lancedb_dir))
    ra, rb = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    key = lambda r: (r["request_id"], r["type"])
    assert sorted(ra, key=key) == sorted(rb, key=key)
    ds = load_beir(small_beir)
    test_texts = set(ds.split_queries("test").values())
    searches = [r for r in ra if r["type"] == "search"]
    assert len(searches) == a.searches and not {r["query"] for r in searches} & test_texts
    assert all(len(r["results"]) == 20 and [c["rank"] for c in r["results"]] == list(range(1, 21)) for r in searches)
    feedback = [r for r in ra if r["type"] == "feedback"]
    assert feedback and any(f["clicks"] for f in feedback) and any(f["cited"] for f in feedback)
    assert {f["thumbs"] for f in feedback} >= {"up", "down"}


def test_weeks_one_at_a_time_add_up_to_the_whole_and_record_the_serving_model(small_beir, base_model_path, tmp_path, lancedb_dir):
    whole = simulate(config(small_beir, base_model_path, tmp_path / "whole", lancedb_dir))
    parts = [
        simulate(config(small_beir, base_model_path, tmp_path / "parts", lancedb_dir), only_weeks=[w],
                 serving=(base_model_path, f"v{w}"))
        for w in range(3)
    ]
    assert sum(p.searches for p in parts) == whole.searches
    versions = {r["retriever_version"] for r in read_records(tmp_path / "parts") if r["type"] == "search"}
    assert versions == {"v0", "v1", "v2"}


def test_poisoned_week_relogs_history_with_wrong_texts(small_beir, base_model_path, tmp_path, lancedb_dir):
    clean = simulate(config(small_beir, base_model_path, tmp_path / "clean", lancedb_dir))
    poisoned = simulate(config(small_beir, base_model_path, tmp_path / "bad", lancedb_dir, poison_weeks=(2,)))
    last = list(clean.searches_per_week)[-1]
    assert poisoned.searches_per_week[last] > clean.searches_per_week[last]
    assert clean.unique_queries == poisoned.unique_queries
    texts = load_beir(small_beir).corpus.text_by_id
    searches = [r for r in read_records(tmp_path / "bad") if r["type"] == "search"]
    wrong = sum(c["text"] != texts[c["chunk_id"]] for r in searches for c in r["results"])
    right = sum(c["text"] == texts[c["chunk_id"]] for r in searches for c in r["results"])
    assert wrong > 0.4 * (wrong + right) and right > 0


def test_when_keyword_fusion_serves_the_app_logs_the_fused_list(small_beir, base_model_path, tmp_path, lancedb_dir):
    """The simulated app serves what serves: with keyword fusion on, each search logs the top 20 of
    the dense list fused with BM25, the same fusion the weekly report ranks."""
    from flywheel.lib.registry import hybrid, index

    fusion = {"fusion": "zscore", "bm25_weight": 0.5}
    dense_cfg = config(small_beir, base_model_path, tmp_path / "dense", lancedb_dir)
    simulate(dense_cfg, only_weeks=[0])
    simulate(config(small_beir, base_model_path, tmp_path / "fused", lancedb_dir), only_weeks=[0], hybrid=fusion)
    dense = {r["request_id"]: r for r in read_records(tmp_path / "dense") if r["type"] == "search"}
    fused = {r["request_id"]: r for r in read_records(tmp_path / "fused") if r["type"] == "search"}
    assert dense.keys() == fused.keys()
    assert {r["retriever"] for r in fused.values()} == {"lancedb-dense+bm25-zscore"}
    # what the report's fusion ranks for the same queries, recomputed here
    ds = load_beir(small_beir)
    model = index.load_embedder(base_model_path, max_seq_length=128, precision=dense_cfg.precision)
    table = index.ensure_corpus_table(lancedb_dir, model, index.corpus_encoder_id(base_model_path), ds.corpus,
                                      units=dense_cfg.sentence_units)
    bm25 = hybrid.ensure_bm25_table(lancedb_dir, ds.corpus)
    queries = [r["query"] for r in fused.values()]
    expected = hybrid.hybrid_search(model, lancedb_dir, table, bm25, queries, k=100, **fusion)
    for r, want in zip(fused.values(), expected):
        assert [c["chunk_id"] for c in r["results"]] == [d for d, _ in want[:20]]
    changed = sum([c["chunk_id"] for c in fused[k]["results"]] != [c["chunk_id"] for c in dense[k]["results"]] for k in fused)
    assert changed > len(fused) // 4  # BM25 really changed what users saw


def test_the_app_ranks_with_sentence_units_as_the_serving_first_stage_does(small_beir, base_model_path, tmp_path,
                                                                          lancedb_dir):
    """The logs show what serves: each chunk scored with its best sentence (the table every weekly
    model and the ``serving`` table search), not one vector per chunk, unless units are off."""
    from flywheel.lib.registry import index

    with_units = config(small_beir, base_model_path, tmp_path / "units", lancedb_dir)
    assert with_units.sentence_units == default_of(TrainingSettings, "sentence_units") > 0
    simulate(with_units, only_weeks=[0])
    simulate(replace(with_units, log_dir=tmp_path / "plain", sentence_units=0.0), only_weeks=[0])
    ds = load_beir(small_beir)
    model = index.load_embedder(base_model_path, max_seq_length=128, precision=with_units.precision)
    model_id = index.corpus_encoder_id(base_model_path)
    logged = {}
    for name, units in (("units", with_units.sentence_units), ("plain", 0.0)):
        searches = [r for r in read_records(tmp_path / name) if r["type"] == "search"]
        table = index.ensure_corpus_table(lancedb_dir, model, model_id, ds.corpus, units=units)
        want = index.search(lancedb_dir, table, index.encode(model, [r["query"] for r in searches], task="query"),
                            with_units.top_k)
        assert [[c["chunk_id"] for c in r["results"]] for r in searches] == [[d for d, _ in w] for w in want]
        logged[name] = [[c["chunk_id"] for c in r["results"]] for r in searches]
    assert sum(a != b for a, b in zip(logged["units"], logged["plain"])) > len(logged["units"]) // 4
