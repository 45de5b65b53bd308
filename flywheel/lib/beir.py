"""Read a dataset in BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

Any folder in this layout can replace the bundled SciFact for the simulator, the simulated
judge and the benchmark. The ``test`` split is the honest yardstick: callers keep it out of
traffic, labels, few-shot prompts and training.
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

    def split_queries(self, split: str) -> dict[str, str]:
        """Queries that have relevance judgments in a split, in file order."""
        judged = self.qrels.get(split, {})
        return {qid: text for qid, text in self.queries.items() if qid in judged}

    @property
    def has_test_split(self) -> bool:
        return bool(self.qrels.get("test"))


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise DatasetError(f"{path}: file not found (BEIR layout needs corpus.jsonl and queries.jsonl)")
    rows = []
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
            row["_id"] = str(row["_id"])
            rows.append(row)
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with path.open("r", encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\r\n").split("\t")
            if lineno == 1 and parts[0] == "query-id":
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
    title = (row.get("title") or "").strip()
    text = (row.get("text") or "").strip()
    return f"{title}. {text}" if title else text


@lru_cache(maxsize=4)
def load_beir(root: str | Path) -> BeirDataset:
    root = Path(root)
    corpus_path = root / "corpus.jsonl"
    docs = _read_jsonl(corpus_path, ("_id", "text"))
    digest = hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    corpus = Corpus(tuple(d["_id"] for d in docs), tuple(_doc_text(d) for d in docs), digest)
    # Only the text is kept: SciFact's query metadata names the evidence documents, which would
    # leak the answer into anything that reads it.
    queries = {q["_id"]: str(q["text"]) for q in _read_jsonl(root / "queries.jsonl", ("_id", "text"))}
    qrels = {}
    qrels_dir = root / "qrels"
    if not (qrels_dir / "train.tsv").exists():
        raise DatasetError(f"{qrels_dir / 'train.tsv'}: file not found (a train split is required)")
    for split_file in sorted(qrels_dir.glob("*.tsv")):
        qrels[split_file.stem] = _read_qrels(split_file)
    train, test = set(qrels.get("train", {})), set(qrels.get("test", {}))
    if train & test:
        raise DatasetError(f"{qrels_dir}: {len(train & test)} queries appear in both train and test")
    return BeirDataset(root=root, corpus=corpus, queries=queries, qrels=qrels)
