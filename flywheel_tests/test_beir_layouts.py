"""load_beir on the layouts real BEIR folders come in, and the split fallbacks.

What BEIR's own loader does (beir-cellar/beir, beir/datasets/data_loader.py, GenericDataLoader),
read with the search tool:
- ``_load_qrels`` reads qrels/<split>.tsv with ``csv.reader(delimiter="\\t")`` and calls
  ``next(reader)`` unconditionally: line 1 is always taken as the header
  ``query-id\\tcorpus-id\\tscore`` (a file without one silently loses its first judgment there;
  load_beir skips line 1 only when it is a header, so such a file keeps every row).
- scores are ``int(row[2])`` and stored as they are, 0 included; its evaluation (pytrec_eval,
  relevance from level 1) counts only scores > 0 as relevant. flywheel does the same: graded
  0/1/2 kept, "relevant" is score > 0 (simulate, HumanLabels, the benchmark's test suite).
- ``load(split)`` needs qrels/<split>.tsv and keeps only the queries that have qrels; corpus rows
  keep ``text`` and ``title`` (``title`` may be empty), other fields (``metadata``) are ignored;
  ids are strings.
Which splits the datasets ship (ArguAna, SciDocs, TREC-COVID, Touche-2020, Climate-FEVER,
CQADupStack: test only; Quora, DBPedia-entity: dev + test) is what the fallbacks below cover.

The folders here are tiny hand-made ones in NFCorpus/TREC-COVID style ids ("PLAIN-1", "MED-10").
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest

from flywheel.lib.beir import DatasetError, load_beir

HEADER = "query-id\tcorpus-id\tscore\n"
N_QUERIES = 24


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_qrels(folder: Path, split: str, rows: list[tuple[str, str, int]], header: str = HEADER) -> None:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    body = "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows)
    (folder / "qrels" / f"{split}.tsv").write_text(header + body, encoding="utf-8")


def make_folder(root: Path, splits: dict[str, list[int]], *, header: str = HEADER) -> Path:
    """A BEIR folder: query PLAIN-i relevant to MED-i (score 2) and MED-(i+1) (score 1), with an
    explicit 0 for MED-(i+2); every other document has an empty title and a metadata field."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [
        {"_id": f"MED-{i}", "title": "" if i % 2 else f"Title {i}",
         "text": f"abstract number {i} about topic {i % 7}", "metadata": {"url": f"https://example.org/{i}"}}
        for i in range(1, N_QUERIES + 4)
    ]
    write_jsonl(root / "corpus.jsonl", docs)
    queries = [{"_id": f"PLAIN-{i}", "text": f"what about topic {i}?", "metadata": {}} for i in range(1, N_QUERIES + 1)]
    queries.append({"_id": "PLAIN-999", "text": "a query nobody judged", "metadata": {}})
    write_jsonl(root / "queries.jsonl", queries)
    for split, ids in splits.items():
        rows = [r for i in ids for r in ((f"PLAIN-{i}", f"MED-{i}", 2), (f"PLAIN-{i}", f"MED-{i + 1}", 1),
                                         (f"PLAIN-{i}", f"MED-{i + 2}", 0))]
        write_qrels(root, split, rows, header)
    return root


ALL = list(range(1, N_QUERIES + 1))
TRAIN, DEV, TEST = ALL[:12], ALL[12:16], ALL[16:]


def test_train_and_test_are_read_as_they_are(tmp_path):
    ds = load_beir(make_folder(tmp_path / "d", {"train": TRAIN, "dev": DEV, "test": TEST}))
    assert ds.split_note == ""
    assert set(ds.qrels) == {"train", "dev", "test"}
    assert list(ds.split_queries("train")) == [f"PLAIN-{i}" for i in TRAIN]
    assert list(ds.split_queries("test")) == [f"PLAIN-{i}" for i in TEST]
    assert ds.has_test_split


def test_dev_serves_as_train_when_there_is_no_train_file(tmp_path):
    ds = load_beir(make_folder(tmp_path / "d", {"dev": DEV, "test": TEST}))
    assert set(ds.qrels) == {"train", "test"}
    assert list(ds.split_queries("train")) == [f"PLAIN-{i}" for i in DEV]
    assert list(ds.split_queries("test")) == [f"PLAIN-{i}" for i in TEST]
    assert "dev.tsv" in ds.split_note and "train split" in ds.split_note


def test_dev_and_test_sharing_a_query_is_an_error(tmp_path):
    folder = make_folder(tmp_path / "d", {"dev": DEV, "test": DEV[:1] + TEST})
    with pytest.raises(DatasetError, match=r"1 queries appear in both dev and test"):
        load_beir(folder)


def test_test_only_is_split_by_query_id_hash_disjoint_and_stable(tmp_path):
    ds = load_beir(make_folder(tmp_path / "a", {"test": ALL}))
    train, test = set(ds.split_queries("train")), set(ds.split_queries("test"))
    assert train and test and not train & test
    assert train | test == {f"PLAIN-{i}" for i in ALL}
    assert "PLAIN-999" not in train | test  # queries without qrels never enter either split
    assert str(len(train)) in ds.split_note and "hash" in ds.split_note and "50%" in ds.split_note
    # the same ids land in the same halves from another copy of the folder, and with the rows reordered
    other = tmp_path / "b"
    shutil.copytree(tmp_path / "a", other)
    lines = (other / "qrels" / "test.tsv").read_text().splitlines(keepends=True)
    (other / "qrels" / "test.tsv").write_text(lines[0] + "".join(reversed(lines[1:])))
    again = load_beir(other)
    assert set(again.split_queries("train")) == train and set(again.split_queries("test")) == test
    assert again.qrels["train"] == ds.qrels["train"] and again.qrels["test"] == ds.qrels["test"]


def test_the_traffic_fraction_moves_queries_one_way_only(tmp_path):
    folder = make_folder(tmp_path / "d", {"test": ALL})
    half = set(load_beir(folder).qrels["train"])
    quarter = set(load_beir(folder, traffic_fraction=0.25).qrels["train"])
    assert quarter < half  # a smaller fraction only takes queries out of traffic
    assert "25%" in load_beir(folder, traffic_fraction=0.25).split_note
    with pytest.raises(ValueError, match="traffic_fraction"):
        load_beir(folder, traffic_fraction=1.0)


def test_a_test_split_too_small_to_halve_is_an_error_naming_the_file(tmp_path):
    folder = make_folder(tmp_path / "d", {"test": [1]})
    with pytest.raises(DatasetError, match=r"qrels/test\.tsv: .*1 queries.*train\.tsv or qrels/dev\.tsv"):
        load_beir(folder)


@pytest.mark.parametrize("layout", ["no qrels folder", "other split only"])
def test_no_usable_split_is_an_error_naming_the_folder(tmp_path, layout):
    folder = make_folder(tmp_path / "d", {"validation": TRAIN} if layout == "other split only" else {})
    with pytest.raises(DatasetError) as e:
        load_beir(folder)
    message = str(e.value)
    assert str(folder / "qrels") in message and "train.tsv" in message and "test.tsv" in message
    assert ("validation.tsv" in message) == (layout == "other split only")


@pytest.mark.parametrize("header", [HEADER, "", "\ufeffquery-id\tcorpus-id\tscore\r\n"], ids=["header", "none", "bom-crlf"])
def test_qrels_with_or_without_a_header_keep_every_judgment(tmp_path, header):
    ds = load_beir(make_folder(tmp_path / "d", {"train": TRAIN, "test": TEST}, header=header))
    assert len(ds.qrels["train"]) == len(TRAIN) and "query-id" not in ds.qrels["train"]
    assert ds.qrels["train"]["PLAIN-1"] == {"MED-1": 2, "MED-2": 1, "MED-3": 0}


def test_graded_and_zero_scores_are_kept_and_zero_is_not_relevant(tmp_path):
    from flywheel.lib.evaluation.benchmark import test_split_suite
    from flywheel.lib.labels.judges import HumanLabels

    ds = load_beir(make_folder(tmp_path / "d", {"train": TRAIN, "test": TEST}))
    assert ds.qrels["test"]["PLAIN-17"] == {"MED-17": 2, "MED-18": 1, "MED-19": 0}
    labels = HumanLabels(ds)
    q = ds.queries["PLAIN-1"]
    assert labels.relevant(q, "MED-1") is True and labels.relevant(q, "MED-2") is True
    assert labels.relevant(q, "MED-3") is False  # explicit 0: judged, not relevant
    assert not labels.knows(ds.queries["PLAIN-17"])  # the test split never feeds labels
    queries, qrels = test_split_suite(ds)
    assert set(queries) == {f"PLAIN-{i}" for i in TEST}
    assert qrels["PLAIN-17"] == {"MED-17": 2, "MED-18": 1}  # levels kept as gains, as BEIR scores NDCG


def test_empty_titles_metadata_and_non_numeric_ids(tmp_path):
    ds = load_beir(make_folder(tmp_path / "d", {"train": TRAIN, "test": TEST}))
    text = ds.corpus.text_by_id
    assert text["MED-1"] == "abstract number 1 about topic 1"  # empty title: no leading ". "
    assert text["MED-2"] == "Title 2. abstract number 2 about topic 2"
    assert all("example.org" not in t for t in ds.corpus.texts)  # metadata is not embedded
    assert ds.queries["PLAIN-999"] == "a query nobody judged"


def test_a_bad_qrels_row_still_names_file_line_and_field(tmp_path):
    folder = make_folder(tmp_path / "d", {"test": ALL})
    path = folder / "qrels" / "test.tsv"
    path.write_text(path.read_text() + "PLAIN-1\tMED-5\trelevant\n")
    with pytest.raises(DatasetError, match=rf"{path}:{3 * N_QUERIES + 2}: field 'score' is not an integer"):
        load_beir(folder)


def test_traffic_on_a_test_only_folder_uses_the_traffic_half_only(tmp_path, base_model_path):
    from flywheel.lib.simulate.traffic import SimulationConfig, simulate

    folder = make_folder(tmp_path / "d", {"test": ALL})
    ds = load_beir(folder)
    summary = simulate(SimulationConfig(
        dataset_dir=folder, log_dir=tmp_path / "logs", lancedb_uri=tmp_path / "lancedb", model_path=base_model_path,
        start=date(2026, 9, 28), weeks=2, seed=0, top_k=5, encode_max_seq_length=64,
    ))
    records = [json.loads(line) for p in sorted((tmp_path / "logs").rglob("*.jsonl")) for line in p.read_text().splitlines()]
    searched = {r["query"] for r in records if r["type"] == "search"}
    assert summary.searches > 0 and summary.unique_queries == len(ds.split_queries("train"))
    assert searched == set(ds.split_queries("train").values())
    assert not searched & set(ds.split_queries("test").values())


def test_numbers_and_nulls_where_text_belongs_are_read_as_text_and_a_list_names_its_line(tmp_path):
    folder = make_folder(tmp_path / "d", {"train": TRAIN, "test": TEST})
    corpus = folder / "corpus.jsonl"
    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": 7001, "title": None, "text": 2021}) + "\n")
        f.write(json.dumps({"_id": "MED-7002", "title": 3.5, "text": "a number for a title"}) + "\n")
    text = load_beir(folder).corpus.text_by_id
    assert text["7001"] == "2021" and text["MED-7002"] == "3.5. a number for a title"
    lines = len(corpus.read_text().splitlines())
    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "MED-7003", "title": "", "text": ["two", "paragraphs"]}) + "\n")
    with pytest.raises(DatasetError, match=rf"{corpus}:{lines + 1}: field 'text' must be a string, got list"):
        load_beir(folder)


def test_a_repeated_id_keeps_its_last_row_in_its_first_place_and_the_note_names_the_lines(tmp_path):
    """As BEIR's loader (a dict by ``_id``) keeps it, and said: nothing is replaced silently."""
    folder = make_folder(tmp_path / "d", {"train": TRAIN, "test": TEST})
    corpus, queries = folder / "corpus.jsonl", folder / "queries.jsonl"
    n_docs = len(corpus.read_text().splitlines())
    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "MED-1", "title": "", "text": "the abstract as corrected"}) + "\n")
    with queries.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "PLAIN-2", "text": "what about topic 2, reworded?"}) + "\n")
    ds = load_beir(folder)
    assert len(ds.corpus) == n_docs and ds.corpus.ids[0] == "MED-1"
    assert ds.corpus.texts[0] == "the abstract as corrected"
    assert ds.queries["PLAIN-2"] == "what about topic 2, reworded?"
    [corpus_note, queries_note] = ds.load_notes
    assert f"{corpus}: 1 _id values repeat ('MED-1' at lines 1, {n_docs + 1})" in corpus_note
    assert str(queries) in queries_note and "'PLAIN-2'" in queries_note
    assert corpus_note in ds.notes and ds.split_note == ""
    assert load_beir(make_folder(tmp_path / "clean", {"train": TRAIN, "test": TEST})).load_notes == ()
