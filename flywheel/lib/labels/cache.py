"""A persistent cache of paid judge answers, so no (query, chunk) is ever paid for twice.

Re-materializing a week, or rerunning one that died halfway, must cost nothing for the labels
already bought. Each answer is written (and committed) the moment it arrives, so a run killed
at any point resumes from the last label it received. SQLite in WAL mode: one file, safe across
processes, and a commit per label costs well under a millisecond.

The key is (prompt version, model, normalised query, chunk id, sha256 of the chunk text): a new
prompt version, another model or an edited chunk is a new question. The few-shot examples are
deliberately not part of the key: they change every week, and a label once bought stays valid
until the prompt itself changes (bump ``PROMPT_VERSION`` to re-judge everything).
Only real answers are cached; failures and budget stops are retried by the next run.

A second table remembers how each endpoint and model must be asked (``labels.traits``: the
response format it accepts, whether it takes ``temperature``, the prompt size that fits), so the
next week does not pay again to find out.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from flywheel.lib.labels.judges import normalize_query


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    prompt_version: str
    model: str
    query_key: str
    chunk_id: str
    chunk_sha256: str

    @classmethod
    def of(cls, prompt_version: str, model: str, query: str, chunk_id: str, chunk_text: str) -> "CacheKey":
        return cls(prompt_version, model, normalize_query(query), str(chunk_id), text_sha256(chunk_text))

    @property
    def digest(self) -> str:
        parts = (self.prompt_version, self.model, self.query_key, self.chunk_id, self.chunk_sha256)
        return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedLabel:
    grade: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS judge_labels (
    key TEXT PRIMARY KEY,
    prompt_version TEXT NOT NULL,
    model TEXT NOT NULL,
    query_key TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    chunk_sha256 TEXT NOT NULL,
    grade INTEGER NOT NULL,
    reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    created_at REAL NOT NULL
)
"""

_TRAITS = """
CREATE TABLE IF NOT EXISTS endpoint_traits (
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    traits TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (endpoint, model)
)
"""


class JudgeCache:
    """SQLite-backed label cache; thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
            self._conn.execute(_TRAITS)
            self._conn.commit()

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedLabel]:
        keys = list(keys)
        by_digest = {k.digest: k for k in keys}
        out: dict[CacheKey, CachedLabel] = {}
        digests = list(by_digest)
        with self._lock:
            for i in range(0, len(digests), 500):
                chunk = digests[i:i + 500]
                rows = self._conn.execute(
                    f"SELECT key, grade, reason, prompt_tokens, completion_tokens, cost_usd FROM judge_labels "
                    f"WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                for key, grade, reason, pt, ct, cost in rows:
                    out[by_digest[key]] = CachedLabel(int(grade), reason, int(pt), int(ct), float(cost))
        return out

    def put(self, key: CacheKey, label: CachedLabel) -> None:
        """Store one answer and commit at once: a killed run keeps every label it received."""
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO judge_labels VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    key.digest, key.prompt_version, key.model, key.query_key, key.chunk_id, key.chunk_sha256,
                    label.grade, label.reason, label.prompt_tokens, label.completion_tokens, label.cost_usd,
                    time.time(),
                ),
            )
            self._conn.commit()

    def get_traits(self, endpoint: str, model: str) -> dict | None:
        """How this endpoint and model were last asked successfully (None: never seen)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT traits FROM endpoint_traits WHERE endpoint = ? AND model = ?", (endpoint, model)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def put_traits(self, endpoint: str, model: str, traits: dict) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO endpoint_traits VALUES (?,?,?,?)",
                (endpoint, model, json.dumps(traits, sort_keys=True), time.time()),
            )
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM judge_labels").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
