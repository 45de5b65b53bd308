"""Dagster's default run launcher, plus a health check so run monitoring sees a dead run worker.

On one machine Dagster launches each run as a process of the code server
(``DefaultRunLauncher``). That launcher cannot tell the daemon whether a run's process still
lives, so a run whose worker was killed (OOM killer, kill -9, a crash of the box) stays
"STARTED" forever and holds its slot in the queue and in the ``training`` pool. This launcher
answers the daemon's run-monitoring question from the operating system: the run worker's pid
(recorded by Dagster in the run's RUN_START event) must still be a live Python process of
Dagster's (a pid reused by another program is not the worker). A dead one makes run monitoring mark the run failed, freeing the queue;
the completed steps' materializations stay in the event log. Only for runs launched on this host
(a tag records the host); elsewhere it answers "unknown" and changes nothing.

On Kubernetes use ``K8sRunLauncher`` instead (``deploy/``): it checks its Jobs itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from dagster import DagsterEventType, DefaultRunLauncher
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun

HOST_TAG = "flywheel/launch_host"


def _started_at(pid: int) -> float | None:
    """When the process started (epoch seconds), or None when it is gone (zombies count as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return None
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, IndexError, StopIteration, ValueError):
        return None


def _is_run_worker(pid: int) -> bool:
    """A live process that looks like a Dagster run worker (a Python process of Dagster's or of the
    code server's multiprocessing). Compared by command line, not by clock: wall-clock steps on a
    VM would make a start-time comparison call a live worker dead."""
    if _started_at(pid) is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"python" in cmdline and (b"multiprocessing" in cmdline or b"dagster" in cmdline)


class LocalProcessRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` whose run workers can be health-checked by run monitoring."""

    def launch_run(self, context: LaunchRunContext) -> None:
        self._instance.add_run_tags(context.dagster_run.run_id, {HOST_TAG: socket.gethostname()})
        super().launch_run(context)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def worker(self, run: DagsterRun) -> tuple[int, float] | None:
        """The run worker's pid and the time it reported the run started (its RUN_START event)."""
        records = self._instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_START, limit=1).records
        entry = records[0].event_log_entry if records else None
        if entry is None or entry.dagster_event is None or entry.dagster_event.pid is None:
            return None
        return entry.dagster_event.pid, entry.timestamp

    def worker_pid(self, run: DagsterRun) -> int | None:
        found = self.worker(run)
        return found[0] if found else None

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        if run.tags.get(HOST_TAG) != socket.gethostname():
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"run launched on {run.tags.get(HOST_TAG)!r}, not this host")
        found = self.worker(run)
        if found is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "the run worker has not started yet", transient=True)
        pid, _ = found
        if _is_run_worker(pid):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"the run worker (pid {pid}) is gone: killed or crashed", run_worker_id=str(pid)
        )
