"""A concurrency torture run for the capture library, shared by the tests and ``benchmarks/capture.py``.

N writer processes log through ``SearchLogger`` at full speed into one log directory; one of them
can be SIGKILLed mid-run. Each writer publishes, in shared memory, how many events it has
*returned from* (the acknowledgement an app gets), so the caller can check afterwards that every
acknowledged event is read back exactly once, and nothing else but at most the one in flight.
Events are deterministic functions of (writer, i), so their content can be checked too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

FEEDBACK_EVERY = 5
_QUERIES = [
    "what causes {n} failures in cell membranes?",
    "¿qué efecto tiene la proteína {n} en ratones? 🧬",
    "ما هو تأثير الدواء {n} على المرضى",  # right-to-left text
    "contact me at user{n}@example.org about trial {n}",  # PII: redacted at capture
]


def request_id_for(writer: int, i: int) -> str:
    return f"w{writer:02d}-{i:07d}"


def query_for(writer: int, i: int) -> str:
    return _QUERIES[i % len(_QUERIES)].format(n=writer * 1_000_000 + i)


def results_for(writer: int, i: int, k: int = 3) -> list[dict]:
    return [
        {"chunk_id": f"doc{(i * 7 + r) % 5000}", "text": f"passage {r} for event {i} of writer {writer}",
         "score": round(1.0 - r * 0.1, 3), "rank": r + 1, "metadata": {"source": "stress"}}
        for r in range(k)
    ]


def timestamp_for(week_start: date, i: int) -> datetime:
    start = datetime(week_start.year, week_start.month, week_start.day, tzinfo=timezone.utc)
    return start + timedelta(days=i % 7, seconds=(i * 13) % 86_000, microseconds=i % 1000)


def _writer_main(log_dir: str, writer: int, n: int, week_start: str, acked, go, latency_dir: str | None):
    from flywheel.capture import SearchLogger

    ws = date.fromisoformat(week_start)
    lat = bytearray()
    go.wait()
    with SearchLogger(log_dir, retriever="stress", retriever_version="1") as logger:
        for i in range(n):
            rid = request_id_for(writer, i)
            ts = timestamp_for(ws, i)
            t0 = time.perf_counter_ns()
            logger.log_search(query_for(writer, i), results_for(writer, i), request_id=rid,
                              user_id=f"u{writer}", session_id=f"s{writer}-{i // 50}", timestamp=ts)
            t1 = time.perf_counter_ns()
            if i % FEEDBACK_EVERY == 0:
                logger.log_feedback(rid, clicks=[f"doc{(i * 7) % 5000}"], thumbs="up", dwell_ms=1000.0,
                                    timestamp=ts + timedelta(seconds=5))
            acked[writer] = i + 1  # published only after the calls returned
            lat += struct.pack("<I", min((t1 - t0) // 1000, 2**32 - 1))
        failed = logger.stats["failed"]
    if latency_dir:
        Path(latency_dir, f"{writer}.lat").write_bytes(bytes(lat))
    os._exit(0 if failed == 0 else 3)


@dataclass
class StressResult:
    writers: int
    events_per_writer: int
    acked: list[int]
    killed: int | None
    killed_at: int | None
    exit_codes: list[int | None]
    seconds: float
    latencies_us: list[int] = field(default_factory=list)

    @property
    def events_acknowledged(self) -> int:
        return sum(self.acked)


def run_writers(
    log_dir: str | Path,
    *,
    week_start: date,
    writers: int = 8,
    events: int = 10_000,
    kill_writer: int | None = 0,
    kill_after: int | None = None,
    latency_dir: str | Path | None = None,
    start_method: str | None = None,
    timeout_s: float = 300.0,
) -> StressResult:
    """Run ``writers`` processes of ``events`` each; SIGKILL ``kill_writer`` once it acked ``kill_after``."""
    method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    acked = ctx.Array("q", writers, lock=False)
    go = ctx.Event()
    kill_after = events // 3 if kill_after is None else kill_after
    procs = [
        ctx.Process(target=_writer_main, args=(str(log_dir), w, events, week_start.isoformat(), acked, go,
                                               str(latency_dir) if latency_dir else None), daemon=True)
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    t0 = time.perf_counter()
    go.set()
    killed = killed_at = None
    deadline = time.monotonic() + timeout_s
    if kill_writer is not None:
        while acked[kill_writer] < kill_after and procs[kill_writer].is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        if procs[kill_writer].is_alive():
            os.kill(procs[kill_writer].pid, signal.SIGKILL)
            killed = kill_writer
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    if killed is not None:
        killed_at = acked[killed]
    seconds = time.perf_counter() - t0
    lat: list[int] = []
    if latency_dir:
        for w in range(writers):
            f = Path(latency_dir, f"{w}.lat")
            if f.exists():
                data = f.read_bytes()
                lat.extend(struct.unpack(f"<{len(data) // 4}I", data))
    return StressResult(writers, events, list(acked), killed, killed_at, [p.exitcode for p in procs], seconds, lat)
