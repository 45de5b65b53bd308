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


# -- fork while another thread logs ------------------------------------------------------------------

def fork_while_logging(log_dir: str | Path, children: int = 50, timeout_s: float = 20.0) -> dict:
    """Fork ``children`` processes while a thread of this process logs non-stop; each child logs one
    search and exits. A child whose inherited lock was held by the logging thread at fork time
    would wait forever: it counts as hung (and is killed) when it has not exited in ``timeout_s``.
    Returns {"children", "hung", "failed", "records"} (records: the children's, read back)."""
    import threading

    from flywheel.capture import SearchLogger

    logger = SearchLogger(log_dir, retriever="fork-test")
    stop = threading.Event()
    ts = datetime(2026, 10, 6, 12, tzinfo=timezone.utc)

    def busy():
        i = 0
        while not stop.is_set():
            logger.log_search(f"parent {i}", results_for(0, i), request_id=f"parent-{i}", timestamp=ts)
            i += 1

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    pids = []
    try:
        for c in range(children):
            pid = os.fork()
            if pid == 0:  # child: one search, then leave without running the parent's cleanup
                ok = logger.log_search(f"child {c}", results_for(1, c), request_id=f"child-{c}", timestamp=ts)
                os._exit(0 if ok and logger.stats["failed"] == 0 else 3)
            pids.append(pid)
    finally:
        stop.set()
        thread.join()
    hung = failed = 0
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -1
            else:
                time.sleep(0.005)
        hung += status == -1
        failed += status not in (-1, 0)
    logger.close()
    records = sum(1 for f in Path(log_dir).rglob("*.jsonl") for line in f.read_text("utf-8").splitlines()
                  if '"request_id":"child-' in line)
    return {"children": children, "hung": hung, "failed": failed, "records": records}


# -- a logger sent to another process ------------------------------------------------------------------

def _log_in_child(logger, n: int, tag: str) -> None:
    for i in range(n):
        logger.log_search(f"{tag} {i}", results_for(2, i), request_id=f"{tag}-{i}",
                          timestamp=datetime(2026, 10, 6, 12, tzinfo=timezone.utc))
    logger.close()


def log_from_process(logger, method: str, n: int = 3, timeout_s: float = 120.0) -> int:
    """Send ``logger`` to a process started with ``method`` (spawn, forkserver); its exit code."""
    ctx = mp.get_context(method)
    p = ctx.Process(target=_log_in_child, args=(logger, n, method))
    p.start()
    p.join(timeout_s)
    if p.is_alive():
        p.kill()
        p.join()
        return -9
    return p.exitcode


# -- the type battery ---------------------------------------------------------------------------------

def type_battery() -> list[tuple[str, dict]]:
    """(case, log_search kwargs) for inputs real apps pass: numpy ids and scores, bytes, epoch
    timestamps, offsets, None scores, over-long texts, too many results, and inputs that cannot be
    made valid (they must land in the dead-letter folder, not vanish)."""
    import decimal
    import uuid as _uuid

    import numpy as np

    base = datetime(2026, 10, 6, 12, tzinfo=timezone.utc)
    epoch = base.timestamp()

    def res(**over):
        r = {"chunk_id": "c1", "text": "alpha", "score": 0.5, "rank": 1}
        r.update(over)
        return [r]

    cases = [
        ("np_int64_chunk_id", {"results": res(chunk_id=np.int64(42))}),
        ("np_uint32_chunk_id", {"results": res(chunk_id=np.uint32(7))}),
        ("bytes_chunk_id", {"results": res(chunk_id=b"doc-9")}),
        ("binary_bytes_chunk_id", {"results": res(chunk_id=b"\x00\xff\x10")}),
        ("uuid_chunk_id", {"results": res(chunk_id=_uuid.UUID(int=5))}),
        ("np_float32_score", {"results": res(score=np.float32(0.25))}),
        ("decimal_score", {"results": res(score=decimal.Decimal("0.75"))}),
        ("none_score", {"results": res(score=None)}),
        ("nan_score", {"results": res(score=float("nan"))}),
        ("np_rank", {"results": res(rank=np.int64(1))}),
        ("missing_rank", {"results": [{"chunk_id": "a", "text": "t"}, {"chunk_id": "b", "text": "u"}]}),
        ("epoch_seconds", {"timestamp": epoch}),
        ("epoch_millis", {"timestamp": int(epoch * 1000)}),
        ("epoch_micros_np", {"timestamp": np.int64(int(epoch * 1_000_000))}),
        ("epoch_nanos_str", {"timestamp": str(int(epoch * 1_000_000_000))}),
        ("offset_string", {"timestamp": "2026-10-06T23:30:00-08:00"}),
        ("basic_iso", {"timestamp": "20261006T120000Z"}),
        ("naive_datetime", {"timestamp": datetime(2026, 10, 6, 12)}),
        ("np_datetime64", {"timestamp": np.datetime64("2026-10-06T12:00:00")}),
        ("np_int64_request_id", {"request_id": np.int64(123)}),
        ("bytes_user_id", {"user_id": b"u-1"}),
        ("query_too_long", {"query": "q" * 25_000}),
        ("text_too_long", {"results": res(text="t" * 150_000)}),
        ("too_many_results", {"results": [{"chunk_id": f"c{i}", "text": "t", "score": 1.0, "rank": i + 1}
                                          for i in range(1_500)]}),
        # cannot be made valid: dead-lettered with the reason
        ("unparseable_timestamp", {"timestamp": "next tuesday"}),
        ("dict_chunk_id", {"results": res(chunk_id={"a": 1})}),
        ("duplicate_ranks", {"results": [{"chunk_id": "a", "text": "t", "rank": 1}, {"chunk_id": "b", "text": "t", "rank": 1}]}),
        ("none_query", {"query": None}),
        ("results_not_a_list", {"results": 42}),
    ]
    out = []
    for i, (name, kw) in enumerate(cases):
        kw = dict(kw)
        kw.setdefault("query", f"case {name}")
        kw.setdefault("results", res())
        kw.setdefault("timestamp", base)
        kw.setdefault("request_id", f"case-{i:02d}-{name}")
        out.append((name, kw))
    return out


def run_type_battery(log_dir: str | Path) -> dict:
    """Log every battery case; count where each one went. ``lost_without_trace`` must be 0: every
    call is a valid record, a dead letter with its reason, or a counted failure."""
    import json

    from flywheel.capture import SearchLogger, coerce_id, validate

    cases = type_battery()
    ids = [coerce_id(kw["request_id"], "request_id") for _, kw in cases]
    with SearchLogger(log_dir) as logger:
        for _, kw in cases:
            kw = dict(kw)
            logger.log_search(kw.pop("query"), kw.pop("results"), **kw)
        stats = logger.stats
    valid, dead = set(), {}
    for f in Path(log_dir).glob("day=*/*.jsonl"):
        for line in f.read_text("utf-8").splitlines():
            rec, _ = validate(json.loads(line))  # what capture wrote, the reader accepts
            valid.add(rec["request_id"])
    for f in Path(log_dir).glob("dead-letter/*.jsonl"):
        for line in f.read_text("utf-8").splitlines():
            d = json.loads(line)
            dead[d["record"]["request_id"]] = d["reason"]
    lost = [i for i in ids if i not in valid and i not in dead]
    return {"cases": len(cases), "valid": len(valid), "dead_lettered": len(dead), "failed": stats["failed"],
            "lost_without_trace": len(lost) - stats["failed"], "dead_letter_reasons": dead, "lost_ids": lost}
