"""BM25 beside the vector index, and their fusion (flywheel/lib/registry/hybrid.py)."""

from __future__ import annotations

import hashlib

import pytest

from flywheel.lib.beir import Corpus
from flywheel.lib.registry import hybrid, index

TEXTS = [
    "Protein folding in the endoplasmic reticulum is assisted by chaperones.",
    "Misfolded proteins trigger the unfolded protein response in stressed cells.",
    "Heat shock proteins help newly made polypeptides reach their native fold.",
    "Chaperone networks prevent aggregation of proteins during cellular stress.",
    "Cryo-electron microscopy resolves the structure of folding intermediates.",
    "Quarterly sales figures for the retail division were filed as form KX7Q2.",
    "Aggregation of amyloid proteins is linked to neurodegenerative disease.",
    "Ribosomes synthesise polypeptide chains that fold co-translationally.",
]
KEYWORD_DOC = "d5"  # the only chunk with the exact code the query asks for


def tiny_corpus() -> Corpus:
    return Corpus(tuple(f"d{i}" for i in range(len(TEXTS))), tuple(TEXTS),
                  hashlib.sha256("\n".join(TEXTS).encode()).hexdigest())


def test_zscore_fusion_matches_hand_computed_scores():
    dense = [("a", 0.9), ("b", 0.7), ("c", 0.5)]  # z: +1.2247, 0, -1.2247
    lexical = [("c", 12.0), ("d", 6.0)]  # z: +1, -1
    fused = dict(hybrid.fuse(dense, lexical, fusion="zscore", bm25_weight=0.5))
    z = 1.224744871391589
    assert fused["a"] == pytest.approx(0.5 * z + 0.5 * -1.0)  # missing from BM25: BM25's lowest z
    assert fused["b"] == pytest.approx(0.0 + 0.5 * -1.0)
    assert fused["c"] == pytest.approx(0.5 * -z + 0.5 * 1.0)
    assert fused["d"] == pytest.approx(0.5 * -z + 0.5 * -1.0)  # missing from dense: dense's lowest z
    assert [d for d, _ in hybrid.fuse(dense, lexical)] == ["a", "c", "b", "d"]


def test_zscore_fusion_weight_ends_are_each_list_alone():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    lexical = [("c", 30.0), ("b", 3.0), ("a", 2.0)]
    assert [d for d, _ in hybrid.fuse(dense, lexical, bm25_weight=0.0)] == ["a", "b", "c"]
    assert [d for d, _ in hybrid.fuse(dense, lexical, bm25_weight=1.0)] == ["c", "b", "a"]


def test_rrf_fusion_matches_hand_computed_scores_and_cuts_at_k():
    dense = [("a", 0.9), ("b", 0.8)]
    lexical = [("b", 5.0), ("c", 4.0)]
    fused = hybrid.fuse(dense, lexical, fusion="rrf", k=2)
    assert [d for d, _ in fused] == ["b", "a"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61)


def test_fusion_ties_keep_the_dense_order_and_empty_lists_pass_through():
    assert hybrid.fuse([("x", 1.0), ("y", 1.0)], []) == [("x", 0.0), ("y", 0.0)]
    assert [d for d, _ in hybrid.fuse([], [("z", 3.0)])] == ["z"]


def test_fusion_rejects_unknown_method_and_weight_out_of_range():
    with pytest.raises(ValueError, match="unknown hybrid fusion 'max'"):
        hybrid.fuse([], [], fusion="max")
    with pytest.raises(ValueError, match="bm25_weight must be in"):
        hybrid.fuse([], [], bm25_weight=1.5)


def test_calibrate_weight_picks_the_weight_that_ranks_the_relevant_chunk_first():
    dense = {"q1": [("a", 0.9), ("b", 0.8)], "q2": [("c", 0.9), ("d", 0.1)]}
    lexical = {"q1": [("b", 9.0), ("a", 1.0)], "q2": [("c", 9.0), ("d", 1.0)]}
    qrels = {"q1": {"b"}, "q2": {"c"}}  # q1 needs BM25; q2 is right either way
    best, found = hybrid.calibrate_weight(dense, lexical, qrels, grid=(0.0, 0.4, 0.8))
    assert best == 0.8 and found[0.0] < found[0.8] == pytest.approx(1.0)


def test_bm25_finds_the_exact_keyword_chunk_that_vector_search_misses(tmp_path, base_model_path):
    corpus = tiny_corpus()
    uri = tmp_path / "lancedb"
    query = "how do chaperones help protein folding in form KX7Q2"
    model = index.load_embedder(base_model_path, device="cpu")
    vectors = index.ensure_corpus_table(uri, model, "tiny", corpus)
    dense = index.search(uri, vectors, index.encode(model, [query], task="query"), 3)[0]
    bm25 = hybrid.ensure_bm25_table(uri, corpus)
    lexical = hybrid.bm25_search(uri, bm25, [query], 3)[0]
    assert KEYWORD_DOC not in [d for d, _ in dense]  # the meaning points at the chaperone chunks
    assert lexical[0][0] == KEYWORD_DOC  # the rare exact token wins BM25
    fused = hybrid.fuse(dense, lexical, k=3)
    assert KEYWORD_DOC in [d for d, _ in fused]
    served = hybrid.hybrid_search(model, uri, vectors, bm25, [query], k=3)[0]
    assert served == fused


def test_bm25_table_is_built_once_and_queries_are_plain_words(tmp_path):
    corpus = tiny_corpus()
    uri = tmp_path / "lancedb"
    name = hybrid.ensure_bm25_table(uri, corpus)
    assert name == hybrid.bm25_table_name(corpus)
    messages = []
    assert hybrid.ensure_bm25_table(uri, corpus, progress=messages.append) == name and messages == []
    # query syntax characters are text, not operators; a blank query finds nothing
    hits = hybrid.bm25_search(uri, name, ['"form" -KX7Q2: (retail) AND', "  "], 5)
    assert hits[0][0][0] == KEYWORD_DOC and hits[1] == []


def test_benchmark_evaluates_bm25_and_hybrid_candidates(tmp_path, small_beir, base_model_path):
    from flywheel.lib.beir import load_beir
    from flywheel.lib.evaluation.benchmark import HybridSpec, ModelSpec, run_benchmark, test_split_suite

    ds = load_beir(small_beir)
    suites = {"test": test_split_suite(ds)}
    uri = tmp_path / "lancedb"
    bench = run_benchmark(
        [ModelSpec("base", base_model_path), ModelSpec("base-int8", base_model_path, precision="int8")],
        ds, suites, uri, max_seq_length=64, latency_sample=3,
        hybrids=[HybridSpec("bm25"), HybridSpec("hybrid", on="base"), HybridSpec("dense-only", on="base", bm25_weight=0.0)],
    )
    assert set(bench.summaries["test"]) == {"base", "base-int8", "bm25", "hybrid", "dense-only"}
    queries = suites["test"][0]
    table = hybrid.bm25_table_name(ds.corpus)
    lexical = dict(zip(queries, hybrid.bm25_search(uri, table, list(queries.values()), 100)))
    assert bench.rankings["bm25"]["test"] == {q: [d for d, _ in h] for q, h in lexical.items()}
    dense = {q: list(zip(bench.rankings["base"]["test"][q], bench.scores["base"]["test"][q])) for q in queries}
    expected = hybrid.fuse_all(dense, lexical, fusion="zscore", bm25_weight=0.5)
    assert bench.rankings["hybrid"]["test"] == {q: [d for d, _ in h] for q, h in expected.items()}
    # weight 0 keeps the dense order (BM25-only chunks go below it)
    for q in queries:
        n = len(bench.rankings["base"]["test"][q])
        assert bench.rankings["dense-only"]["test"][q][:n] == bench.rankings["base"]["test"][q]
    # the int8 encoder (PyTorch dynamic: fast on any CPU) searched a corpus table of its own, and its rankings are its own
    assert bench.rankings["base-int8"] is not bench.rankings["base"]
    assert any(name.endswith("_64_int8") for name in index.table_names(uri))
    assert len(bench.latency_ms["bm25"]) == 3 and len(bench.latency_ms["hybrid"]) == 3
    assert bench.stages["hybrid"] == "retrieval (encode query + LanceDB search + BM25 search)"
