"""Read a dataset in BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

Any folder in this layout can replace the bundled SciFact for the simulator, the simulated
judge and the benchmark. The ``test`` split is the honest yardstick: callers keep it out of
traffic, labels, few-shot prompts and training.

The ``train`` split feeds the simulated traffic and the simulated judge. Many BEIR datasets
ship no train.tsv, so the splits fall back, and ``BeirDataset.split_note`` says how:

- qrels/train.tsv present: the file's splits as they are (the note is empty);
- no train.tsv, but dev.tsv: dev serves as ``train``; test stays ``test``;
- only test.tsv: its queries split by a stable hash of the query id into ``train`` (a
  ``traffic_fraction`` of them) and a held-out ``test``; the same query lands in the same half
  on every load, whatever else the file holds, so the halves never overlap across runs.

qrels scores are kept as graded integers; "relevant" everywhere means score > 0 (BEIR's
evaluation counts relevance from level 1), so explicit 0-score rows are judged non-relevant.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names file, line and field."""


@dataclass(frozen=True)
class Corpus:
    ids: tuple[str, ...]
    texts: tuple[str, ...]  # "title. text", the string that gets embedded
    sha256: str

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_by_id(self) -> dict[str, str]:
        return dict(zip(self.ids, self.texts))


@dataclass(frozen=True)
class BeirDataset:
    root: Path
    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # split -> qid -> did -> score
    split_note: str = ""  # how train/test were made when qrels/train.tsv is missing; empty otherwise
    load_notes: tuple[str, ...] = ()  # what reading the files changed (repeated ids), each naming its file

    @property
    def notes(self) -> str:
        """The split note and the load notes, for a caller to print before it starts."""
        return "; ".join(n for n in (self.split_note, *self.load_notes) if n)

    def split_queries(self, split: str) -> dict[str, str]:
        """Queries that have relevance judgments in a split, in file order."""
        judged = self.qrels.get(split, {})
        return {qid: text for qid, text in self.queries.items() if qid in judged}

    @property
    def has_test_split(self) -> bool:
        return bool(self.qrels.get("test"))


def _read_jsonl(path: Path, required: tuple[str, ...], text_fields: tuple[str, ...] = ()) -> tuple[list[dict], str]:
    """The file's rows (``_id`` as a string; ``text_fields`` as strings, a JSON number as its
    digits, null as empty) and a note naming the ``_id`` values that repeat: the last row of
    each is kept, in the place of the first, as BEIR's own loader (a dict by ``_id``) keeps it.
    A row that is not a JSON object, lacks a required field or holds a list or an object where
    text belongs is an error naming the file, line and field."""
    if not path.exists():
        raise DatasetError(f"{path}: file not found (BEIR layout needs corpus.jsonl and queries.jsonl)")
    rows: dict[str, dict] = {}
    lines: dict[str, list[int]] = defaultdict(list)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DatasetError(f"{path}:{lineno}: not valid UTF-8 JSON ({e})") from e
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object")
            for key in required:
                if key not in row:
                    raise DatasetError(f"{path}:{lineno}: missing field {key!r}")
            for key in text_fields:
                row[key] = _as_text(row.get(key), path, lineno, key)
            row["_id"] = str(row["_id"])
            rows[row["_id"]] = row
            lines[row["_id"]].append(lineno)
    repeated = {i: at for i, at in lines.items() if len(at) > 1}
    note = ""
    if repeated:
        shown = "; ".join(f"{i!r} at lines {', '.join(map(str, at))}" for i, at in list(repeated.items())[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        note = (f"{path}: {len(repeated)} _id values repeat ({shown}{more}); the last row of each is kept, "
                "as BEIR's loader keeps it")
    return list(rows.values()), note


def _as_text(value, path: Path, lineno: int, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DatasetError(f"{path}:{lineno}: field {key!r} must be a string, got {type(value).__name__}")


def _is_header(parts: list[str]) -> bool:
    """BEIR's files start with ``query-id\tcorpus-id\tscore`` (its loader skips line 1 blindly)."""
    return parts[0].strip().lower() in ("query-id", "query_id", "qid") or parts[-1].strip().lower() == "score"


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\r\n").split("\t")
            if lineno == 1 and _is_header(parts):
                continue
            if parts == [""]:
                continue
            if len(parts) != 3:
                raise DatasetError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                score = int(parts[2])
            except ValueError as e:
                raise DatasetError(f"{path}:{lineno}: field 'score' is not an integer: {parts[2]!r}") from e
            qrels[parts[0]][parts[1]] = score
    return dict(qrels)


def _doc_text(row: dict) -> str:
    title = row["title"].strip()
    text = row["text"].strip()
    return f"{title}. {text}" if title else text


def _hash_unit(qid: str) -> float:
    """A number in [0, 1) fixed by the query id alone."""
    digest = hashlib.sha256(f"beir-split\x1f{qid}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_test_only(
    test: dict[str, dict[str, int]], queries: dict[str, str], path: Path, traffic_fraction: float,
) -> tuple[dict[str, dict[str, dict[str, int]]], str]:
    """Split the only judged split by query-id hash: ``train`` for traffic, ``test`` held out."""
    train = {q: docs for q, docs in test.items() if _hash_unit(q) < traffic_fraction}
    held = {q: docs for q, docs in test.items() if q not in train}
    n_train = sum(q in queries for q in train)
    n_held = sum(q in queries for q in held)
    if not n_train or not n_held:
        raise DatasetError(
            f"{path}: the only judged split has {n_train + n_held} queries with text in queries.jsonl; "
            f"split {traffic_fraction:.0%} for traffic it leaves {n_train} for traffic and {n_held} held out "
            "(add qrels/train.tsv or qrels/dev.tsv, or more judged queries)"
        )
    note = (
        f"no qrels/train.tsv or qrels/dev.tsv: the {n_train + n_held} queries of qrels/test.tsv were split "
        f"by a stable hash of the query id, {n_train} ({traffic_fraction:.0%}) as the train split "
        f"(traffic, labels, training) and {n_held} held out as the test split"
    )
    return {"train": train, "test": held}, note


def _assign_splits(
    qrels: dict[str, dict[str, dict[str, int]]], queries: dict[str, str], qrels_dir: Path, traffic_fraction: float,
) -> tuple[dict[str, dict[str, dict[str, int]]], str]:
    """The train/test splits the flywheel uses, and a note saying how they were made."""
    if "train" in qrels:
        return qrels, ""
    if "dev" in qrels:
        rest = {k: v for k, v in qrels.items() if k != "dev"}
        note = (
            f"no qrels/train.tsv: the {len(qrels['dev'])} queries of qrels/dev.tsv serve as the train split "
            "(traffic, labels, training)"
            + ("; qrels/test.tsv stays the test split" if "test" in qrels else "; there is no qrels/test.tsv")
        )
        return {**rest, "train": qrels["dev"]}, note
    if "test" in qrels:
        parts, note = _split_test_only(qrels["test"], queries, qrels_dir / "test.tsv", traffic_fraction)
        rest = {k: v for k, v in qrels.items() if k != "test"}
        return {**rest, **parts}, note
    found = ", ".join(sorted(f"{k}.tsv" for k in qrels)) or "no .tsv files"
    raise DatasetError(
        f"{qrels_dir}: needs qrels/train.tsv (or dev.tsv) for traffic, or test.tsv to split in two; found {found}"
    )


def load_beir(root: str | Path, *, traffic_fraction: float = 0.5) -> BeirDataset:
    """Read the folder; without qrels/train.tsv, fall back to dev.tsv or to a split of test.tsv
    (``traffic_fraction`` of its queries for traffic), recorded in ``split_note``. The last few
    folders read are kept, each until one of its files changes (size or modification time)."""
    root = Path(root)
    files = [root / "corpus.jsonl", root / "queries.jsonl", *sorted((root / "qrels").glob("*.tsv"))]
    stamp = tuple((str(f), st.st_size, st.st_mtime_ns) for f in files if (st := _stat(f)) is not None)
    return _load_beir(root, traffic_fraction, stamp)


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None


@lru_cache(maxsize=4)
def _load_beir(root: Path, traffic_fraction: float, stamp: tuple) -> BeirDataset:
    if not 0.0 < traffic_fraction < 1.0:
        raise ValueError(f"traffic_fraction must lie strictly between 0 and 1, got {traffic_fraction}")
    corpus_path = root / "corpus.jsonl"
    docs, corpus_note = _read_jsonl(corpus_path, ("_id", "text"), ("title", "text"))
    digest = hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    corpus = Corpus(tuple(d["_id"] for d in docs), tuple(_doc_text(d) for d in docs), digest)
    # Only the text is kept: SciFact's query metadata names the evidence documents, which would
    # leak the answer into anything that reads it.
    query_rows, queries_note = _read_jsonl(root / "queries.jsonl", ("_id", "text"), ("text",))
    queries = {q["_id"]: q["text"] for q in query_rows}
    qrels_dir = root / "qrels"
    qrels = {f.stem: _read_qrels(f) for f in sorted(qrels_dir.glob("*.tsv"))}
    qrels, note = _assign_splits(qrels, queries, qrels_dir, traffic_fraction)
    train, test = set(qrels.get("train", {})), set(qrels.get("test", {}))
    if train & test:
        source = "train" if not note else "dev"
        raise DatasetError(f"{qrels_dir}: {len(train & test)} queries appear in both {source} and test")
    return BeirDataset(root=root, corpus=corpus, queries=queries, qrels=qrels, split_note=note,
                       load_notes=tuple(n for n in (corpus_note, queries_note) if n))
