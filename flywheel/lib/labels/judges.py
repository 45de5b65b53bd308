"""Relevance judges: who decides whether a retrieved chunk answers a query.

Grades (documented scale, shared by every judge):
    0 irrelevant   - retrieved but of no use: the hard negatives of fine-tuning
    1 related      - on topic but does not answer; neither positive nor negative in training
    2 relevant     - answers the query
    3 perfect      - answers it directly and fully
A pair counts as relevant when its grade is >= 2.

``SimulatedJudge`` is the offline default: it answers from the dataset's human labels (train
split only) and makes the kinds of mistakes LLM judges make, tuned so that its agreement with
the human labels (Cohen's kappa) lands where published LLM-judge studies put it (~0.5-0.65).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd

from flywheel.config import JudgeSettings
from flywheel.lib.beir import BeirDataset
from flywheel.lib.progress import Progress

GRADES = {0: "irrelevant", 1: "related", 2: "relevant", 3: "perfect"}
RELEVANT_GRADE = 2


@dataclass(frozen=True)
class JudgeRequest:
    query: str
    chunk_id: str
    chunk_text: str
    rank: int


@dataclass(frozen=True)
class Judgement:
    grade: int | None  # None: unlabelled, see error
    reason: str
    error: str | None = None  # "<reason code>: <detail>", e.g. "content_filter: ..."
    injection_flag: bool = False  # the pair held instructions aimed at the grader (see labels.injection)


@dataclass
class JudgeUsage:
    calls: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    failures: int = 0
    extra: dict = field(default_factory=dict)


class Judge(Protocol):
    name: str  # recorded as every label's source, e.g. "simulated" or "openai:gpt-4o-mini"
    usage: JudgeUsage

    def judge(
        self,
        requests: Sequence[JudgeRequest],
        *,
        fewshot: pd.DataFrame | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> list[Judgement]: ...


def counted_grades(judgements: Sequence[Judgement]) -> list[int | None]:
    """The grade each judgement adds to a vote: None when it came back unlabelled, or when the pair
    was flagged for prompt injection (such a pair never enters a dataset or an eval suite, so its
    vote must not decide a majority either)."""
    return [None if j.injection_flag else j.grade for j in judgements]


def normalize_query(text: str) -> str:
    return " ".join(text.lower().split())


def stable_uniform(*parts: object) -> float:
    """A deterministic number in [0, 1) from its inputs (same pair, same draw, every rerun)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class HumanLabels:
    """Looks up the dataset's human judgments by query text, never from the test split. Queries
    that share a text (after normalising) share their judgments: a document relevant to any of
    them is relevant to the text, at its highest grade."""

    def __init__(self, dataset: BeirDataset, split: str = "train"):
        if split == "test":
            raise ValueError("the test split is the held-out yardstick; it never feeds labels")
        self.qrels = dataset.qrels.get(split, {})
        self.grades_by_text: dict[str, dict[str, int]] = {}
        for qid, text in dataset.queries.items():
            if qid in self.qrels:
                merged = self.grades_by_text.setdefault(normalize_query(text), {})
                for cid, g in self.qrels[qid].items():
                    merged[cid] = max(g, merged.get(cid, g))

    def knows(self, query: str) -> bool:
        return normalize_query(query) in self.grades_by_text

    def grades(self, query: str) -> dict[str, int]:
        """chunk id -> human grade of every judged document of ``query`` (empty when unknown)."""
        return self.grades_by_text.get(normalize_query(query), {})

    def relevant(self, query: str, chunk_id: str) -> bool | None:
        if not self.knows(query):
            return None
        return self.grades(query).get(chunk_id, 0) > 0


class SimulatedJudge:
    """A judge simulated over human labels with realistic, configurable errors.

    - misses a relevant chunk with probability ``miss_rate`` (grades it 1, or 0 for a third);
    - is lenient on a query's near misses (``NearMisses``: the ``near_miss_depth`` irrelevant
      documents closest in topic to its relevant ones) with probability ``lenient_rate`` (grades
      them 2: plausible false positives, the ones that hurt training most);
    - calls some other near misses "related" (grade 1), as graded judges do.
    Queries it has no human label for come back unlabelled, with the reason.

    Every error depends on the (query, text) pair alone, never on where a system ranked the
    chunk or which system showed it: a judge whose mistakes follow the list it is shown puts
    its false positives in the serving model's top ranks, and eval sets built from its labels
    then credit the incumbent over any challenger.

    It grades the text it is shown, as an LLM judge does: the chunk's text is looked up in the
    corpus and the human label of the document with that text decides (the chunk id only when
    the text is not in the corpus). So a broken ingestion that joins ids to the wrong texts gives
    labels that point at the wrong ids, exactly as a real judge's would. Where several documents
    share the text (a corpus that stores a passage twice), the text is relevant when any of them
    is, and its errors are drawn once for the text: a judge that reads the same words gives the
    same grade, whichever id the app logged.
    """

    def __init__(self, dataset: BeirDataset, settings: JudgeSettings | None = None, *, seed: int = 0, **changes):
        """Error rates come from ``settings`` (``JudgeSettings``; its defaults when None), with
        ``changes`` (e.g. ``miss_rate=0.3``) validated on top."""
        cfg = (settings or JudgeSettings()).with_(**changes) if changes else (settings or JudgeSettings())
        self.human = HumanLabels(dataset)
        self.by_text: dict[str, tuple[str, ...]] = {}
        for cid, t in zip(dataset.corpus.ids, dataset.corpus.texts):
            key = _text_key(t)
            self.by_text[key] = self.by_text.get(key, ()) + (cid,)
        self.miss_rate = cfg.miss_rate
        self.lenient_rate = cfg.lenient_rate
        self.near_misses = NearMisses(dataset, self.human, depth=cfg.near_miss_depth,
                                      min_closeness=cfg.near_miss_min_closeness)
        self.seed = seed
        self.name = f"simulated(miss={cfg.miss_rate},lenient={cfg.lenient_rate},near={cfg.near_miss_depth}@{cfg.near_miss_min_closeness},seed={seed})"
        self.usage = JudgeUsage()

    def _grade(self, r: JudgeRequest) -> Judgement:
        docs = (self.by_text.get(_text_key(r.chunk_text)) if r.chunk_text else None) or (r.chunk_id,)
        doc = docs[0]  # the text's first document: its errors are drawn for the text, once
        truth = self.human.relevant(r.query, doc)
        if truth is None:
            return Judgement(None, "", error="query has no human label in the dataset's train split")
        truth = truth or any(self.human.relevant(r.query, d) for d in docs[1:])
        u = stable_uniform("judge", self.seed, normalize_query(r.query), doc)
        v = stable_uniform("grade", self.seed, normalize_query(r.query), doc)
        if truth:
            if u < self.miss_rate:
                return Judgement(1 if v < 2 / 3 else 0, "simulated miss of a relevant chunk")
            return Judgement(3 if v < 0.5 else 2, "matches the human label: relevant")
        if any(self.near_misses.is_near_miss(r.query, d) for d in docs):
            if u < self.lenient_rate:
                return Judgement(2, "simulated leniency on an irrelevant chunk close in topic to a relevant one")
            if v < 0.5:
                return Judgement(1, "on topic but not supporting evidence")
        return Judgement(0, "matches the human label: irrelevant")

    def judge(self, requests, *, fewshot=None, progress=None) -> list[Judgement]:
        meter = Progress(f"judge {self.name}", len(requests), progress, unit="judged")
        out = [self._grade(r) for r in requests]
        meter.finish(len(out))
        self.usage.calls += len(out)
        self.usage.failures += sum(j.grade is None for j in out)
        return out


class NearMisses:
    """The irrelevant documents a judge can plausibly mistake for relevant ones, per query.

    A near miss of a query is one of the ``depth`` documents not labelled relevant whose TF-IDF
    cosine to one of the query's relevant documents is highest, and at least ``min_closeness``:
    on the topic of the answer, but not the answer (in a small or scattered corpus a query may
    have fewer: the least distant documents there are not close). LLM judges' false positives
    are of this kind (topical or lexical closeness fools them: Alaofi et al., "LLMs can be
    fooled into labelling a document as relevant", SIGIR-AP 2024). The set depends on the query and the corpus only, never on a retrieval
    system, so no system's ranking is favoured by where the judge errs. Computed lazily, once
    per query.
    """

    def __init__(self, dataset: BeirDataset, human: HumanLabels, *, depth: int, min_closeness: float = 0.0):
        self.dataset, self.human, self.depth, self.min_closeness = dataset, human, depth, min_closeness
        self._row = {cid: i for i, cid in enumerate(dataset.corpus.ids)}
        self._matrix = None
        self._by_query: dict[str, frozenset[str]] = {}

    def _tfidf(self):
        if self._matrix is None:
            self._matrix = _tfidf_rows(self.dataset.corpus)
        return self._matrix

    def of(self, query: str) -> frozenset[str]:
        key = normalize_query(query)
        if key not in self._by_query:
            relevant = [c for c, g in self.human.grades(key).items() if g > 0 and c in self._row]
            if not relevant or self.depth == 0:
                self._by_query[key] = frozenset()
            else:
                matrix = self._tfidf()
                closeness = (matrix @ matrix[[self._row[c] for c in relevant]].T).max(axis=1).toarray().ravel()
                closeness[[self._row[c] for c in relevant]] = -1.0
                top = np.argsort(-closeness, kind="stable")[: self.depth]
                ids = self.dataset.corpus.ids
                self._by_query[key] = frozenset(ids[i] for i in top if closeness[i] >= max(self.min_closeness, 1e-9))
        return self._by_query[key]

    def is_near_miss(self, query: str, doc: str) -> bool:
        return doc in self.of(query)


_TFIDF_BY_CORPUS: dict[str, object] = {}  # corpus sha256 -> its TF-IDF rows (every vote's judge shares them)


def _tfidf_rows(corpus):
    """L2-normalised TF-IDF rows of a corpus, computed once per process per corpus."""
    if corpus.sha256 not in _TFIDF_BY_CORPUS:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2, dtype=np.float32)
        _TFIDF_BY_CORPUS[corpus.sha256] = vectorizer.fit_transform(corpus.texts)
    return _TFIDF_BY_CORPUS[corpus.sha256]


def _text_key(text: str) -> str:
    return " ".join(str(text).split())


def cohens_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa for two binary raters (NaN when undefined)."""
    n = len(a)
    if n == 0 or n != len(b):
        return float("nan")
    both = sum(1 for x, y in zip(a, b) if x and y)
    neither = sum(1 for x, y in zip(a, b) if not x and not y)
    po = (both + neither) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return float("nan") if pe == 1 else (po - pe) / (1 - pe)
