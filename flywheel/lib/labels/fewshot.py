"""Few-shot selection: the examples a judge sees are the labelled pairs most like its question.

This closes the loop of the flywheel: last week's few-shot set (labelled pairs, balanced across
grades) teaches this week's judge. For each query, the k examples whose queries are most similar
by embedding are picked round-robin across grades, so a prompt never shows only "irrelevant"
examples (which would bias the judge toward 0). The embedder is a plain callable so tests can pass
a cheap one; the default loads the base sentence-transformers model lazily, on first use.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from flywheel.lib.labels.judges import normalize_query

Embed = Callable[[list[str]], np.ndarray]


class DefaultEmbedder:
    """A sentence-transformers model (default: the bundled base), loaded once, when first called."""

    def __init__(self, path: str | None = None):
        self._path = path
        self._model = None
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            if self._model is None:
                from flywheel.config import default_base_model
                from flywheel.lib.registry.index import load_embedder

                self._model = load_embedder(self._path or default_base_model())
        return np.asarray(self._model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embed() must return a 2-d array (texts x dims), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


class FewshotSelector:
    """Picks k examples per query from a few-shot set (columns query, chunk_id, chunk_text, grade, reason)."""

    def __init__(self, fewshot: pd.DataFrame, embed: Embed, k: int):
        pool = fewshot[fewshot["grade"].notna()].reset_index(drop=True)
        self.k = k
        self.embed = embed
        self.rows = [
            {"query": q, "chunk_id": str(c), "chunk_text": t, "grade": int(g),
             "reason": (r if isinstance(r, str) else "")}
            for q, c, t, g, r in zip(
                pool["query"], pool["chunk_id"], pool["chunk_text"], pool["grade"],
                pool["reason"] if "reason" in pool else [""] * len(pool),
            )
        ]
        self._qkeys = np.array([normalize_query(r["query"]) for r in self.rows], dtype=object)
        self._chunk_ids = np.array([r["chunk_id"] for r in self.rows], dtype=object)
        self._grades = np.array([r["grade"] for r in self.rows], dtype=int)
        self.example_queries = sorted(set(self._qkeys))
        active = k > 0 and bool(self.rows)
        self._qvec = _unit(embed(self.example_queries)) if active else np.zeros((0, 1), np.float32)
        index = {q: i for i, q in enumerate(self.example_queries)}
        self._row_query_index = np.array([index[q] for q in self._qkeys], dtype=int)
        self._target_vecs: dict[str, np.ndarray] = {}

    def prepare(self, queries: Sequence[str]) -> None:
        """Embed the target queries in one batch (cheaper than one call per query)."""
        todo = sorted({normalize_query(q) for q in queries} - set(self._target_vecs))
        if not todo or self.k <= 0 or not self.rows:
            return
        for q, v in zip(todo, _unit(self.embed(todo))):
            self._target_vecs[q] = v

    def select(self, query: str, exclude_chunk_id: str | None = None) -> list[dict]:
        """The k most similar examples, round-robin across grades, most similar last (nearest the question)."""
        if self.k <= 0 or not self.rows:
            return []
        qkey = normalize_query(query)
        if qkey not in self._target_vecs:
            self.prepare([query])
        row_sim = (self._qvec @ self._target_vecs[qkey])[self._row_query_index]
        # never show the judge the answer for this very pair
        allowed = ~((self._qkeys == qkey) & (self._chunk_ids == str(exclude_chunk_id)))
        by_grade = []
        for g in sorted(set(self._grades.tolist())):
            idx = np.flatnonzero((self._grades == g) & allowed)
            # most similar first; ties broken by chunk id for determinism
            order = sorted(idx.tolist(), key=lambda i: (-float(row_sim[i]), self._chunk_ids[i]))
            by_grade.append(order)
        picked: list[int] = []
        depth = 0
        while len(picked) < self.k and any(depth < len(o) for o in by_grade):
            for order in by_grade:
                if depth < len(order) and len(picked) < self.k:
                    picked.append(order[depth])
            depth += 1
        picked.sort(key=lambda i: float(row_sim[i]))
        return [dict(self.rows[i], similarity=float(row_sim[i])) for i in picked]
