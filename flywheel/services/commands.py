"""The `flywheel services up|down|status` command and the `--submit` way of running a week."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Callable

from flywheel.services import procs
from flywheel.services.stack import ServiceStack
from flywheel.services.submit import (
    read_run, service_env_vars, settings_mismatch, submit_partition, wait_for_run,
)

# Set by `services up` itself for its processes: not a difference worth refusing a run for.
_SET_BY_SERVICES = ("FLYWHEEL_HOME", "FLYWHEEL_MLFLOW_URI")


def stack_from_env(say: Callable[[str], None]) -> ServiceStack:
    from flywheel.config import load_config

    return ServiceStack.from_config(load_config(), say=say)


def cmd_services(args, say: Callable[[str], None]) -> int:
    stack = stack_from_env(say)
    if args.action == "status":
        status = stack.status()
        for name, row in status.items():
            say(f"{name:12s} {'up  ' if row['alive'] else 'DOWN'} pid={row['pid']} {row['url']}")
        print(json.dumps(status))
        return 0 if status and all(r["alive"] for r in status.values()) else 1
    if args.action == "down":
        result = stack.down()
        return 0 if all(v in ("stopped", "not running") for v in result.values()) else 1
    status = stack.up(webservers=args.webservers)
    say(f"Dagster UI {stack.webserver_url()}  |  MLflow {stack.mlflow_url}  |  DAGSTER_HOME={stack.dagster_home}")
    say("submit runs with `flywheel run --submit --week W`; stop with `flywheel services down`")
    if not args.foreground:
        return 0 if all(r["alive"] for r in status.values()) else 1
    return _supervise(stack, say)


def _supervise(stack: ServiceStack, say: Callable[[str], None]) -> int:
    """Stay in the foreground; SIGTERM or SIGINT (Ctrl-C) stops every service, then exits."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    say("running in the foreground: SIGTERM or Ctrl-C stops everything")
    while not stop.wait(2.0):
        pass
    say(f"got {signal.Signals(received[0]).name}: stopping the services")
    result = stack.down()
    return 0 if all(v in ("stopped", "not running") for v in result.values()) else 1


def override_mismatch(recorded: dict[str, str], overrides: dict[str, dict] | None) -> list[str]:
    """A command's own setting overrides (backfill's light settings) the services do not run with."""
    from flywheel.config import SECTIONS

    out = []
    for section, fields in (overrides or {}).items():
        for name, value in fields.items():
            env = SECTIONS[section].env_name(name)
            if recorded.get(env) != str(value):
                out.append(f"{env}: services {recorded.get(env, '(unset)')!r}, this command {str(value)!r}")
    return out


def submitting_run_week(say: Callable[[str], None], print_events: Callable, *, overrides: dict[str, dict] | None = None,
                        timeout_s: float = 6 * 3600):
    """A ``run_week(week, job)`` that queues the run on the service instance and waits for it.

    Runs execute with the services' settings: the command refuses when its environment's settings
    or its own ``overrides`` differ from those the services were started with.
    """
    stack = stack_from_env(say)
    running, extra = procs.read_state(stack.state_file)
    if not running.get("webserver") or not running["webserver"].alive():
        raise SystemExit(f"no flywheel services running for FLYWHEEL_HOME={stack.home}: start them with `flywheel services up`")
    recorded = extra.get("settings", {})
    diff = settings_mismatch(recorded, service_env_vars(), ignore=_SET_BY_SERVICES) + override_mismatch(recorded, overrides)
    if diff:
        raise SystemExit("the services run with other settings than this command (runs use the services' settings); "
                         "restart them with these settings or unset them here:\n  " + "\n  ".join(diff))
    url = running["webserver"].url
    for key, value in stack.env().items():  # read the run's events from the same instance
        if key.startswith("DAGSTER_"):
            os.environ[key] = value

    def run_week(week: str, job_name: str = "flywheel_weekly", *, resources: dict | None = None):
        import dagster as dg

        if resources:
            raise ValueError("--submit runs use the code server's resources; resources cannot be passed")
        started = time.monotonic()
        run_id = submit_partition(url, job_name, week, executor=stack.services.executor)
        say(f"queued {job_name} for {week}: run {run_id} ({url}/runs/{run_id})")
        status = wait_for_run(url, run_id, timeout_s=timeout_s, say=say)
        with dg.DagsterInstance.get() as instance:
            result = read_run(instance, run_id, status)
        print_events(result)
        for event in result.all_events:
            if event.event_type_value in ("STEP_FAILURE", "PIPELINE_FAILURE"):
                error = getattr(event.event_specific_data, "error", None)
                say(f"  FAILED {event.step_key or 'run'}: {(error.message if error else event.message or '').strip()}")
        say(f"{job_name} for {week}: {'succeeded' if result.success else status} in {time.monotonic() - started:.0f}s")
        return result

    return run_week
