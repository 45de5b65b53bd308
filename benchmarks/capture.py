"""Capture + raw_logs benchmark: lossless concurrent writing under SIGKILL, latency, ingest throughput,
forked children, the type battery, real exports and unread files.

    python benchmarks/capture.py            # a few minutes on 2 cores

1. 8 writer processes x 10,000 events through ``SearchLogger`` (one feedback per 5 searches),
   writer 0 SIGKILLed after 3,000 acknowledged events; every acknowledged event must be read back
   exactly once and every row must match what was logged. Capture latency = one ``log_search``.
2. 1,000,000 synthetic search records (short texts, 3 results, 0.1% malformed lines) in 16 day files,
   ingested by ``ingest_week`` in a fresh process: rows/s (one process, so one core) and its peak RSS.
3. 1,000 children forked (10 rounds of 100) while a thread of the parent logs non-stop: hung children.
4. The type battery (numpy/bytes ids, epoch timestamps, offsets, limits, invalid inputs): records
   neither written valid, nor dead-lettered, nor counted as failed.
5. Every real export in flywheel_tests/fixtures/exports: retriever records per format (known from
   the files), imported (read back from the log folder), lost.
6. A log folder with every kind of file (other names, gzip, rotated, BOM, unpadded day, nested,
   hidden, dangling and outside symlinks): files neither read nor reported by the ingest.
Prints figures as it goes; the last line is one JSON object.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.capture import redact  # noqa: E402
from flywheel.testing.capture_stress import FEEDBACK_EVERY, query_for, request_id_for, run_writers  # noqa: E402

WEEK = date(2026, 10, 5)
WRITERS, EVENTS, KILL_AFTER = 8, 10_000, 3_000
INGEST_RECORDS = 1_000_000


def _pct(values: list[int], p: float) -> float:
    s = sorted(values)
    return float(s[min(len(s) - 1, int(p / 100 * len(s)))]) if s else float("nan")


def _ingest_child(log_dir: str, out: str, q: str, conn) -> None:
    import resource

    from flywheel.lib.logs.ingest import ingest_week

    t0 = time.perf_counter()
    stats = ingest_week(Path(log_dir), WEEK, WEEK + timedelta(days=7), Path(out), Path(q))
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    conn.send({"seconds": seconds, "rss_mb": rss_mb, "stats": stats.to_metadata()})
    conn.close()


def _ingest_in_fresh_process(log_dir: Path, out: Path, q: Path) -> dict:
    ctx = mp.get_context("spawn")  # a clean interpreter: its peak RSS is the ingest's own
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_ingest_child, args=(str(log_dir), str(out), str(q), child))
    p.start()
    result = parent.recv()
    p.join()
    return result


def stress(tmp: Path) -> dict:
    from flywheel.lib.logs.ingest import ingest_week, load_raw_logs

    print(f"[1/6] {WRITERS} writers x {EVENTS:,} events, writer 0 SIGKILLed after {KILL_AFTER:,} ...", flush=True)
    log_dir = tmp / "stress-logs"
    r = run_writers(log_dir, week_start=WEEK, writers=WRITERS, events=EVENTS, kill_writer=0,
                    kill_after=KILL_AFTER, latency_dir=tmp)
    print(f"      writers done in {r.seconds:.1f}s; killed writer 0 at {r.killed_at:,} acknowledged events; "
          f"exit codes {r.exit_codes}", flush=True)
    stats = ingest_week(log_dir, WEEK, WEEK + timedelta(days=7), tmp / "stress.parquet", tmp / "stress-q.parquet")
    df = load_raw_logs(tmp / "stress.parquet")
    ids = df["request_id"].tolist()
    got = set(ids)
    acked = {request_id_for(w, i) for w in range(WRITERS) for i in range(r.acked[w])}
    corrupt = 0
    for row in df.itertuples():
        try:
            w, i = int(row.request_id[1:3]), int(row.request_id[4:])
            ok = (row.query == redact(query_for(w, i)) and [x["rank"] for x in row.results] == [1, 2, 3]
                  and (len(row.clicks) == 1) == (i % FEEDBACK_EVERY == 0))
        except (ValueError, TypeError):
            ok = False
        corrupt += not ok
    out = {
        "writers": WRITERS,
        "events_per_writer": EVENTS,
        "killed_writer_acknowledged": r.killed_at,
        "events_acknowledged": r.events_acknowledged,
        "events_read": len(ids),
        "lost": len(acked - got),
        "duplicated": len(ids) - len(got),
        "unacknowledged_in_flight_read": len(got - acked),
        "corrupt_rows_in_raw_logs": corrupt,
        "stress_quarantined": stats.quarantined_total,
        "capture_p50_us": _pct(r.latencies_us, 50),
        "capture_p99_us": _pct(r.latencies_us, 99),
        **single_writer_latency(tmp),
        "capture_events_per_s_all_writers": round((r.events_acknowledged * (1 + 1 / FEEDBACK_EVERY)) / r.seconds),
    }
    print(f"      acknowledged {out['events_acknowledged']:,}, read {out['events_read']:,}, lost {out['lost']}, "
          f"duplicated {out['duplicated']}, corrupt rows {corrupt}, quarantined {stats.quarantined_total}; "
          f"log_search p50 {out['capture_p50_us']:.0f} us, p99 {out['capture_p99_us']:.0f} us with 8 writers on "
          f"the machine's cores; alone: p50 {out['capture_single_writer_p50_us']:.0f} us, "
          f"p99 {out['capture_single_writer_p99_us']:.0f} us", flush=True)
    return out


def single_writer_latency(tmp: Path, n: int = 5_000) -> dict:
    """log_search latency with the process alone (the 8-writer p99 includes waiting for a core)."""
    from flywheel.capture import SearchLogger
    from flywheel.testing.capture_stress import results_for, timestamp_for

    lat = []
    with SearchLogger(tmp / "single-logs") as logger:
        for i in range(n):
            q, res, ts = query_for(99, i), results_for(99, i), timestamp_for(WEEK, i)
            t0 = time.perf_counter_ns()
            logger.log_search(q, res, timestamp=ts)
            lat.append((time.perf_counter_ns() - t0) // 1000)
    return {"capture_single_writer_p50_us": _pct(lat, 50), "capture_single_writer_p99_us": _pct(lat, 99)}


def generate(log_dir: Path, n: int, seed: int = 0) -> tuple[int, int]:
    """n search records over the week's 7 days (16 files), 0.1% malformed lines; returns (good, bad)."""
    rng = random.Random(seed)
    start = datetime(WEEK.year, WEEK.month, WEEK.day, tzinfo=timezone.utc)
    files = {}
    for f in range(16):
        day = (WEEK + timedelta(days=f % 7)).isoformat()
        folder = log_dir / f"day={day}"
        folder.mkdir(parents=True, exist_ok=True)
        files[f] = open(folder / f"gen-{f}.jsonl", "w", encoding="utf-8")
    words = ["protein", "cell", "gene", "dose", "trial", "risk", "cancer", "virus", "brain", "blood"]
    good = bad = 0
    for i in range(n):
        f = i % 16
        if rng.random() < 0.001:
            files[f].write('{"schema_version":1,"type":"search","request_id":"broken\n')
            bad += 1
            continue
        ts = start + timedelta(days=f % 7, seconds=rng.randrange(86_400))
        q = " ".join(rng.choices(words, k=6))
        rec = {"schema_version": 1, "type": "search", "request_id": f"g{i:08d}",
               "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "query": q, "user_id": f"u{i % 997}",
               "session_id": None, "retriever": "bench", "retriever_version": "1",
               "results": [{"chunk_id": f"d{(i + k) % 50_000}", "text": f"{q} passage {k}", "score": 1.0 - k / 10,
                            "rank": k + 1, "metadata": None} for k in range(3)]}
        files[f].write(json.dumps(rec, separators=(",", ":")) + "\n")
        good += 1
    for fh in files.values():
        fh.close()
    return good, bad


def ingest_benchmark(tmp: Path) -> dict:
    log_dir = tmp / "bulk-logs"
    print(f"[2/6] generating {INGEST_RECORDS:,} records ...", flush=True)
    t0 = time.perf_counter()
    good, bad = generate(log_dir, INGEST_RECORDS)
    size_mb = sum(p.stat().st_size for p in log_dir.rglob("*.jsonl")) / 2**20
    print(f"      {good:,} good + {bad:,} malformed lines, {size_mb:.0f} MB, in {time.perf_counter() - t0:.1f}s",
          flush=True)
    print("      ingesting in a fresh process ...", flush=True)
    r = _ingest_in_fresh_process(log_dir, tmp / "bulk.parquet", tmp / "bulk-q.parquet")
    s = r["stats"]
    rate = s["read"] / r["seconds"]
    print(f"      read {s['read']:,}, rows {s['rows']:,}, quarantined {s['quarantined']} in {r['seconds']:.1f}s "
          f"= {rate:,.0f} rows/s, peak RSS {r['rss_mb']:.0f} MB", flush=True)
    assert s["rows"] == good and s["quarantined_total"] == bad, "ingest lost or invented rows"
    return {"ingest_records": s["read"], "ingest_rows": s["rows"], "ingest_quarantined": s["quarantined_total"],
            "ingest_seconds": round(r["seconds"], 2), "ingest_rows_per_s": round(rate),
            "ingest_peak_rss_mb": round(r["rss_mb"], 1), "ingest_input_mb": round(size_mb, 1)}


FORK_ROUNDS, FORK_CHILDREN = 10, 100
EXPORTS = Path(__file__).resolve().parents[1] / "flywheel_tests" / "fixtures" / "exports"
# fixture -> (format, retriever records in the file, counted by reading it)
REAL_EXPORTS = {
    "langchain_console.txt": ("openinference", 2), "llamaindex_spans.jsonl": ("openinference", 1),
    "haystack_console.txt": ("openinference", 1), "langchain_otlp.json": ("otlp", 2),
    "haystack_otlp.json": ("otlp", 1), "phoenix_span.json": ("phoenix", 1), "mlflow_trace.json": ("mlflow", 1),
    "langfuse_observations.json": ("langfuse", 2), "langsmith_runs.jsonl": ("langsmith", 1),
}


def forked_children(tmp: Path) -> dict:
    from flywheel.testing.capture_stress import fork_while_logging

    print(f"[3/6] {FORK_ROUNDS * FORK_CHILDREN:,} children forked while a parent thread logs ...", flush=True)
    hung = failed = records = 0
    for r in range(FORK_ROUNDS):
        out = fork_while_logging(tmp / f"fork-{r}", children=FORK_CHILDREN, timeout_s=30)
        hung, failed, records = hung + out["hung"], failed + out["failed"], records + out["records"]
    print(f"      hung {hung}, failed {failed}, children's records read back {records:,}", flush=True)
    return {"forked_children": FORK_ROUNDS * FORK_CHILDREN, "forked_children_hung": hung,
            "forked_children_failed": failed, "forked_children_records": records}


def type_battery(tmp: Path) -> dict:
    from flywheel.testing.capture_stress import run_type_battery

    r = run_type_battery(tmp / "battery")
    print(f"[4/6] type battery: {r['cases']} cases, {r['valid']} written valid, {r['dead_lettered']} dead-lettered "
          f"with a reason, {r['failed']} failed, {r['lost_without_trace']} lost without a trace", flush=True)
    return {"type_battery_cases": r["cases"], "type_battery_dead_lettered": r["dead_lettered"],
            "records_lost_without_trace": r["lost_without_trace"]}


def real_exports(tmp: Path) -> dict:
    from flywheel.capture.importers import import_file

    print("[5/6] real exports ...", flush=True)
    out: dict[str, dict] = {}
    for name, (fmt, records) in REAL_EXPORTS.items():
        log_dir = tmp / "exports" / name
        import_file(EXPORTS / name, log_dir, format="auto")
        imported = sum(len(f.read_text("utf-8").splitlines()) for f in log_dir.glob("day=*/*.jsonl"))
        agg = out.setdefault(fmt, {"records": 0, "imported": 0, "lost": 0})
        agg["records"] += records
        agg["imported"] += imported
        agg["lost"] += max(0, records - imported)
    for fmt, agg in out.items():
        print(f"      {fmt:<14} records {agg['records']}, imported {agg['imported']}, lost {agg['lost']}", flush=True)
    return {"real_exports": out, **import_throughput(tmp)}


def import_throughput(tmp: Path, n: int = 50_000) -> dict:
    """`flywheel import` of n capture records (3 results each): redaction, validation, day files."""
    import time as _time

    from flywheel.capture.importers import import_file

    src = tmp / "import-src.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"schema_version": 1, "type": "search", "request_id": f"i{i}",
                                "timestamp": "2026-10-06T10:00:00Z", "query": f"what does protein {i} do in cells",
                                "results": [{"chunk_id": f"c{k}", "text": f"passage {k} about cells", "score": 1 - k / 10,
                                             "rank": k + 1, "metadata": None} for k in range(3)]}) + "\n")
    t0 = _time.perf_counter()
    stats = import_file(src, tmp / "import-logs")
    rate = stats.imported / (_time.perf_counter() - t0)
    print(f"      import of {n:,} capture records: {rate:,.0f} records/s, lost {stats.lost}", flush=True)
    return {"import_records_per_s": round(rate)}


def _tricky_log_folder(log_dir: Path) -> None:
    import gzip

    rec = lambda rid, day="2026-10-06": json.dumps({  # noqa: E731
        "schema_version": 1, "type": "search", "request_id": rid, "timestamp": f"{day}T10:00:00Z", "query": "q",
        "results": [{"chunk_id": "c", "text": "t", "score": 1.0, "rank": 1}]}) + "\n"
    day = log_dir / "day=2026-10-06"
    (day / "nested").mkdir(parents=True)
    (day / "a.jsonl").write_text(rec("a"))
    (day / "b.json").write_text(rec("b"))
    (day / "c.ndjson").write_text(rec("c"))
    (day / "d.jsonl.1").write_text(rec("d"))
    (day / "e.jsonl.gz").write_bytes(gzip.compress(rec("e").encode()))
    (day / "f.jsonl").write_bytes(b"\xef\xbb\xbf" + rec("f").encode())
    (day / "nested" / "g.jsonl").write_text(rec("g"))
    (day / "notes.txt").write_text("x")
    (day / ".h.jsonl").write_text(rec("h"))
    (day / "gone.jsonl").symlink_to(log_dir.parent / "missing.jsonl")
    (log_dir.parent / "outside").mkdir(exist_ok=True)
    (log_dir.parent / "outside" / "o.jsonl").write_text(rec("o"))
    (day / "out.jsonl").symlink_to(log_dir.parent / "outside" / "o.jsonl")
    (log_dir / "day=2026-10-7").mkdir()
    (log_dir / "day=2026-10-7" / "u.jsonl").write_text(rec("u", "2026-10-07"))
    (log_dir / "stray.csv").write_text("x")


def unread_files(tmp: Path) -> dict:
    from flywheel.lib.logs.files import scan_week
    from flywheel.lib.logs.ingest import ingest_week

    log_dir = tmp / "tricky" / "logs"
    log_dir.mkdir(parents=True)
    _tricky_log_folder(log_dir)
    stats = ingest_week(log_dir, WEEK, WEEK + timedelta(days=7), tmp / "tricky.parquet", tmp / "tricky-q.parquet")
    scan = scan_week(log_dir, WEEK, WEEK + timedelta(days=7))
    read = {p.relative_to(log_dir).as_posix() for p in scan.week + scan.grace}
    reported = set(stats.files_not_read)
    every = {p.relative_to(log_dir).as_posix() for p in log_dir.rglob("*") if p.is_file() or p.is_symlink()}
    silent = {f for f in every if f not in read and not any(f == r or f.startswith(r + "/") for r in reported)}
    print(f"[6/6] tricky log folder: {len(every)} files, {len(read)} read ({stats.rows} rows), "
          f"{stats.files_not_read_count} reported unread {stats.files_not_read_by_reason}, "
          f"{len(silent)} ignored silently {sorted(silent)}", flush=True)
    return {"files_ignored_silently": len(silent), "files_reported_unread": stats.files_not_read_count,
            "tricky_rows_read": stats.rows}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="flywheel-capture-bench-") as d:
        tmp = Path(d)
        result = stress(tmp)
        result.update(ingest_benchmark(tmp))
        result.update(forked_children(tmp))
        result.update(type_battery(tmp))
        result.update(real_exports(tmp))
        result.update(unread_files(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
