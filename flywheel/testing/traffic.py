"""Sample search traffic from SciFact for tests and benchmarks: raw_logs rows and judge requests."""

from __future__ import annotations

from flywheel.lib.labels.judges import normalize_query, stable_uniform


def scifact_raw_logs(dataset, *, n_queries: int, distractors: int = 3, offset: int = 0, week: str = "2026-09-28"):
    """raw_logs rows for ``n_queries`` train queries: each retrieves its relevant chunks and
    ``distractors`` others (chosen by a stable hash), with no user feedback."""
    from datetime import datetime, timedelta

    import pandas as pd

    qrels = dataset.qrels["train"]
    qids = sorted(qrels, key=lambda q: stable_uniform("sample", q))[offset:offset + n_queries]
    text = dataset.corpus.text_by_id
    ids = dataset.corpus.ids
    start = datetime.fromisoformat(week)
    rows = []
    for n, qid in enumerate(qids):
        relevant = [c for c in qrels[qid] if c in text]
        others = [ids[int(stable_uniform("distractor", qid, i) * len(ids))] for i in range(distractors)]
        chunks = list(dict.fromkeys(relevant + [c for c in others if c not in relevant]))
        chunks.sort(key=lambda c: stable_uniform("order", qid, c))
        rows.append({
            "request_id": f"req-{week}-{n:05d}",
            "timestamp": start + timedelta(minutes=n),
            "query": dataset.queries[qid],
            "results": [
                {"chunk_id": c, "text": text[c], "score": 1.0 - 0.01 * r, "rank": r + 1}
                for r, c in enumerate(chunks)
            ],
            "clicks": [], "saves": [], "cited": [], "thumbs": None, "dwell_ms": None,
        })
    return pd.DataFrame(rows)


def requests_of(raw_logs) -> list:
    """The unique (query, chunk) JudgeRequests of raw_logs rows, in order."""
    from flywheel.lib.labels.judges import JudgeRequest

    seen, out = set(), []
    for rec in raw_logs.itertuples(index=False):
        for r in rec.results:
            key = (normalize_query(rec.query), r["chunk_id"])
            if key not in seen:
                seen.add(key)
                out.append(JudgeRequest(rec.query, r["chunk_id"], r["text"], int(r["rank"])))
    return out
