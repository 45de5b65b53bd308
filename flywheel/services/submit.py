"""Submit runs to the service instance's run queue and follow them, as the UI does.

``flywheel run|backfill|demo --submit`` talk to the Dagster webserver's GraphQL API (the
official ``DagsterGraphQLClient``): the run is created QUEUED, the daemon's
``QueuedRunCoordinator`` starts it when ``max_concurrent_runs`` and the pools allow, and the run
worker executes in the code server's environment (its ``FLYWHEEL_*`` settings, not the
caller's: :func:`settings_mismatch` says when they differ). The run's events are read back from
the instance (PostgreSQL) so the caller can print them like an in-process run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

from flywheel.services.instance import LOCATION

REPOSITORY = "__repository__"  # the name Dagster gives the repository of a Definitions object
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def graphql(base_url: str, query: str, variables: dict | None = None, *, timeout_s: float = 30.0) -> dict:
    """POST one query to the webserver's /graphql; raises on transport or GraphQL errors."""
    req = urllib.request.Request(
        base_url + "/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        payload = json.loads(resp.read())
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors from {base_url}: {payload['errors']}")
    return payload["data"]


def client(base_url: str):
    from dagster_graphql import DagsterGraphQLClient

    url = urlparse(base_url)
    return DagsterGraphQLClient(url.hostname, port_number=url.port, timeout=60)


@contextlib.contextmanager
def _quiet():
    """dagster_graphql calls gql with arguments gql deprecates: a warning per call, not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="gql")
        yield


def execution_config(executor: str | None) -> dict | None:
    """Run config picking the job's executor for one run: ``in_process`` (every step in the run's
    process) or ``multiprocess`` (a process per step); None keeps the job's default (the code server's
    ``FLYWHEEL_SERVICES_EXECUTOR``, ``flywheel.defs.schedules.run_executor``)."""
    return {"execution": {"config": {executor: {}}}} if executor else None


def submit_partition(base_url: str, job: str, partition: str, *, tags: dict | None = None,
                     executor: str | None = None, assets: list[str] | None = None) -> str:
    """Queue one run of ``job`` for ``partition``; returns its run id.

    ``executor`` (``in_process`` or ``multiprocess``) picks the job's executor for this run; None
    keeps the job's default (the code server's ``FLYWHEEL_SERVICES_EXECUTOR``). ``assets`` narrows the
    run to some of the job's assets.
    """
    run_config = execution_config(executor)
    with _quiet():
        return client(base_url).submit_job_execution(
            job, repository_location_name=LOCATION, repository_name=REPOSITORY, run_config=run_config,
            asset_selection=assets,
            tags={"dagster/partition": partition, **(tags or {})},
        )


def reload_location(base_url: str) -> str:
    """Make a webserver reconnect to the code server (after the code server restarted)."""
    query = """mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) {
        __typename ... on WorkspaceLocationEntry { locationOrLoadError { __typename } } } }"""
    data = graphql(base_url, query, {"name": LOCATION})["reloadRepositoryLocation"]
    loaded = (data.get("locationOrLoadError") or {}).get("__typename")
    if loaded != "RepositoryLocation":
        raise RuntimeError(f"{base_url}: reloading the code location gave {data}")
    return loaded


def run_status(base_url: str, run_id: str) -> str:
    with _quiet():
        return client(base_url).get_run_status(run_id).value


def wait_for_run(base_url: str, run_id: str, *, timeout_s: float, poll_s: float = 0.5,
                 say: Callable[[str], None] = lambda m: None) -> str:
    """Poll until the run ends (SUCCESS, FAILURE, CANCELED); says each status change."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        status = run_status(base_url, run_id)
        if status != last:
            say(f"  run {run_id[:8]}: {status}")
            last = status
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


@dataclass
class SubmittedRun:
    """What an in-process result offers the commands: success and the run's Dagster events."""

    run_id: str
    status: str
    all_events: list = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == "SUCCESS"


def read_run(instance, run_id: str, status: str) -> SubmittedRun:
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]
    return SubmittedRun(run_id, status, events)


def service_env_vars(env: dict[str, str] | None = None) -> dict[str, str]:
    """The FLYWHEEL_* settings of an environment (secrets left out): recorded by `services up`."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k.startswith("FLYWHEEL_") and not k.endswith("_API_KEY")}


def settings_mismatch(recorded: dict[str, str], current: dict[str, str], ignore: tuple[str, ...] = ()) -> list[str]:
    """Settings that differ between the services' environment and the caller's, one line each."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key in ignore or recorded.get(key) == current.get(key):
            continue
        out.append(f"{key}: services {recorded.get(key, '(unset)')!r}, here {current.get(key, '(unset)')!r}")
    return out
