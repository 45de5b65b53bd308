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
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import pandas as pd

from flywheel.lib.beir import BeirDataset

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
    error: str | None = None


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
    """

    def __init__(
        self,
        dataset: BeirDataset,
        *,
        miss_rate: float = 0.3,
        lenient_rate: float = 0.08,
        lenient_top_ranks: int = 5,
        seed: int = 0,
    ):
        for name, rate in (("miss_rate", miss_rate), ("lenient_rate", lenient_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        self.human = HumanLabels(dataset)
        self.miss_rate = miss_rate
        self.lenient_rate = lenient_rate
        self.lenient_top_ranks = lenient_top_ranks
        self.seed = seed
        self.name = f"simulated(miss={miss_rate},lenient={lenient_rate},seed={seed})"
        self.usage = JudgeUsage()

    def _grade(self, r: JudgeRequest) -> Judgement:
        truth = self.human.relevant(r.query, r.chunk_id)
        if truth is None:
            return Judgement(None, "", error="query has no human label in the dataset's train split")
        u = stable_uniform("judge", self.seed, normalize_query(r.query), r.chunk_id)
        v = stable_uniform("grade", self.seed, normalize_query(r.query), r.chunk_id)
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
        started = time.monotonic()
        out = [self._grade(r) for r in requests]
        if progress:
            secs = time.monotonic() - started
            progress(f"judge {self.name}: {len(out)}/{len(requests)} judged (100%), "
                     f"{len(out) / max(secs, 1e-9):.0f}/s, ~0s left")
        self.usage.calls += len(out)
        self.usage.failures += sum(j.grade is None for j in out)
        return out


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
