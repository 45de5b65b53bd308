"""Inference precision (flywheel/lib/registry/inference.py), its settings, and the cost figures
(flywheel/lib/evaluation/cost.py). Speeds are measured in benchmarks/, never asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.config import ConfigError, load_config
from flywheel.lib.beir import Corpus
from flywheel.lib.evaluation import cost
from flywheel.lib.registry import index, inference

TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "what causes insulin resistance",
    "The ribosome translates messenger RNA into a chain of amino acids, which then folds into a protein.",
    "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase in the liver.",
    "CRISPR-Cas9 edits genomes by cutting DNA at a site chosen by a guide RNA.",
]


def _embed(path, precision, max_seq_length=128):
    model = index.load_embedder(path, device="cpu", max_seq_length=max_seq_length, precision=precision)
    return model, index.encode(model, TEXTS, task="document")


@pytest.fixture(scope="module")
def fp32_embeddings(base_model_path):
    return _embed(base_model_path, "fp32")[1]


def test_bf16_embeddings_stay_within_tolerance_of_fp32(base_model_path, fp32_embeddings):
    model, emb = _embed(base_model_path, "bf16")
    assert inference.precision_of(model) == "bf16"
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = (emb * fp32_embeddings).sum(axis=1)
    assert cos.min() > 0.99


def test_int8_embeddings_stay_within_tolerance_of_fp32(base_model_path, fp32_embeddings):
    model, emb = _embed(base_model_path, "int8")
    assert inference.precision_of(model) == "int8"
    cos = (emb * fp32_embeddings).sum(axis=1)
    # int8 moves embeddings further than bf16 does (the benchmark reports what that costs in NDCG@10)
    assert cos.min() > 0.95
    # and it still finds the right text for a query
    q = index.encode(model, ["how do statins reduce cholesterol"], task="query")
    assert int(np.argmax(emb @ q[0])) == 3


def test_reranker_scores_in_bf16_keep_the_fp32_order(base_model_path):
    import torch

    from flywheel.lib.training.reranker import load_reranker

    torch.manual_seed(0)  # the base folder has no scoring head: a seeded fresh one
    ce = load_reranker(base_model_path, device="cpu", max_length=64)
    pairs = [("how do statins reduce cholesterol", t) for t in TEXTS]
    fp32 = ce.predict(pairs, show_progress_bar=False)
    inference.apply_precision(ce, "bf16")
    bf16 = ce.predict(pairs, show_progress_bar=False)
    assert bf16.dtype == np.float32
    assert np.abs(bf16 - fp32).max() < 0.05 * (fp32.max() - fp32.min())
    assert int(np.argmax(bf16)) == int(np.argmax(fp32))


def test_precision_is_applied_once_and_cannot_be_stacked(base_model_path):
    model = index.load_embedder(base_model_path, device="cpu", precision="bf16")
    assert inference.apply_precision(model, "bf16") is model
    with pytest.raises(ValueError, match="already runs at bf16"):
        inference.apply_precision(model, "int8")


def test_resolve_precision(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", "cpu") == "fp32"
    assert inference.resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        inference.resolve_precision("int8", "cuda:0")
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        inference.resolve_precision("fp16", "cpu")


def test_corpus_tables_of_different_precisions_never_mix():
    corpus = Corpus(("a",), ("text",), "0" * 64)
    fp32 = index.corpus_table_name("m1", corpus, 256)
    assert fp32 == "corpus_m1_0000000000_256"  # tables written before precisions keep their names
    assert index.corpus_table_name("m1", corpus, 256, "bf16") == fp32 + "_bf16"
    assert index.corpus_table_name("m1", corpus, 256, "int8") == fp32 + "_int8"


def test_precision_settings_are_validated():
    cfg = load_config({})
    assert cfg.training.inference_precision == "auto" and cfg.reranker.inference_precision == "auto"
    cfg = load_config({"FLYWHEEL_ENCODE_PRECISION": "int8", "FLYWHEEL_RERANKER_PRECISION": "bf16"})
    assert cfg.training.inference_precision == "int8" and cfg.reranker.inference_precision == "bf16"
    with pytest.raises(ConfigError, match="FLYWHEEL_RERANKER_PRECISION='fp16' is not allowed"):
        load_config({"FLYWHEEL_RERANKER_PRECISION": "fp16"})
    with pytest.raises(ConfigError, match="FLYWHEEL_ENCODE_PRECISION='half' is not allowed"):
        load_config({"FLYWHEEL_ENCODE_PRECISION": "half"})


def test_cost_figures_of_an_embedder(base_model_path, tmp_path):
    model = index.load_embedder(base_model_path, device="cpu", max_seq_length=64)
    searched = []
    c = cost.embedder_cost("base", base_model_path, model, TEXTS[:3], TEXTS, search=searched.append)
    assert c.precision == "fp32" and c.queries_timed == 3 and c.passages_timed == len(TEXTS)
    assert len(searched) == 4  # one warm-up, then each timed query searched once
    assert 0 < c.query_ms_p50 <= c.query_ms_p95 and c.passages_per_s > 0
    assert c.size_on_disk_mb == pytest.approx(cost.size_on_disk_mb(base_model_path)) and c.size_on_disk_mb > 50
    half = cost.weights_mb(inference.apply_precision(model, "bf16"))
    assert half == pytest.approx(c.weights_mb / 2, rel=0.05)  # bf16 holds half the bytes
    table = cost.cost_table_markdown([c])
    assert table.splitlines()[2].startswith("| base | fp32 |")


def test_size_on_disk_counts_weights_only_and_names_a_missing_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1_000_000)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"x" * 5_000_000)
    assert cost.size_on_disk_mb(tmp_path) == pytest.approx(2.0)
    with pytest.raises(FileNotFoundError, match="nowhere: no such model folder"):
        cost.size_on_disk_mb(tmp_path / "nowhere")


def test_precision_costs_measure_each_model_at_each_precision(base_model_path):
    costs = cost.precision_costs(
        base_model_path, TEXTS, TEXTS[:2], reranker_path=base_model_path, candidates={"statins": TEXTS[:3]},
        precisions=("fp32", "bf16"), max_seq_length=32, rerank_max_length=32,
    )
    assert [(c.name, c.precision) for c in costs] == [
        ("embedder", "fp32"), ("reranker", "fp32"), ("embedder", "bf16"), ("reranker", "bf16")]
    assert costs[1].queries_timed == 1 and costs[1].passages_timed == 3
    assert costs[2].weights_mb == pytest.approx(costs[0].weights_mb / 2, rel=0.05)
