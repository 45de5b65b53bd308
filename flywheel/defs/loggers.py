"""The console logger of every flywheel run: the stages' own lines, in the CLI's format.

Dagster's default console logger prefixes each line with a timestamp, the logger name, the level,
the job, the run id and the step ("2026-11-30 05:11:47 +0000 - dagster - INFO - flywheel_weekly -
22fd4bb7-... - trained_reranker - reranker: 30/125 steps"). People read these lines while a week
runs, so they get the CLI's own form instead: ``[flywheel 05:11:47] trained_reranker: reranker:
30/125 steps``, with the level named only for warnings and errors; a failed step's error follows
its line in full, as Dagster's own logger shows it. The run's full event log (run id, job,
structured events) is unchanged in Dagster's storage and UI.

Dagster uses this logger when a run's config selects it (``{"loggers": {"console": {...}}}``, as
the CLI and the benchmarks do); runs launched without that section keep Dagster's default one.
"""

from __future__ import annotations

import logging
import sys
import time

import dagster as dg


class StageLines(logging.Handler):
    """Writes a Dagster log record as ``[flywheel HH:MM:SS] <step>: <message>`` to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        meta = record.__dict__.get("dagster_meta") or {}
        step = meta.get("step_key")
        message = meta.get("orig_message") or record.getMessage()
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        error = getattr(getattr(meta.get("dagster_event"), "event_specific_data", None), "error", None)
        detail = f"\n{error.to_string()}" if error is not None else ""
        try:
            print(f"[flywheel {stamp}] {step + ': ' if step else ''}{level}{message}{detail}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - a closed stream must not fail the run
            self.handleError(record)


@dg.logger(
    config_schema={"log_level": dg.Field(str, is_required=False, default_value="INFO")},
    description="The stages' own lines, as [flywheel HH:MM:SS] step: message (Dagster's event log is unchanged)",
)
def console(init_context) -> logging.Logger:
    logger = logging.Logger("flywheel", level=init_context.logger_config["log_level"].upper())
    logger.addHandler(StageLines())
    return logger


LOGGERS = {"console": console}
