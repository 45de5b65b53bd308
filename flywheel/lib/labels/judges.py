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


def normalize_query(text: str) -> str:
    return " ".join(text.lower().split())


def stable_uniform(*parts: object) -> float:
    """A deterministic number in [0, 1) from its inputs (same pair, same draw, every rerun)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class HumanLabels:
    """Looks up the dataset's human judgments by query text, never from the test split."""

    def __init__(self, dataset: BeirDataset, split: str = "train"):
        if split == "test":
            raise ValueError("the test split is the held-out yardstick; it never feeds labels")
        self.qrels = dataset.qrels.get(split, {})
        self.qid_by_text = {
            normalize_query(text): qid for qid, text in dataset.queries.items() if qid in self.qrels
        }

    def knows(self, query: str) -> bool:
        return normalize_query(query) in self.qid_by_text

    def relevant(self, query: str, chunk_id: str) -> bool | None:
        qid = self.qid_by_text.get(normalize_query(query))
        if qid is None:
            return None
        return self.qrels[qid].get(chunk_id, 0) > 0


class SimulatedJudge:
    """A judge simulated over human labels with realistic, configurable errors.

    - misses a relevant chunk with probability ``miss_rate`` (grades it 1, or 0 for a third);
    - is lenient on irrelevant chunks ranked in the top ``lenient_top_ranks`` with probability
      ``lenient_rate`` (grades them 2: the false positives that hurt training most);
    - calls some other top-ranked chunks "related" (grade 1), as graded judges do.
    Queries it has no human label for come back unlabelled, with the reason.

    It grades the text it is shown, as an LLM judge does: the chunk's text is looked up in the
    corpus and the human label of the document with that text decides (the chunk id only when
    the text is not in the corpus). So a broken ingestion that joins ids to the wrong texts gives
    labels that point at the wrong ids, exactly as a real judge's would.
    """

    def __init__(self, dataset: BeirDataset, settings: JudgeSettings | None = None, *, seed: int = 0, **changes):
        """Error rates come from ``settings`` (``JudgeSettings``; its defaults when None), with
        ``changes`` (e.g. ``miss_rate=0.3``) validated on top."""
        cfg = (settings or JudgeSettings()).with_(**changes) if changes else (settings or JudgeSettings())
        self.human = HumanLabels(dataset)
        self.by_text = {_text_key(t): cid for cid, t in zip(dataset.corpus.ids, dataset.corpus.texts)}
        self.miss_rate = cfg.miss_rate
        self.lenient_rate = cfg.lenient_rate
        self.lenient_top_ranks = cfg.lenient_top_ranks
        self.seed = seed
        self.name = f"simulated(miss={cfg.miss_rate},lenient={cfg.lenient_rate},seed={seed})"
        self.usage = JudgeUsage()

    def _grade(self, r: JudgeRequest) -> Judgement:
        doc = self.by_text.get(_text_key(r.chunk_text), r.chunk_id) if r.chunk_text else r.chunk_id
        truth = self.human.relevant(r.query, doc)
        if truth is None:
            return Judgement(None, "", error="query has no human label in the dataset's train split")
        u = stable_uniform("judge", self.seed, normalize_query(r.query), doc)
        v = stable_uniform("grade", self.seed, normalize_query(r.query), doc)
        if truth:
            if u < self.miss_rate:
                return Judgement(1 if v < 2 / 3 else 0, "simulated miss of a relevant chunk")
            return Judgement(3 if v < 0.5 else 2, "matches the human label: relevant")
        if r.rank <= self.lenient_top_ranks and u < self.lenient_rate:
            return Judgement(2, "simulated leniency on a highly ranked irrelevant chunk")
        if r.rank <= self.lenient_top_ranks and v < 0.25:
            return Judgement(1, "on topic but not supporting evidence")
        return Judgement(0, "matches the human label: irrelevant")

    def judge(self, requests, *, fewshot=None, progress=None) -> list[Judgement]:
        meter = Progress(f"judge {self.name}", len(requests), progress, unit="judged")
        out = [self._grade(r) for r in requests]
        meter.finish(len(out))
        self.usage.calls += len(out)
        self.usage.failures += sum(j.grade is None for j in out)
        return out


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
