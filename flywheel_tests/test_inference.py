"""Inference precision (flywheel/lib/registry/inference.py), its settings, and the cost figures
(flywheel/lib/evaluation/cost.py). Speeds are measured in benchmarks/, never asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.config import ConfigError, load_config
from flywheel.lib.beir import Corpus
from flywheel.lib.evaluation import cost
from flywheel.lib.registry import index, inference, openvino_backend

TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures in older adults.",
    "what causes insulin resistance",
    "The ribosome translates messenger RNA into a chain of amino acids, which then folds into a protein.",
    "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase in the liver.",
    "CRISPR-Cas9 edits genomes by cutting DNA at a site chosen by a guide RNA.",
]


def _embed(path, precision, max_seq_length=128, query_precision="auto"):
    model = index.load_embedder(path, device="cpu", max_seq_length=max_seq_length, precision=precision,
                                query_precision=query_precision)
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
    monkeypatch.setattr(inference, "openvino_installed", lambda: True)
    assert inference.resolve_precision("auto", "cpu") == "openvino-int8"
    monkeypatch.setattr(inference, "openvino_installed", lambda: False)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", "cpu") == "fp32"
    assert inference.resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        inference.resolve_precision("int8", "cuda:0")
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        inference.resolve_precision("fp16", "cpu")
    assert inference.resolve_precision("openvino-int8", "cpu") == "openvino-int8"
    with pytest.raises(ValueError, match="'openvino-bf16' .* runs on the CPU only"):
        inference.resolve_precision("openvino-bf16", "cuda")


def test_resolve_query_precision():
    # auto: bf16 queries beside an int8 corpus on OpenVINO; the corpus's own precision otherwise
    assert inference.resolve_query_precision("auto", "openvino-int8") == "openvino-bf16"
    for corpus in ("fp32", "bf16", "int8", "openvino-bf16"):
        assert inference.resolve_query_precision("auto", corpus) == corpus
    assert inference.resolve_query_precision("openvino-int8", "openvino-int8") == "openvino-int8"
    assert inference.resolve_query_precision("fp32", "openvino-int8") == "fp32"
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        inference.resolve_query_precision("fp16", "fp32")


def test_training_precision_is_bf16_where_it_runs_natively(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.training_bf16("auto", "cpu") is True
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.training_bf16("auto", "cpu") is False
    assert inference.training_bf16("bf16", "cpu") is True and inference.training_bf16("fp32", "cpu") is False
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        inference.training_bf16("fp16", "cpu")
    assert load_config({}).training.precision == "auto"
    assert load_config({"FLYWHEEL_TRAIN_PRECISION": "fp32"}).training.precision == "fp32"
    with pytest.raises(ConfigError, match="FLYWHEEL_TRAIN_PRECISION='int8' is not allowed"):
        load_config({"FLYWHEEL_TRAIN_PRECISION": "int8"})


def test_corpus_tables_of_different_precisions_never_mix():
    corpus = Corpus(("a",), ("text",), "0" * 64)
    fp32 = index.corpus_table_name("m1", corpus, 256)
    assert fp32 == "corpus_m1_0000000000_256"  # tables written before precisions keep their names
    assert index.corpus_table_name("m1", corpus, 256, "bf16") == fp32 + "_bf16"
    assert index.corpus_table_name("m1", corpus, 256, "int8") == fp32 + "_int8"
    names = {index.corpus_table_name("m1", corpus, 256, p) for p in inference.PRECISIONS}
    assert len(names) == len(inference.PRECISIONS)
    assert index.corpus_table_name("m1", corpus, 256, "openvino-int8") == fp32 + "_openvino_int8"


def test_precision_settings_are_validated():
    cfg = load_config({})
    assert cfg.training.inference_precision == "auto" and cfg.reranker.inference_precision == "auto"
    cfg = load_config({"FLYWHEEL_ENCODE_PRECISION": "int8", "FLYWHEEL_RERANKER_PRECISION": "bf16"})
    assert cfg.training.inference_precision == "int8" and cfg.reranker.inference_precision == "bf16"
    cfg = load_config({"FLYWHEEL_ENCODE_PRECISION": "openvino-bf16", "FLYWHEEL_RERANKER_PRECISION": "openvino-int8"})
    assert cfg.training.inference_precision == "openvino-bf16" and cfg.reranker.inference_precision == "openvino-int8"
    with pytest.raises(ConfigError, match="FLYWHEEL_RERANKER_PRECISION='fp16' is not allowed"):
        load_config({"FLYWHEEL_RERANKER_PRECISION": "fp16"})
    with pytest.raises(ConfigError, match="FLYWHEEL_ENCODE_PRECISION='half' is not allowed"):
        load_config({"FLYWHEEL_ENCODE_PRECISION": "half"})
    assert load_config({}).training.query_precision == "auto"
    assert load_config({"FLYWHEEL_QUERY_PRECISION": "openvino-int8"}).training.query_precision == "openvino-int8"
    with pytest.raises(ConfigError, match="FLYWHEEL_QUERY_PRECISION='int4' is not allowed"):
        load_config({"FLYWHEEL_QUERY_PRECISION": "int4"})


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
    assert [c.queries_timed for c in costs[::2]] == [2, 2] and all(c.query_ms_p50 > 0 for c in costs)
    assert costs[2].weights_mb == pytest.approx(costs[0].weights_mb / 2, rel=0.05)


# OpenVINO (flywheel/lib/registry/openvino_backend.py). Thresholds hold with a margin: measured at
# seq 128 on these texts, openvino-bf16 keeps cosine 0.9999 to fp32 and openvino-int8 (default
# calibration) 0.997; cross-encoder logits correlate 0.9998 (bf16) and 0.99 (int8) on 15 pairs.


@pytest.mark.parametrize("precision, min_cos", [("openvino-bf16", 0.999), ("openvino-int8", 0.98)])
def test_openvino_embeddings_stay_within_tolerance_of_fp32(base_model_path, fp32_embeddings, precision, min_cos):
    model, emb = _embed(base_model_path, precision, query_precision=precision)  # one network, queries alike
    assert inference.precision_of(model) == inference.query_precision_of(model) == precision
    assert len(openvino_backend.transformer_modules(model)) == 1
    assert type(openvino_backend.transformer_modules(model)[0].model).__name__ == "_OpenVINOModel"
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (emb * fp32_embeddings).sum(axis=1).min() > min_cos
    q = index.encode(model, ["how do statins reduce cholesterol"], task="query")
    assert int(np.argmax(emb @ q[0])) == 3
    # the cost table sees the OpenVINO network's weights (fp16 as saved for bf16, int8 for int8)
    expected = (40, 50) if precision == "openvino-bf16" else (15, 30)
    assert expected[0] < cost.weights_mb(model) < expected[1]


def test_openvino_runs_both_routes_of_a_query_document_model(base_model_path):
    # the corpus loss's models are Routers: a query route and a document route, each its own
    # network; both run on OpenVINO (a document route left on PyTorch encoded at the fp32 rate)
    import torch

    from flywheel.lib.training.corpus import query_document_model

    fp32 = query_document_model(base_model_path, device="cpu", max_seq_length=128)
    with torch.no_grad():
        for p in fp32[0].sub_modules["query"][0].parameters():
            p.add_(0.01 * torch.randn_like(p))  # a "trained" query route: not the base's weights
    ov = query_document_model(base_model_path, device="cpu", max_seq_length=128)
    ov.load_state_dict(fp32.state_dict())
    inference.apply_precision(ov, "openvino-bf16")
    modules = openvino_backend.transformer_modules(ov)
    assert [type(m.model).__name__ for m in modules] == ["_OpenVINOModel", "_OpenVINOModel"]
    for task in ("query", "document"):
        a, b = index.encode(fp32, TEXTS, task=task), index.encode(ov, TEXTS, task=task)
        assert (a * b).sum(axis=1).min() > 0.999
    q, d = index.encode(ov, TEXTS, task="query"), index.encode(ov, TEXTS, task="document")
    assert not np.allclose(q, d, atol=1e-3)  # each route runs its own network
    assert 80 < cost.weights_mb(ov) < 100  # both networks counted


def test_int8_corpus_on_openvino_encodes_queries_at_bf16_unless_told(base_model_path, fp32_embeddings):
    """Int8 activations cost a query encoder retrieval quality that they do not cost the corpus
    (benchmarks/retrieval.py and training.py measure both side by side), so the default runs an
    embedder's queries at openvino-bf16 beside an openvino-int8 corpus: a single-tower model becomes
    a query/document Router of two copies, each route its own network at its own precision."""
    from flywheel.lib.training.corpus import query_document_model

    queries = ["how do statins reduce cholesterol", "gene editing with a guide rna"]
    split = index.load_embedder(base_model_path, device="cpu", max_seq_length=128, precision="openvino-int8")
    assert (inference.precision_of(split), inference.query_precision_of(split)) == ("openvino-int8", "openvino-bf16")
    assert inference.precision_label(split) == "openvino-int8 (queries openvino-bf16)"
    assert sorted(inference.query_document_routes(split)) == ["document", "query"]
    int8 = index.load_embedder(base_model_path, device="cpu", max_seq_length=128, precision="openvino-int8",
                               query_precision="openvino-int8")
    bf16 = index.load_embedder(base_model_path, device="cpu", max_seq_length=128, precision="openvino-bf16")
    assert len(openvino_backend.transformer_modules(int8)) == 1 and inference.precision_label(int8) == "openvino-int8"
    # documents as the int8 network encodes them (the corpus table is the same), queries as bf16's
    assert np.allclose(index.encode(split, TEXTS), index.encode(int8, TEXTS), atol=1e-6)
    q = index.encode(split, queries, task="query")
    assert np.allclose(q, index.encode(bf16, queries, task="query"), atol=1e-6)
    assert not np.allclose(q, index.encode(int8, queries, task="query"), atol=1e-4)  # another network
    assert (q @ index.encode(split, TEXTS).T).argmax(axis=1).tolist() == [3, 4]
    # the cost table counts both networks and says what each side runs at
    assert cost.weights_mb(int8) + 40 < cost.weights_mb(split) < cost.weights_mb(int8) + 50
    assert "openvino-int8 (queries openvino-bf16)" in cost.cost_table_markdown(
        [cost.embedder_cost("embedder", base_model_path, split, queries, TEXTS[:2])])
    # a query-only fine-tune is a Router already: its own routes take the two precisions
    routed = query_document_model(base_model_path, device="cpu", max_seq_length=128)
    inference.apply_precision(routed, "openvino-int8", query_precision="auto")
    assert inference.precision_label(routed) == "openvino-int8 (queries openvino-bf16)"
    assert np.allclose(index.encode(routed, queries, task="query"), q, atol=1e-6)
    # PyTorch precisions split the same way; a plain model cannot run its sides apart
    torch_split = index.load_embedder(base_model_path, device="cpu", max_seq_length=128, query_precision="bf16")
    assert np.allclose(index.encode(torch_split, TEXTS), fp32_embeddings, atol=1e-6)
    assert (index.encode(torch_split, TEXTS, task="query") * fp32_embeddings).sum(axis=1).min() > 0.99
    plain = index.load_embedder(base_model_path, device="cpu", max_seq_length=128)
    with pytest.raises(ValueError, match="no query and document routes"):
        inference.apply_precision(plain, "fp32", query_precision="bf16")


def test_openvino_cross_encoder_scores_correlate_with_fp32(base_model_path):
    import torch

    from flywheel.lib.training.reranker import load_reranker

    pairs = [(q, t) for q in ("how do statins reduce cholesterol", "gene editing with a guide rna",
                              "vitamin d and bone fractures") for t in TEXTS]
    logits = {}
    for precision in ("fp32", "openvino-bf16", "openvino-int8"):
        torch.manual_seed(0)  # the same seeded fresh scoring head each time
        ce = load_reranker(base_model_path, device="cpu", max_length=64, precision=precision)
        logits[precision] = ce.predict(pairs, show_progress_bar=False, activation_fn=torch.nn.Identity())
        assert logits[precision].dtype == np.float32 and logits[precision].shape == (len(pairs),)
    assert np.corrcoef(logits["fp32"], logits["openvino-bf16"])[0, 1] > 0.99
    assert np.corrcoef(logits["fp32"], logits["openvino-int8"])[0, 1] > 0.9


def test_openvino_precision_cannot_be_stacked(base_model_path):
    model = index.load_embedder(base_model_path, device="cpu", max_seq_length=32, precision="openvino-bf16")
    assert inference.apply_precision(model, "openvino-bf16") is model
    with pytest.raises(ValueError, match="already runs at openvino-bf16"):
        inference.apply_precision(model, "int8")
    torch_bf16 = index.load_embedder(base_model_path, device="cpu", max_seq_length=32, precision="bf16")
    with pytest.raises(ValueError, match="already runs at bf16"):
        inference.apply_precision(torch_bf16, "openvino-int8")


def test_openvino_cache_is_reused_and_keyed_by_calibration(base_model_path, tmp_path):
    def load(calibration):
        model = index.load_embedder(base_model_path, device="cpu", max_seq_length=64, precision="openvino-int8",
                                    calibration_texts=calibration, cache_dir=tmp_path)
        return index.encode(model, TEXTS, task="document")

    before = openvino_backend.CONVERSIONS.copy()
    first = load(TEXTS)
    saved = sorted(tmp_path.glob("openvino-int8-*/model.xml"))
    assert len(saved) == 1 and not list(tmp_path.glob("*.tmp*"))
    mtime = saved[0].stat().st_mtime_ns
    after_first = openvino_backend.CONVERSIONS.copy()
    assert after_first[("openvino-int8", "quantize")] == before[("openvino-int8", "quantize")] + 1
    again = load(TEXTS)  # the same weights in the same process: the network converted a moment ago
    assert openvino_backend.CONVERSIONS[("openvino-int8", "memory-hit")] == after_first[("openvino-int8", "memory-hit")] + 1
    openvino_backend._CONVERTED.clear()  # as in a new process: read from the cache folder
    second = load(TEXTS)
    assert openvino_backend.CONVERSIONS[("openvino-int8", "quantize")] == after_first[("openvino-int8", "quantize")]
    assert openvino_backend.CONVERSIONS[("openvino-int8", "cache-hit")] == after_first[("openvino-int8", "cache-hit")] + 1
    assert saved[0].stat().st_mtime_ns == mtime
    assert np.array_equal(first, second) and np.array_equal(first, again)  # the network that was quantized
    # the key changes with the weights, the precision, the calibration inputs and the sequence length
    batch = {"input_ids": np.array([[101, 7, 102]]), "attention_mask": np.ones((1, 3), dtype=np.int64)}
    other = {**batch, "input_ids": np.array([[101, 8, 102]])}
    key = openvino_backend.cache_key("w", "openvino-int8", [batch], 64, "last_hidden_state")
    assert key == openvino_backend.cache_key("w", "openvino-int8", [dict(batch)], 64, "last_hidden_state")
    assert len({key, openvino_backend.cache_key("w2", "openvino-int8", [batch], 64, "last_hidden_state"),
                openvino_backend.cache_key("w", "openvino-bf16", None, 64, "last_hidden_state"),
                openvino_backend.cache_key("w", "openvino-int8", [other], 64, "last_hidden_state"),
                openvino_backend.cache_key("w", "openvino-int8", [batch], 128, "last_hidden_state")}) == 5


def test_a_network_read_back_from_the_openvino_cache_computes_what_the_converted_one_did(base_model_path, tmp_path):
    """bf16 too: saved without fp16 weight compression, which would round every weight once more
    and move a query's vector (and a search's order) depending on whether the cache was warm."""
    def load():
        openvino_backend._CONVERTED.clear()  # each load as in a new process
        model = index.load_embedder(base_model_path, device="cpu", max_seq_length=64, precision="openvino-bf16",
                                    cache_dir=tmp_path)
        return index.encode(model, TEXTS, task="document")

    before = openvino_backend.CONVERSIONS[("openvino-bf16", "cache-hit")]
    converted, read_back = load(), load()
    assert openvino_backend.CONVERSIONS[("openvino-bf16", "cache-hit")] == before + 1
    assert np.array_equal(converted, read_back)


def test_the_openvino_cache_keeps_the_most_recently_used_networks(tmp_path):
    import os

    for i, name in enumerate(["a", "b", "c", "d"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.xml").write_text("<net/>")
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))  # a oldest, d newest
    (tmp_path / "e.tmp123").mkdir()  # another process still writing: never counted or removed
    (tmp_path / "e.tmp123" / "model.xml").write_text("<net/>")
    os.utime(tmp_path / "a", (2_000_000, 2_000_000))  # a read back since: used most recently
    assert sorted(openvino_backend.prune_cache(tmp_path, keep=2)) == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d", "e.tmp123"]


def test_openvino_calibration_inputs_are_a_fixed_sample(base_model_path):
    from flywheel.lib.training.reranker import load_reranker

    model = index.load_embedder(base_model_path, device="cpu", max_seq_length=16)
    texts = [f"passage number {i} about topic {i % 7}" for i in range(1000)]
    batches = openvino_backend.calibration_inputs(model, texts, pairs=False)
    assert sum(len(b["input_ids"]) for b in batches) == openvino_backend.CALIBRATION_MAX_TEXTS
    again = openvino_backend.calibration_inputs(model, texts, pairs=False)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    assert batches[0]["input_ids"].shape[1] <= 16  # tokenized as the model tokenizes: at its max length
    ce = load_reranker(base_model_path, device="cpu", max_length=32)
    pair_batches = openvino_backend.calibration_inputs(ce, TEXTS, pairs=True)
    assert (pair_batches[0]["token_type_ids"] == 1).any()  # (first sentence, text) pairs
    assert openvino_backend.first_sentence("Statins work. They lower LDL.") == "Statins work"
    with pytest.raises(ValueError, match="needs calibration texts"):
        openvino_backend.calibration_inputs(model, ["", "  "], pairs=False)


def test_missing_openvino_packages_name_the_setting(base_model_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    inference.require_openvino("openvino-bf16")  # bf16 needs openvino only
    with pytest.raises(ImportError, match=r"'openvino-int8' \(FLYWHEEL_ENCODE_PRECISION / FLYWHEEL_QUERY_PRECISION / "
                                          r"FLYWHEEL_RERANKER_PRECISION\) "
                                          r"needs the nncf package"):
        index.load_embedder(base_model_path, device="cpu", precision="openvino-int8")


def test_openvino_cross_encoder_runs_one_static_network_per_padded_shape(base_model_path):
    """A reranker on OpenVINO pads each batch to a multiple of SEQ_BUCKET tokens and runs the network
    compiled for that static shape: a pair scores the same beside short or long partners (padding is
    masked), as the dynamic network scores it, and a shape seen again is not compiled again."""
    import openvino as ov
    import torch

    from flywheel.lib.training.reranker import load_reranker

    torch.manual_seed(0)
    ce = load_reranker(base_model_path, device="cpu", max_length=128, precision="openvino-bf16")
    static = openvino_backend.transformer_modules(ce)[0].model.compiled
    assert isinstance(static, openvino_backend.StaticShapes)
    query, short, long = "statins and cholesterol", TEXTS[3], " ".join(TEXTS)
    identity = torch.nn.Identity()
    alone = ce.predict([(query, short)], activation_fn=identity, show_progress_bar=False)
    beside_long = ce.predict([(query, short), (query, long)], activation_fn=identity, show_progress_bar=False)
    assert alone[0] == pytest.approx(beside_long[0], abs=0.02)
    shapes = list(static.compiled)
    assert all(tokens % openvino_backend.SEQ_BUCKET == 0 for _, tokens in shapes) and len(shapes) == 2
    ce.predict([(query, long), (query, TEXTS[0])], activation_fn=identity, show_progress_bar=False)
    assert static.compilations == 2  # (2, 64) again: no new compilation

    dynamic = ov.Core().compile_model(static.ov_model, "CPU", static.compile_config)
    features = ce.tokenizer([query, query], [short, long], padding=True, truncation=True, max_length=128,
                            return_tensors="np")
    feed = {k: features[k] for k in openvino_backend.transformer_modules(ce)[0].model.input_names}
    assert np.allclose(static(feed)[0], dynamic(feed)[0], atol=0.02)


def test_openvino_static_shapes_are_bounded_by_the_models_positions():
    shapes = openvino_backend.StaticShapes(ov_model=None, compile_config={}, max_positions=512)
    assert [shapes.padded_length(n) for n in (1, 32, 33, 128, 500, 512)] == [32, 32, 64, 128, 512, 512]
    assert [openvino_backend.StaticShapes(None, {}, max_positions=100).padded_length(n) for n in (90, 99)] == [96, 100]
    assert openvino_backend.StaticShapes(None, {}, max_positions=None).padded_length(600) == 608


def test_reranker_scores_pairs_on_the_words_its_tokens_can_hold(base_model_path):
    """score_pairs cuts each passage after max_length words before tokenizing: the model still sees
    the same tokens, so the scores equal predict's on the whole passages."""
    import torch

    from flywheel.lib.training.reranker import head_words, load_reranker, score_pairs

    assert head_words("a  b\tc d", 3) == "a  b\tc" and head_words("a b", 5) == "a b"
    torch.manual_seed(0)
    ce = load_reranker(base_model_path, device="cpu", max_length=32, precision="fp32")
    passages = [" ".join(TEXTS * 3), TEXTS[0], TEXTS[2] + " " + TEXTS[4]]
    whole = ce.tokenizer(["gene editing"] * 3, passages, truncation=True, max_length=32)["input_ids"]
    cut = ce.tokenizer(["gene editing"] * 3, [head_words(p, 32) for p in passages], truncation=True,
                       max_length=32)["input_ids"]
    assert whole == cut and len(head_words(passages[0], 32)) < len(passages[0])
    expected = ce.predict([("gene editing", p) for p in passages], show_progress_bar=False)
    assert np.allclose(score_pairs(ce, "gene editing", passages), expected)
