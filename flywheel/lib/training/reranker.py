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
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence, get_args

import numpy as np

from flywheel.config import RerankerSettings, default_of
from flywheel.lib.progress import Progress
from flywheel.lib.registry import index


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
PASSAGES = get_args(RerankerSettings.model_fields["passages"].annotation)  # what it reads of a long chunk
_CACHED_PASSAGES = 16_384  # chunks whose sentences, terms and token counts are kept between queries
_WORD = re.compile(r"\S+")
_TERM = re.compile(r"[a-z0-9]+")
STEM = 6  # a term matches on its first characters: "increases", "increased" and "increasing" meet
_STOP = frozenset(
    "a about above after again all also an and any are as at be because been before being below between both but "
    "by can could did do does doing down during each few for from further had has have having he her here hers "
    "him his how i if in into is it its itself just may might more most must no nor not now of off on once only "
    "or other our out over own same she should so some such than that the their them then there these they this "
    "those through to too under until up very was we were what when where which while who whom why will with "
    "would you your".split())


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


def _terms(text: str) -> set[str]:
    return {t[:STEM] for t in _TERM.findall(text.lower()) if len(t) > 2 and t not in _STOP}


@lru_cache(maxsize=_CACHED_PASSAGES)
def _sentences(passage: str) -> tuple[tuple[str, ...], tuple[frozenset[str], ...]]:
    """A chunk's sentences and each one's terms: the same for every query, so kept between queries
    (a week reranks the same popular chunks for many queries)."""
    parts = tuple(index.split_sentences(passage))
    return parts, tuple(frozenset(_terms(s)) for s in parts)


@lru_cache(maxsize=_CACHED_PASSAGES)
def _token_counts(tokenizer, passage: str) -> tuple[int, ...]:
    """Tokens in each of a chunk's sentences (``tokenizer``'s, without special tokens)."""
    parts, _ = _sentences(passage)
    return tuple(len(ids) for ids in tokenizer(list(parts), add_special_tokens=False)["input_ids"])


def forget_sentences() -> None:
    """Drop every chunk's kept sentences and token counts (to time the selection from scratch)."""
    _sentences.cache_clear()
    _token_counts.cache_clear()


def focused_passages(query: str, passages: Sequence[str], tokenizer, max_length: int) -> list[str]:
    """Each passage as the cross-encoder should read it next to ``query`` within ``max_length`` tokens.

    A pair is truncated to ``max_length`` tokens, so a long passage is read only from its start:
    a title and a first sentence or two, while the claim a query asks about often sits further
    down an abstract. A passage that does not fit keeps its first sentence (the title, where the
    chunk has one) and then the run of consecutive sentences that fits and holds the most of the
    query's terms, each term weighted by how few of ``passages`` contain it (its idf within the
    candidates: the topic word every candidate shares tells them apart least); a skipped stretch
    is marked "...". A passage that fits, one no later sentence of which shares a query term,
    or whose best run starts right after its first sentence, is kept as it is (then the
    truncation reads the same tokens). The same selection runs in training and when reranking,
    so the model learns on what it will be shown. Query-biased passage selection in the manner of
    Tombros and Sanderson (SIGIR 1998) for snippets, and of FirstP/MaxP for BERT rerankers (Dai
    and Callan, SIGIR 2019), at the cost of one pair per candidate. A chunk's sentences, terms
    and token counts do not depend on the query: they are computed once per chunk and kept.
    """
    query_terms = _terms(query)
    budget = max_length - len(tokenizer(query, add_special_tokens=False)["input_ids"]) - 3  # [CLS] q [SEP] p [SEP]
    split = [_sentences(p) for p in passages]
    df = {t: sum(any(t in st for st in terms) for _, terms in split) for t in query_terms}
    idf = {t: float(np.log(1.0 + len(passages) / (1.0 + n))) for t, n in df.items()}
    out = []
    for passage, (parts, terms) in zip(passages, split):
        if len(parts) < 3 or budget <= 0:
            out.append(passage)
            continue
        lengths = _token_counts(tokenizer, passage)
        if sum(lengths) <= budget:
            out.append(passage)
            continue
        weight = [sum(idf[t] for t in query_terms & st) for st in terms]
        room = budget - lengths[0]
        best, best_start, best_end = 0.0, 1, 1
        for start in range(1, len(parts)):
            end, used = start, 0
            while end < len(parts) and (end == start or used + lengths[end] <= room):
                used += lengths[end]
                end += 1
            got = sum(weight[start:end])
            if got > best:
                best, best_start, best_end = got, start, end
        if best_start == 1:
            out.append(passage)
            continue
        out.append(" ".join([parts[0], "...", *parts[best_start:best_end]]))
    return out


def check_passages(passages: str) -> str:
    """``passages`` if it names a way of reading chunks (:data:`PASSAGES`), else a ValueError."""
    if passages not in PASSAGES:
        raise ValueError(f"unknown passages {passages!r}: use {' or '.join(repr(p) for p in PASSAGES)}")
    return passages


def passages_as_read(model, query: str, passages: Sequence[str], read: str = "head") -> list[str]:
    """Each passage as the cross-encoder reads it next to ``query``. ``read`` is what it reads of a
    long passage (``RerankerSettings.passages``): ``"head"`` its start, ``"focused"`` the selection
    of :func:`focused_passages`.

    A pair is truncated to ``model.max_seq_length`` tokens, so each passage is first cut after as many
    words: a word is at least one token, so the model sees the same tokens, and the tokenizer no
    longer reads the rest of a long passage only to drop it. (A word made only of characters the
    tokenizer drops, such as control characters, is no token: each one leaves the pair a token
    short.)"""
    limit = getattr(model, "max_seq_length", None)
    if check_passages(read) == "focused" and limit:
        passages = focused_passages(query, passages, model.tokenizer, limit)
    return [head_words(p, limit) for p in passages] if limit else list(passages)


def score_pairs(model, query: str, passages: Sequence[str], *, batch_size: int = 64,
                read: str = "head") -> np.ndarray:
    """The cross-encoder's scores of ``(query, passage)`` for each passage, each read as
    :func:`passages_as_read` gives it."""
    passages = passages_as_read(model, query, passages, read)
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
    passages: str = "head",
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
    ``passages``: what the cross-encoder reads of each chunk, as it was trained (``RerankerSettings.passages``):
    ``"head"`` its start, ``"focused"`` its start and the sentences nearest the query (:func:`focused_passages`).
    Returns the new rankings and the milliseconds each query's rerank took.
    """
    if fusion not in ("zscore", "rrf", "none"):
        raise ValueError(f"unknown fusion {fusion!r}: use 'zscore', 'rrf' or 'none'")
    check_passages(passages)
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
            scores = score_pairs(model, query, [texts[d] for d in head], batch_size=batch_size,
                                 read=passages)
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
