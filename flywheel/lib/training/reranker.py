"""Scoring with a trained cross-encoder reranker: load it, rescore a ranking's head, fuse.

At search time the reranker rescores the bi-encoder's top ``depth`` chunks (``RerankerSettings.depth``)
and its scores are fused with the bi-encoder's (``rerank``'s ``fusion``). Training it is in
``cross_encoder.py`` (``RerankerConfig``, ``train_reranker``).

Loading a trained reranker: ``CrossEncoder(<folder>, local_files_only=True)``, where the folder
is the model's own directory, or ``mlflow.artifacts.download_artifacts(run_id=..., artifact_path="reranker")``
for the copy logged in MLflow (see ``load_reranker``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from flywheel.config import RerankerSettings, default_of
from flywheel.lib.progress import Progress
from flywheel.lib.registry import index


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
_WORD = re.compile(r"\S+")


def load_reranker(path: str | Path, *, device: str = "auto", max_length: int | None = None, precision: str = "fp32",
                  calibration_texts=None, cache_dir: str | Path | None = None):
    """A trained CrossEncoder for inference; ``precision`` (and the OpenVINO options) as in
    ``flywheel.lib.registry.inference.apply_precision``."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from flywheel.lib.registry.inference import apply_precision

    device = index.resolve_device(device)
    model = CrossEncoder(str(path), device=device, local_files_only=True, max_length=max_length)
    return apply_precision(model, precision, device, calibration_texts=calibration_texts, cache_dir=cache_dir)


def head_words(text: str, words: int) -> str:
    """``text`` up to the end of its first ``words`` whitespace-separated words (the rest dropped)."""
    for n, match in enumerate(_WORD.finditer(text), 1):
        if n == words:
            return text[:match.end()]
    return text


def score_pairs(model, query: str, passages: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """The cross-encoder's scores of ``(query, passage)`` for each passage.

    A pair is truncated to ``model.max_seq_length`` tokens, so each passage is first cut after as many
    words: a word is at least one token, so the model sees the same tokens, and the tokenizer no
    longer reads the rest of a long passage only to drop it. (A word made only of characters the
    tokenizer drops, such as control characters, is no token: each one leaves the pair a token
    short.)"""
    limit = getattr(model, "max_seq_length", None)
    if limit:
        passages = [head_words(p, limit) for p in passages]
    return np.asarray(model.predict([(query, p) for p in passages], batch_size=batch_size, show_progress_bar=False))


def rerank(
    model,
    queries: Mapping[str, str],
    rankings: Mapping[str, Sequence[str]],
    texts: Mapping[str, str],
    *,
    depth: int = default_of(RerankerSettings, "depth"),
    batch_size: int = 64,
    fusion: str = "rrf",
    bi_scores: Mapping[str, Sequence[float]] | None = None,
    fusion_weight: float = default_of(RerankerSettings, "fusion_weight"),
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[str]], list[float]]:
    """Rescore each query's top ``depth`` with the cross-encoder; the rest keeps its order below.

    A cross-encoder trained on a few thousand pairs should correct the bi-encoder, not replace it:
    - ``"zscore"``: each list's scores are standardised per query (mean 0, sd 1) and blended,
      ``(1 - w) * z(bi-encoder) + w * z(cross-encoder)`` with ``w = fusion_weight``; needs
      ``bi_scores`` (the bi-encoder's scores, aligned with ``rankings``). Scores keep how sure
      each model is, which orders alone lose.
    - ``"rrf"``: 1/(60 + bi-encoder rank) + 1/(60 + cross-encoder rank) (reciprocal rank fusion).
    - ``"none"``: the cross-encoder's order alone.
    Returns the new rankings and the milliseconds each query's rerank took.
    """
    if fusion not in ("zscore", "rrf", "none"):
        raise ValueError(f"unknown fusion {fusion!r}: use 'zscore', 'rrf' or 'none'")
    if fusion == "zscore" and bi_scores is None:
        raise ValueError("zscore fusion needs the bi-encoder's scores (bi_scores)")
    out: dict[str, list[str]] = {}
    times: list[float] = []
    meter = Progress("rerank", len(queries), progress, every_s=30.0)
    for n, (qid, query) in enumerate(queries.items(), 1):
        ranked = list(rankings.get(qid, []))
        head, tail = ranked[:depth], ranked[depth:]
        started = time.perf_counter()
        if head:
            scores = score_pairs(model, query, [texts[d] for d in head], batch_size=batch_size)
            if fusion == "zscore":
                bi = np.asarray(list(bi_scores[qid])[:len(head)], dtype=np.float64)
                scores = (1.0 - fusion_weight) * _standardised(bi) + fusion_weight * _standardised(scores)
            elif fusion == "rrf":
                ce_rank = np.empty(len(head))
                ce_rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(head) + 1)
                scores = 1.0 / (RRF_K + np.arange(1, len(head) + 1)) + 1.0 / (RRF_K + ce_rank)
            order = np.argsort(-scores, kind="stable")
            head = [head[i] for i in order]
        times.append((time.perf_counter() - started) * 1000)
        out[qid] = head + tail
        meter.update(n, force=n == len(queries))
    return out, times


def _standardised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
