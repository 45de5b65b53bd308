"""raw_logs: the week's capture files, validated and deduplicated, with blocking checks and a sensor.

The logic lives in ``flywheel.lib.logs.ingest``; this module only wires it into Dagster. The checks block
downstream stages (labels cost money) when the week is empty, its schema is off, or too much of it
was quarantined, or when files of the log folder were left unread (each is listed with why). The
sensor re-runs a week that is already materialized when its files changed (late files from a slow
host, an import): the ingest records a fingerprint of the files it read (names and sizes), and the
sensor compares it with the files on disk. The ``log_imports`` sensor starts ``import_logs`` when
trace or log files are dropped in ``<home>/imports/`` (the Dagster way of ``flywheel import``; see
``flywheel.capture.importers``); the job imports them into the log folder, after which the first
sensor re-runs the weeks they changed.
"""


import hashlib
import json
import warnings
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from flywheel.defs.partitions import week_bounds, weekly_partitions
from flywheel.capture.importers import IMPORTS_DIR, import_folder, pending_imports, totals
from flywheel.defs.resources import PathsResource, TiersResource
from flywheel.lib.logs.files import parse_day_folder
from flywheel.lib.logs.ingest import (
    GRACE_DAYS,
    RAW_LOGS_SCHEMA,
    ingest_week,
    load_quarantine,
    load_raw_logs,
    log_fingerprint,
)
from flywheel.layout import QUARANTINE, RAW_LOGS


def _md_table(header: tuple[str, str], rows: dict) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in rows.items()] or ["| (none) | 0 |"]
    return "\n".join(lines)


def _sample_md(path: Path, n: int = 5) -> str:
    try:
        df = pq.ParquetFile(path).read_row_group(0).slice(0, n).to_pandas() if pq.ParquetFile(
            path).num_row_groups else load_raw_logs(path)
    except Exception as exc:  # the sample is informative only; the checks judge the file
        return f"(sample unavailable: {exc})"
    if df.empty:
        return "(no rows)"
    if not {"request_id", "day", "query", "results", "clicks", "thumbs"} <= set(df.columns):
        return f"(unexpected columns: {list(df.columns)})"
    rows = ["| request_id | day | query | results | clicks | thumbs |", "|---|---|---|---|---|---|"]
    for r in df.itertuples():
        q = str(r.query).replace("|", "\\|").replace("\n", " ")[:80]
        rows.append(f"| {r.request_id} | {r.day} | {q} | {len(r.results)} | {len(r.clicks)} | {r.thumbs or ''} |")
    return "\n".join(rows)


@dg.asset(
    partitions_def=weekly_partitions,
    group_name="logs",
    description="One row per valid, deduplicated search request of the week, with its feedback joined; "
                "invalid lines go to raw_logs_quarantine with file, line and reason.",
    kinds={"parquet"},
)
def raw_logs(context: dg.AssetExecutionContext, paths: PathsResource) -> dg.MaterializeResult:
    week = context.partition_key
    start, end = week_bounds(week)
    out = paths.layout().asset(RAW_LOGS, week)
    quarantine = paths.layout().asset(QUARANTINE, week)
    stats = ingest_week(paths.settings().log_dir, start, end, out, quarantine)
    context.log.info(
        f"week {week}: read {stats.read:,} records from {stats.files} files, {stats.rows:,} requests, "
        f"{stats.duplicates:,} duplicates, {stats.quarantined_total:,} quarantined"
        + (" (" + ", ".join(f"{reason}: {n:,}" for reason, n in sorted(stats.quarantined.items())) + ")"
           if stats.quarantined else "")
    )
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)),
        "quarantine_path": dg.MetadataValue.path(str(quarantine)),
        "dagster/row_count": stats.rows,
        "read": stats.read,
        "valid": stats.valid,
        "searches": stats.searches,
        "feedback": stats.feedback,
        "duplicates": stats.duplicates,
        "quarantined": stats.quarantined_total,
        "quarantine_rate": float(stats.quarantine_rate),
        "quarantined_by_reason": dg.MetadataValue.md(_md_table(("reason", "records"), stats.quarantined)),
        "queries_per_day": dg.MetadataValue.md(_md_table(("day", "queries"), stats.per_day)),
        "feedback_joined": stats.feedback_joined,
        "feedback_orphaned": stats.feedback_orphaned,
        "feedback_from_grace": stats.feedback_from_grace,
        "files": stats.files,
        "bytes": stats.bytes,
        "log_fingerprint": stats.fingerprint,
        "files_not_read": stats.files_not_read_count,
        "files_not_read_by_reason": dg.MetadataValue.md(_md_table(("reason", "files"), stats.files_not_read_by_reason)),
        "dead_letter_files": stats.dead_letter_files,
        "stats": dg.MetadataValue.json(stats.to_metadata()),
        "sample": dg.MetadataValue.md(_sample_md(out)),
    })


def _latest_metadata(instance: dg.DagsterInstance, week: str) -> dict | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=raw_logs.key, asset_partitions=[week]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@dg.asset_check(asset=raw_logs, blocking=True, partitions_def=weekly_partitions,
                description="raw_logs has exactly the agreed schema and no nulls where none are allowed.")
def raw_logs_schema_valid(context: dg.AssetCheckExecutionContext, paths: PathsResource) -> dg.AssetCheckResult:
    week = context.partition_key
    path = paths.layout().asset(RAW_LOGS, week)
    if not path.exists():
        return dg.AssetCheckResult(passed=False, metadata={"error": f"{path} is missing"})
    schema = pq.read_schema(path).remove_metadata()
    problems = []
    if not schema.equals(RAW_LOGS_SCHEMA):
        problems.append(f"schema differs: {schema} != {RAW_LOGS_SCHEMA}")
    else:
        start, end = week_bounds(week)
        table = pq.read_table(path, columns=["request_id", "timestamp", "query", "results", "day"])
        for col in ("request_id", "timestamp", "query", "results", "day"):
            if table[col].null_count:
                problems.append(f"{col}: {table[col].null_count} nulls")
        if table.num_rows and len(set(table["request_id"].to_pylist())) != table.num_rows:
            problems.append("request_id is not unique")
        days = set(table["day"].to_pylist())
        allowed = {(start + timedelta(days=i)).isoformat() for i in range((end - start).days)}
        if days - allowed:
            problems.append(f"days outside the week: {sorted(days - allowed)}")
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": "; ".join(problems) or "none"})


@dg.asset_check(asset=raw_logs, blocking=True, partitions_def=weekly_partitions,
                description="The share of quarantined records is under tiers.max_quarantine_rate.")
def raw_logs_quarantine_rate(context: dg.AssetCheckExecutionContext, paths: PathsResource,
                             tiers: TiersResource) -> dg.AssetCheckResult:
    max_rate = tiers.settings().max_quarantine_rate
    week = context.partition_key
    meta = _latest_metadata(context.instance, week)
    if meta is None:
        return dg.AssetCheckResult(passed=False, metadata={"error": "no materialization metadata"})
    rate = float(meta.get("quarantine_rate", 1.0))
    top = []
    qpath = paths.layout().asset(QUARANTINE, week)
    if qpath.exists():
        q = load_quarantine(qpath)
        q = q[q["reason"] != "duplicate_request_id"]
        top = q.head(5)[["file", "line", "reason", "field"]].to_dict("records")
    return dg.AssetCheckResult(
        passed=rate <= max_rate,
        metadata={"quarantine_rate": rate, "max_quarantine_rate": max_rate,
                  "quarantined": int(meta.get("quarantined", 0)), "read": int(meta.get("read", 0)),
                  "first_quarantined": dg.MetadataValue.json(top)},
    )


@dg.asset_check(asset=raw_logs, blocking=True, partitions_def=weekly_partitions,
                description="The week has at least one valid search request.")
def raw_logs_not_empty(context: dg.AssetCheckExecutionContext, paths: PathsResource) -> dg.AssetCheckResult:
    path = paths.layout().asset(RAW_LOGS, context.partition_key)
    rows = pq.ParquetFile(path).metadata.num_rows if path.exists() else 0
    return dg.AssetCheckResult(passed=rows > 0, metadata={"rows": rows})


@dg.asset_check(asset=raw_logs, blocking=True, partitions_def=weekly_partitions,
                description="At most tiers.max_unread_log_files files of the log folder were left unread.")
def raw_logs_files_read(context: dg.AssetCheckExecutionContext, tiers: TiersResource) -> dg.AssetCheckResult:
    limit = tiers.settings().max_unread_log_files
    meta = _latest_metadata(context.instance, context.partition_key)
    if meta is None:
        return dg.AssetCheckResult(passed=False, metadata={"error": "no materialization metadata"})
    stats = meta.get("stats") or {}
    unread = int(meta.get("files_not_read", stats.get("files_not_read_count", 0)))
    first = dict(list((stats.get("files_not_read") or {}).items())[:20])
    return dg.AssetCheckResult(passed=unread <= limit, metadata={
        "files_not_read": unread, "max_unread_log_files": limit, "first_files_not_read": dg.MetadataValue.json(first)})


def _weeks_with_logs(log_dir: Path) -> set[str]:
    """Week keys whose files (grace day included) exist under log_dir."""
    weeks = set()
    if not log_dir.is_dir():
        return weeks
    for d in log_dir.iterdir():
        day = parse_day_folder(d.name)
        if day is None:
            continue
        monday = day - timedelta(days=day.weekday())
        weeks.add(monday.isoformat())
        if (day - monday).days < GRACE_DAYS:
            weeks.add((monday - timedelta(days=7)).isoformat())
    return weeks


@dg.sensor(
    name="raw_logs_new_files",
    asset_selection=[raw_logs],
    minimum_interval_seconds=300,
    description="Re-runs raw_logs for a materialized week whose log files changed since.",
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def raw_logs_new_files(context: dg.SensorEvaluationContext, paths: PathsResource):
    log_dir = paths.settings().log_dir
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    keys = set(weekly_partitions.get_partition_keys(dynamic_partitions_store=context.instance))
    requests = []
    for week in sorted(_weeks_with_logs(log_dir) & keys):
        start, end = week_bounds(week)
        fp = log_fingerprint(log_dir, start, end)
        if seen.get(week) == fp:
            continue  # nothing changed since the last tick
        meta = _latest_metadata(context.instance, week)
        if meta is not None and meta.get("log_fingerprint") != fp:
            requests.append(dg.RunRequest(run_key=f"raw_logs:{week}:{fp}", partition_key=week,
                                          asset_selection=[raw_logs.key]))
        seen[week] = fp
    if requests:
        context.log.info(f"new log files for {[r.partition_key for r in requests]}")
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen, sort_keys=True))


# Dagster itself passes the beta `owners` argument when it binds resources to a job-targeted
# sensor; nothing here uses owners, so that one internal warning is kept off the output.
warnings.filterwarnings("ignore", category=dg.BetaWarning, message="Parameter `owners` of initializer `SensorDefinition")


@dg.op(description="Imports the files waiting in <home>/imports/ into the log folder; each moves to "
                   "imports/done/ (or failed/) with its summary.")
def import_dropped_files(context: dg.OpExecutionContext, paths: PathsResource) -> dict:
    p = paths.settings()
    results = import_folder(Path(p.home) / IMPORTS_DIR, p.log_dir)
    report = totals(results, say=context.log.info)
    context.add_output_metadata({**{k: v for k, v in report.items()},
                                 "summaries": dg.MetadataValue.json([r.summary() for r in results])})
    return report


@dg.job(description="Import trace/log files dropped in <home>/imports/ (see `flywheel import`).")
def import_logs():
    import_dropped_files()


@dg.sensor(
    name="log_imports",
    job=import_logs,
    minimum_interval_seconds=60,
    description="Starts import_logs when files wait in <home>/imports/.",
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def log_imports(context: dg.SensorEvaluationContext, paths: PathsResource):
    folder = Path(paths.settings().home) / IMPORTS_DIR
    waiting = pending_imports(folder)
    if not waiting:
        return dg.SkipReason(f"no files waiting in {folder}")
    key = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in waiting)
    return dg.RunRequest(run_key=f"import:{hashlib.sha256(key.encode()).hexdigest()[:16]}")


defs = dg.Definitions(
    assets=[raw_logs],
    asset_checks=[raw_logs_schema_valid, raw_logs_quarantine_rate, raw_logs_not_empty, raw_logs_files_read],
    sensors=[raw_logs_new_files, log_imports],
    jobs=[import_logs],
)
