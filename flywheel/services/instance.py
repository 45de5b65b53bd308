"""The service-mode Dagster instance: PostgreSQL storage, the run queue, pools, run monitoring.

Written to ``<home>/services/dagster/dagster.yaml`` (Dagster reads it from ``$DAGSTER_HOME``
only). The database URL is not in the file: it comes from ``DAGSTER_PG_URL`` in the processes'
environment, so the password never lands on disk outside the PostgreSQL folder. Runs go through
the ``QueuedRunCoordinator`` (the daemon dequeues at most ``max_concurrent_runs``), steps in the
pool ``training`` hold one of ``training_pool_limit`` slots, and run monitoring marks a run
failed when its worker process is gone (see ``flywheel.services.launcher``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from flywheel.config import ServicesSettings

PG_URL_ENV = "DAGSTER_PG_URL"
LOCATION = "flywheel"


def instance_config(services: ServicesSettings) -> dict:
    return {
        "storage": {"postgres": {"postgres_url": {"env": PG_URL_ENV}}},
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            # Dagster's default looks at the queue every 5 s; a queued run should not wait that long
            "config": {"dequeue_interval_seconds": 1},
        },
        "run_launcher": {"module": "flywheel.services.launcher", "class": "LocalProcessRunLauncher"},
        "concurrency": {
            "runs": {"max_concurrent_runs": services.max_concurrent_runs},
            "pools": {"default_limit": services.training_pool_limit},
        },
        "run_monitoring": {
            "enabled": True,
            "poll_interval_seconds": 5,
            "start_timeout_seconds": int(services.start_timeout_s),
            "max_resume_run_attempts": 0,
        },
        "telemetry": {"enabled": False},
    }


def workspace_config(services: ServicesSettings) -> dict:
    """The webservers and the daemon load the code location from one shared code server."""
    return {"load_from": [{"grpc_server": {
        "host": services.host, "port": services.code_server_port, "location_name": LOCATION,
    }}]}


def write_instance_files(dagster_home: Path, services: ServicesSettings) -> tuple[Path, Path]:
    dagster_home.mkdir(parents=True, exist_ok=True)
    header = "# Written by `flywheel services up` from the FLYWHEEL_SERVICES_* settings; edits are overwritten.\n"
    inst = dagster_home / "dagster.yaml"
    inst.write_text(header + yaml.safe_dump(instance_config(services), sort_keys=False))
    ws = dagster_home / "workspace.yaml"
    ws.write_text(header + yaml.safe_dump(workspace_config(services), sort_keys=False))
    return inst, ws
