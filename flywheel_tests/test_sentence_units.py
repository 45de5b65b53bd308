"""Sentence units: a chunk scored by its own vector and its best sentence (flywheel/lib/registry/index.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flywheel.lib.beir import Corpus
from flywheel.lib.registry import index

# d0 is long and mostly off topic; one sentence in it answers the query. d1-d3 are one sentence each.
TEXTS = [
    "Quarterly revenue grew in the retail division. The board approved a new logistics budget. "
    "Insulin resistance in skeletal muscle precedes type 2 diabetes. Staff turnover fell in the third quarter. "
    "The warehouse lease was renewed for five years.",
    "Glucose metabolism is regulated by several hormones.",
    "Exercise changes how muscles take up sugar.",
    "The retail division opened two new stores.",
]
QUERY = "does insulin resistance in muscle come before type 2 diabetes"


def corpus() -> Corpus:
    return Corpus(tuple(f"d{i}" for i in range(len(TEXTS))), tuple(TEXTS),
                  hashlib.sha256("\n".join(TEXTS).encode()).hexdigest())


def test_sentence_units_are_a_chunks_sentences():
    assert index.sentence_units("First claim here. Second one (with a bracket). 3 mice died! Last?") == [
        "First claim here.", "Second one (with a bracket).", "3 mice died!", "Last?"]
    assert index.sentence_units("One sentence only.") == []  # its own vector is that sentence's
    assert index.sentence_units("e.g. lower case after a stop does not split. Fine.") == [
        "e.g. lower case after a stop does not split.", "Fine."]


def test_encode_returns_the_texts_order_whatever_order_it_batches_in(base_model_path):
    """encode batches the longest texts first; each vector still lands on its own text's row."""
    model = index.load_embedder(base_model_path, device="cpu")
    texts = ["short", TEXTS[0], "a middling sentence about muscles", TEXTS[1]] * 3
    together = index.encode(model, texts, batch_size=2)  # several calls of 16 texts, longest first
    alone = np.vstack([index.encode(model, [t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-5)


def test_a_chunk_scores_its_own_cosine_blended_with_its_best_units(tmp_path, base_model_path):
    uri, c, w = tmp_path / "lancedb", corpus(), 0.7
    model = index.load_embedder(base_model_path, device="cpu")
    said: list[str] = []
    table = index.ensure_corpus_table(uri, model, "tiny", c, units=w, progress=said.append)
    assert table == index.corpus_table_name("tiny", c, model.max_seq_length, "fp32", w) != index.corpus_table_name(
        "tiny", c, model.max_seq_length)
    units = [index.sentence_units(t) for t in TEXTS]
    assert index.connect(uri).open_table(table).count_rows() == sum(max(1, len(u)) for u in units) == 5 + 3

    q = index.encode(model, [QUERY], task="query")[0]
    chunk = index.encode(model, TEXTS)
    expected = {}
    for i, us in enumerate(units):
        own = float(chunk[i] @ q)
        expected[f"d{i}"] = (1 - w) * own + w * max(float(v @ q) for v in index.encode(model, us)) if us else own
    hits = index.search(uri, table, q[None, :], 4)[0]
    assert [d for d, _ in hits] == sorted(expected, key=lambda d: -expected[d])  # each chunk once, best first
    for d, s in hits:
        assert s == pytest.approx(expected[d], abs=1e-4)
    # the off-topic bulk of d0 dilutes its own vector; its answering sentence lifts it
    plain = dict(index.search(uri, index.ensure_corpus_table(uri, model, "tiny", c), q[None, :], 4)[0])
    assert expected["d0"] > plain["d0"]

    # built once: a second call finds the table; a copy (the serving table) searches the same way
    said.clear()
    assert index.ensure_corpus_table(uri, model, "tiny", c, units=w, progress=said.append) == table and not said
    index.write_named_table(uri, "serving", table)
    assert index.search(uri, "serving", q[None, :], 4)[0] == hits


@pytest.mark.parametrize("partitions", [0, 2], ids=["flat scan", "IVF_FLAT index, every partition probed"])
def test_search_looks_deeper_until_it_has_k_chunks(tmp_path, base_model_path, monkeypatch, partitions):
    """A chunk of 30 near-identical sentences holds the top 30 rows: k chunks still come back (not
    k rows), each at its best row's score, exactly as scoring every row would rank them."""
    texts = [" ".join(f"Retail division revenue rose in quarter {n}." for n in range(1, 31)),
             "Glucose metabolism is regulated by several hormones.", "Exercise changes how muscles take up sugar.",
             "Ribosomes synthesise polypeptide chains."]
    c = Corpus(tuple(f"d{i}" for i in range(4)), tuple(texts), hashlib.sha256("\n".join(texts).encode()).hexdigest())
    uri = tmp_path / "lancedb"
    model = index.load_embedder(base_model_path, device="cpu")
    monkeypatch.setattr(index, "_partitions", lambda rows: partitions)  # real tables index from 10,000 rows
    table = index.ensure_corpus_table(uri, model, "tiny", c, units=1.0)  # units only: d0 has 30 rows
    assert len(index.connect(uri).open_table(table).list_indices()) == (1 if partitions else 0)
    q = index.encode(model, ["retail division revenue by quarter"], task="query")
    ids, vectors = index.table_vectors(uri, table)
    scores = vectors @ q[0]
    assert len(ids) == 33 and set(ids[:30]) == {"d0"} and scores[:30].min() > scores[30:].max()  # the premise
    best = {}
    for d, s in zip(ids, scores):
        best[d] = max(best.get(d, -1.0), float(s))
    hits = index.search(uri, table, q, 3)[0]  # the first look (24 rows) holds d0 only
    assert [d for d, _ in hits] == sorted(best, key=lambda d: -best[d])[:3]
    assert [s for _, s in hits] == pytest.approx([best[d] for d, _ in hits], abs=1e-4)


def test_units_weight_outside_its_range_is_refused(tmp_path, base_model_path):
    model = index.load_embedder(base_model_path, device="cpu")
    with pytest.raises(ValueError, match="sentence units' weight"):
        index.ensure_corpus_table(tmp_path / "lancedb", model, "tiny", corpus(), units=1.5)


@pytest.mark.parametrize("units", [0.0, 0.7])
def test_an_embedder_to_load_is_loaded_only_when_its_table_must_be_built(tmp_path, base_model_path, units):
    """A week whose model reads an existing table (a query-only model, its base's; a rerun, its
    own) never loads it, so no OpenVINO network is converted for nothing; the table is the one
    the loaded model names and fills."""
    uri, c = tmp_path / "lancedb", corpus()
    first = index.EmbedderToLoad(base_model_path, 64, "fp32", device="cpu")
    said: list[str] = []
    table = index.ensure_corpus_table(uri, first, "tiny", c, units=units, progress=said.append)
    assert first.loaded and any("embedded" in s for s in said)
    loaded = index.load_embedder(base_model_path, device="cpu", max_seq_length=64)
    assert table == index.corpus_table_name("tiny", c, loaded.max_seq_length, "fp32", units)
    ids, vectors = index.table_vectors(uri, index.ensure_corpus_table(uri, loaded, "tiny", c))
    assert ids == list(c.ids) and np.allclose(vectors, index.encode(loaded, list(c.texts)), atol=1e-5)

    again = index.EmbedderToLoad(base_model_path, 64, "fp32", device="cpu")
    assert index.ensure_corpus_table(uri, again, "tiny", c, units=units) == table and not again.loaded
    other = index.EmbedderToLoad(base_model_path, 32, "fp32", device="cpu")  # another length: another table
    assert index.ensure_corpus_table(uri, other, "tiny", c, units=units) != table and other.loaded
