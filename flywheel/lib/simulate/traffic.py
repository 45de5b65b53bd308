"""Demo traffic: weeks of realistic RAG searches over a BEIR dataset, written through the
capture library exactly as an app would log them.

Train-split queries only (the test split is the yardstick and never becomes traffic), spread
over N weeks with some repeats. Each search retrieves the top k chunks from a LanceDB index of
the corpus, embedded by whatever model serves that week and scored as the pipeline serves it
(with sentence units, ``TrainingSettings.sentence_units``: the table every weekly model and the
``serving`` table search, so the logs show what the flywheel says serves). Users click with
position bias on relevant chunks (plus some noise clicks), occasionally give thumbs up/down, and
the generated answer cites some chunks. Everything is deterministic given the seed.

Weeks can be simulated one at a time (``only_weeks``), each retrieved by the model serving
then, so a promotion changes what the next week's logs contain, as it would in production.

A poisoned week (``poison_weeks``, off by default) replays a broken ingestion job: it re-logs
every query asked so far with each chunk id joined to the wrong chunk text. Judged by id, the
labels of every (query, chunk) pair now point at shuffled texts, and, the newest label of a
pair winning, they replace the clean history: the model trained that week learns noise, and
the gate has to stop it.
"""

from __future__ import annotations

from flywheel.config import TiersSettings, TrainingSettings, default_of
import logging
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from flywheel.lib.registry import index
from flywheel.lib.beir import load_beir
from flywheel.lib.labels.judges import stable_uniform

log = logging.getLogger(__name__)


@dataclass
class SimulationConfig:
    dataset_dir: Path
    log_dir: Path
    lancedb_uri: Path
    model_path: str
    start: date
    weeks: int = 8
    seed: int = 0
    top_k: int = default_of(TiersSettings, "top_k")
    repeat_rate: float = 0.15
    max_queries: int | None = None  # None: every train query
    # user behaviour
    examine_decay: float = 0.8  # P(user looks at rank r) = r ** -examine_decay
    click_relevant: float = 0.7
    click_noise: float = 0.03
    thumbs_rate: float = 0.12
    cite_relevant: float = 0.8
    cite_noise: float = 0.1
    encode_max_seq_length: int = default_of(TrainingSettings, "encode_max_seq_length")
    encode_batch_size: int = default_of(TrainingSettings, "encode_batch_size")
    precision: str = "fp32"  # of the serving encoders (TrainingSettings.inference_precision)
    sentence_units: float = default_of(TrainingSettings, "sentence_units")  # of the serving first stage
    openvino_cache: Path | None = None  # converted OpenVINO networks kept between processes (Layout.openvino_cache)
    query_precision: str = "auto"  # of the serving query encoder (TrainingSettings.query_precision)
    device: str = "auto"
    poison_weeks: tuple[int, ...] = ()  # 0-based week indices


@dataclass
class SimulationSummary:
    weeks: list[str]
    searches: int
    unique_queries: int
    repeats: int
    feedback_events: int
    searches_per_week: dict = field(default_factory=dict)
    retriever_version: str = ""
    recall_at_k: float = 0.0  # share of searches whose top k holds a human-relevant chunk


def week_starts(start: date, weeks: int) -> list[date]:
    monday = start - timedelta(days=start.weekday())
    return [monday + timedelta(weeks=i) for i in range(weeks)]


def plan_traffic(query_ids: list[str], cfg: SimulationConfig) -> list[tuple[int, str, datetime]]:
    """(week index, query id, timestamp) for every search, in time order."""
    rng = np.random.default_rng(cfg.seed)
    ids = list(query_ids)
    rng.shuffle(ids)
    if cfg.max_queries:
        ids = ids[: cfg.max_queries]
    starts = week_starts(cfg.start, cfg.weeks)
    plan = []
    for i, qid in enumerate(ids):
        w = i * cfg.weeks // max(len(ids), 1)
        plan.append((w, qid))
        # some users ask again, in the same week or a later one
        if rng.random() < cfg.repeat_rate:
            plan.append((int(rng.integers(w, cfg.weeks)), qid))
    out = []
    for w, qid in plan:
        offset = timedelta(seconds=int(rng.integers(0, 7 * 24 * 3600)))
        ts = datetime.combine(starts[w], datetime.min.time(), tzinfo=timezone.utc) + offset
        out.append((w, qid, ts))
    out.sort(key=lambda x: x[2])
    return out


def poisoned_replay(plan: list[tuple[int, str, datetime]], cfg: SimulationConfig) -> list[tuple[int, str, datetime]]:
    """For each poisoned week, every query asked up to its end, re-logged within that week."""
    starts = week_starts(cfg.start, cfg.weeks)
    extra = []
    for w in sorted(set(cfg.poison_weeks)):
        asked = sorted({qid for pw, qid, _ in plan if pw <= w})
        base = datetime.combine(starts[w], datetime.min.time(), tzinfo=timezone.utc) + timedelta(days=6, hours=23)
        extra += [(w, qid, base + timedelta(seconds=i % 3000)) for i, qid in enumerate(asked)]
    return extra


def _numbered_plan(
    query_ids: list[str], cfg: SimulationConfig, only_weeks: list[int] | None,
) -> list[tuple[int, int, str, datetime, bool]]:
    """(search number, week index, query id, timestamp, poisoned) of every search to write: the
    planned traffic, then the poisoned weeks' replays; only those of ``only_weeks`` when given."""
    full_plan = plan_traffic(query_ids, cfg)
    plan = [(n, *p, False) for n, p in enumerate(full_plan)]
    plan += [(len(full_plan) + i, *p, True) for i, p in enumerate(poisoned_replay(full_plan, cfg))]
    if only_weeks is not None:
        plan = [p for p in plan if p[1] in set(only_weeks)]
    return plan


def _retrieve(cfg: SimulationConfig, ds, train: dict[str, str], plan: list[tuple],
              serving: tuple[str, str] | None, progress: Callable[[str], None] | None, hybrid: Mapping | None = None):
    """Index the corpus with the serving model (once per model) and retrieve the top k of every
    planned search: (version label, corpus encoder id, chunk text by id, hits per search). With
    ``hybrid``, the serving model's list is fused with BM25 exactly as the weekly report fuses it
    (both top ``SEARCH_DEPTH``), then cut to the top k."""
    model_path, version = serving or (cfg.model_path, "base")
    model = index.load_embedder(model_path, device=cfg.device, max_seq_length=cfg.encode_max_seq_length,
                                precision=cfg.precision, query_precision=cfg.query_precision,
                                cache_dir=cfg.openvino_cache)
    model_id = index.corpus_encoder_id(model_path)
    table = index.ensure_corpus_table(
        cfg.lancedb_uri, model, model_id, ds.corpus, batch_size=cfg.encode_batch_size, progress=progress,
        units=cfg.sentence_units,
    )
    texts_by_id = ds.corpus.text_by_id
    queries = [train[qid] for _, _, qid, _, _ in plan]
    if hybrid:
        from flywheel.lib.evaluation.metrics import SEARCH_DEPTH
        from flywheel.lib.registry import hybrid as keyword

        bm25 = keyword.ensure_bm25_table(cfg.lancedb_uri, ds.corpus, progress=progress)
        fused = keyword.hybrid_search(model, cfg.lancedb_uri, table, bm25, queries, k=SEARCH_DEPTH,
                                      fusion=hybrid["fusion"], bm25_weight=hybrid["bm25_weight"])
        return version, model_id, texts_by_id, [h[:cfg.top_k] for h in fused]
    qvecs = index.encode(model, queries, batch_size=cfg.encode_batch_size, task="query")
    hits = index.search(cfg.lancedb_uri, table, qvecs, cfg.top_k)
    return version, model_id, texts_by_id, hits


def _logged_chunks(cfg: SimulationConfig, n: int, results, poisoned: bool, texts_by_id: dict[str, str],
                   ids: list[str]) -> list[dict]:
    """The retrieved chunks of search ``n`` as the app logs them."""
    return [
        {
            "chunk_id": cid,
            # the broken join of a poisoned week: right id, someone else's text
            "text": texts_by_id[ids[int(stable_uniform("poison", cfg.seed, n, cid) * len(ids))]]
            if poisoned else texts_by_id[cid],
            "score": round(score, 6),
            "rank": r,
        }
        for r, (cid, score) in enumerate(results, start=1)
    ]


def simulate(
    cfg: SimulationConfig,
    *,
    only_weeks: list[int] | None = None,
    serving: tuple[str, str] | None = None,
    hybrid: Mapping | None = None,
    progress: Callable[[str], None] | None = None,
) -> SimulationSummary:
    """Write the planned searches (of ``only_weeks``, default all) retrieved by ``serving``.

    ``serving`` is (model folder, version label) of the model in production; default the base.
    ``hybrid`` is the keyword fusion that serves with it (``{"fusion", "bm25_weight"}``, as
    ``serving.json`` records it), if any: the app then shows the fused list.
    """
    from flywheel.capture import SearchLogger

    ds = load_beir(cfg.dataset_dir)
    if ds.load_notes and progress:
        progress("; ".join(ds.load_notes))
    train = ds.split_queries("train")
    qrels = ds.qrels["train"]
    plan = _numbered_plan(list(train), cfg, only_weeks)
    version, model_id, texts_by_id, hits = _retrieve(cfg, ds, train, plan, serving, progress, hybrid)

    starts = week_starts(cfg.start, cfg.weeks)
    weeks_done = sorted({w for _, w, _, _, _ in plan})
    per_week = {starts[w].isoformat(): 0 for w in weeks_done}
    feedback_events, found = 0, 0
    ids = list(ds.corpus.ids)
    # The demo's texts are public scientific abstracts with no personal data; redaction stays
    # available for real apps (it is on by default in the capture library).
    retriever = f"lancedb-dense+bm25-{hybrid['fusion']}" if hybrid else "lancedb-dense"
    with SearchLogger(cfg.log_dir, redact_pii=False, retriever=retriever, retriever_version=version) as logger:
        for (n, w, qid, ts, poisoned), results in zip(plan, hits):
            rid = str(uuid.UUID(int=int(stable_uniform("request", cfg.seed, n) * 2**128)))
            chunks = _logged_chunks(cfg, n, results, poisoned, texts_by_id, ids)
            logger.log_search(train[qid], chunks, request_id=rid, timestamp=ts, user_id=f"user-{hash_bucket(cfg.seed, qid)}")
            per_week[starts[w].isoformat()] += 1
            relevant = {cid for cid, s in qrels[qid].items() if s > 0}
            found += any(c["chunk_id"] in relevant for c in chunks)
            signals = _user_signals(cfg, n, chunks, relevant)
            if signals:
                feedback_events += 1
                logger.log_feedback(rid, timestamp=ts + timedelta(seconds=30), **signals)
    unique = len({qid for _, _, qid, _, _ in plan})
    return SimulationSummary(
        weeks=list(per_week),
        searches=len(plan),
        unique_queries=unique,
        repeats=len(plan) - unique,
        feedback_events=feedback_events,
        searches_per_week=per_week,
        retriever_version=f"{version} ({model_id})",
        recall_at_k=found / max(len(plan), 1),
    )


def hash_bucket(seed: int, key: str, buckets: int = 200) -> int:
    return int(stable_uniform("user", seed, key) * buckets)


def _user_signals(cfg: SimulationConfig, n: int, chunks: list[dict], relevant: set[str]) -> dict:
    clicks, cited = [], []
    for c in chunks:
        u = stable_uniform("click", cfg.seed, n, c["chunk_id"])
        examined = stable_uniform("examine", cfg.seed, n, c["chunk_id"]) < c["rank"] ** -cfg.examine_decay
        is_rel = c["chunk_id"] in relevant
        if examined and u < (cfg.click_relevant if is_rel else cfg.click_noise):
            clicks.append(c["chunk_id"])
        # the generated answer reads the top 5 chunks and cites the useful ones (and sometimes not)
        if c["rank"] <= 5:
            v = stable_uniform("cite", cfg.seed, n, c["chunk_id"])
            if v < (cfg.cite_relevant if is_rel else cfg.cite_noise):
                cited.append(c["chunk_id"])
    thumbs = None
    if stable_uniform("thumbs", cfg.seed, n) < cfg.thumbs_rate:
        thumbs = "up" if any(c["chunk_id"] in relevant for c in chunks[:3]) else "down"
    if not clicks and not cited and thumbs is None:
        return {}
    dwell = 1000.0 * (5 + 60 * stable_uniform("dwell", cfg.seed, n)) if clicks else None
    return {"clicks": clicks, "cited": cited, "thumbs": thumbs, "dwell_ms": dwell}
