"""Start, check and stop the whole service stack on one machine.

    PostgreSQL (two databases: flywheel_dagster, flywheel_mlflow)
    dagster code-server   the code location, loaded once; runs are launched from it
    dagster-daemon        dequeues runs (QueuedRunCoordinator), ticks the schedule, monitors runs
    dagster-webserver     the UI and GraphQL (one or more, same instance)
    mlflow server         tracking + registry on PostgreSQL, artifacts under <home>/mlflow/artifacts

Everything lives in ``<home>/services/`` (``state.json`` names the processes, ``logs/`` holds
their output). Each process runs in its own process group with default signal handlers and is
stopped by signalling its group (SIGTERM, then SIGKILL after a bounded wait); PostgreSQL is
stopped with ``pg_ctl stop -m fast``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flywheel.config import FlywheelConfig, ServicesSettings
from flywheel.services import procs
from flywheel.services.instance import PG_URL_ENV, write_instance_files
from flywheel.services.postgres import LocalPostgres, ensure_databases
from flywheel.services.submit import service_env_vars

DAGSTER_DB, MLFLOW_DB = "flywheel_dagster", "flywheel_mlflow"


def _bin(name: str) -> str:
    """A console script of this Python environment (the venv's, not whatever is on PATH)."""
    return str(Path(sys.executable).parent / name)


@dataclass
class ServiceStack:
    home: Path
    services: ServicesSettings
    artifact_root: Path  # the embedded mode's folder too: runs and the registry find their files there
    say: Callable[[str], None] = lambda msg: None
    # the settings environment the services run with (None: this process's); a restarted process
    # must get the same one, or it would run with other settings than its siblings
    base_env: dict[str, str] | None = None

    @classmethod
    def from_config(cls, config: FlywheelConfig, say: Callable[[str], None] = lambda msg: None) -> "ServiceStack":
        from flywheel.layout import Layout

        return cls(config.paths.home, config.services, Layout.of(config.paths).mlflow_artifacts, say)

    # -- places --------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.home / "services"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def postgres(self) -> LocalPostgres:
        s = self.services
        return LocalPostgres(self.root / "postgres", s.postgres_port, s.host, s.postgres_run_as)

    def webserver_url(self, index: int = 0) -> str:
        return f"http://{self.services.host}:{self.services.dagster_port + index}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.services.host}:{self.services.mlflow_port}"

    # -- environment ---------------------------------------------------------------------------
    def server_url(self) -> str:
        return self.services.postgres_url.rstrip("/") if self.services.postgres_url else self.postgres.server_url()

    def sqlalchemy_url(self, database: str) -> str:
        """SQLAlchemy 2.1 maps ``postgresql://`` to psycopg 3; Dagster and MLflow get psycopg2, named."""
        url = self.server_url()
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg2://" + url[len("postgresql://"):]
        return f"{url}/{database}"

    def env(self) -> dict[str, str]:
        """The environment of every Dagster process (and of clients that open the instance)."""
        env = dict(os.environ if self.base_env is None else self.base_env)
        env.update({
            "DAGSTER_HOME": str(self.dagster_home),
            PG_URL_ENV: self.sqlalchemy_url(DAGSTER_DB),
            "FLYWHEEL_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        })
        env.setdefault("FLYWHEEL_MLFLOW_URI", self.mlflow_url)
        return env

    # -- up ------------------------------------------------------------------------------------
    def up(self, webservers: int = 1) -> dict:
        running, _ = procs.read_state(self.state_file)
        if any(p.alive() for p in running.values()):
            raise RuntimeError(f"services already running (see {self.state_file}); `flywheel services down` first")
        self._check_ports(webservers)
        if not self.services.postgres_url:
            self.say(f"PostgreSQL on {self.services.host}:{self.services.postgres_port} (data in {self.postgres.root})")
            self.postgres.start()
        ensure_databases(self.server_url(), [DAGSTER_DB, MLFLOW_DB])
        write_instance_files(self.dagster_home, self.services)
        self._migrate()
        started: dict[str, procs.Proc] = {}
        try:
            for name in ["code-server", "mlflow", "daemon", *self.webserver_names(webservers)]:
                started[name] = self.start(name)
                procs.write_state(self.state_file, started, {"webservers": webservers, "settings": service_env_vars(self.env())})
                if name == "code-server":
                    self._wait_code_server(started[name])
            for name, proc in started.items():
                if proc.url:
                    self._wait_http(proc, "/health" if name == "mlflow" else "/server_info")
            self._wait_daemon(started["webserver"])
        except Exception:
            self.say("start failed: stopping what was started")
            self.down()
            raise
        return self.status()

    def ports(self, webservers: int = 1) -> dict[str, tuple[int, str]]:
        """Each service's port and the setting that chooses it (webserver N listens on the Dagster port + N - 1)."""
        s, env = self.services, ServicesSettings.env_name
        out = {} if s.postgres_url else {"postgres": (s.postgres_port, env("postgres_port"))}
        out |= {"code-server": (s.code_server_port, env("code_server_port")), "mlflow": (s.mlflow_port, env("mlflow_port"))}
        for i, name in enumerate(self.webserver_names(webservers)):
            out[name] = (s.dagster_port + i, env("dagster_port") + (f" + {i}" if i else ""))
        return out

    def _check_ports(self, webservers: int) -> None:
        """Before anything starts: every port distinct and free on the host, or an error naming the setting."""
        ports = self.ports(webservers)
        seen: dict[int, str] = {}
        problems = []
        for name, (port, setting) in ports.items():
            if port in seen:
                problems.append(f"{name} and {seen[port]} would both listen on port {port} ({setting})")
                continue
            seen[port] = name
            if name == "postgres" and self.postgres.running():
                continue  # ours, left running: `up` uses it
            if not procs.port_free(self.services.host, port):
                problems.append(f"{name}: port {port} on {self.services.host} is already in use by another process ({setting})")
        if problems:
            raise RuntimeError("cannot start the services: " + "; ".join(problems) + ". Free the port or choose another.")

    @staticmethod
    def webserver_names(n: int) -> list[str]:
        return ["webserver", *[f"webserver-{i + 1}" for i in range(1, n)]]

    def command(self, name: str) -> tuple[list[str], dict[str, str], str]:
        s, env = self.services, self.env()
        ws = str(self.dagster_home / "workspace.yaml")
        if name == "code-server":
            return ([sys.executable, "-m", "dagster", "code-server", "start", "-h", s.host, "-p", str(s.code_server_port),
                     "-m", "flywheel.definitions", "--location-name", "flywheel", "--use-python-environment-entry-point"], env, "")
        if name == "daemon":
            return [_bin("dagster-daemon"), "run", "-w", ws], env, ""
        if name.startswith("webserver"):
            index = 0 if name == "webserver" else int(name.rsplit("-", 1)[1]) - 1
            port = s.dagster_port + index
            return [_bin("dagster-webserver"), "-h", s.host, "-p", str(port), "-w", ws], env, self.webserver_url(index)
        if name == "mlflow":
            self.artifact_root.mkdir(parents=True, exist_ok=True)
            env = {**env, "MLFLOW_BACKEND_STORE_URI": self.sqlalchemy_url(MLFLOW_DB),
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            return ([sys.executable, "-m", "mlflow", "server", "--host", s.host, "--port", str(s.mlflow_port),
                     "--workers", "1", "--default-artifact-root", self.artifact_root.as_uri(), "--no-serve-artifacts"],
                    env, self.mlflow_url)
        raise KeyError(f"unknown service {name!r}")

    def start(self, name: str) -> procs.Proc:
        cmd, env, url = self.command(name)
        self.say(f"starting {name}" + (f" on {url}" if url else ""))
        return procs.spawn(name, cmd, env=env, log_path=self.root / "logs" / f"{name}.log", url=url)

    def restart(self, name: str) -> procs.Proc:
        """Start one service again (after a crash); it joins the state file."""
        running, extra = procs.read_state(self.state_file)
        if name in running and running[name].alive():
            procs.stop_group(running[name].pid)
        running[name] = proc = self.start(name)
        procs.write_state(self.state_file, running, extra)
        if name == "code-server":
            self._wait_code_server(proc)
        if proc.url:
            self._wait_http(proc, "/health" if name == "mlflow" else "/server_info")
        return proc

    def _migrate(self) -> None:
        """Create or upgrade Dagster's tables once, before several processes open the instance."""
        import subprocess

        done = subprocess.run([sys.executable, "-m", "dagster", "instance", "migrate"], env=self.env(),
                              capture_output=True, text=True, timeout=self.services.start_timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"`dagster instance migrate` failed: {(done.stderr or done.stdout)[-3000:]}")

    # -- waiting -------------------------------------------------------------------------------
    def _deadline_loop(self, proc: procs.Proc, what: str, probe: Callable[[], str | None]) -> None:
        deadline = time.monotonic() + self.services.start_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while starting; its log ({proc.log}) ends:\n{_tail(proc.log)}")
            last = probe() or ""
            if last == "ok":
                return
            time.sleep(0.5)
        raise TimeoutError(f"{proc.name}: {what} not ready after {self.services.start_timeout_s:.0f}s ({last}); log: {proc.log}")

    def _wait_http(self, proc: procs.Proc, path: str) -> None:
        def probe() -> str:
            try:
                with urllib.request.urlopen(proc.url + path, timeout=5) as resp:
                    return "ok" if resp.status == 200 else f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                return repr(exc)
        self._deadline_loop(proc, proc.url + path, probe)

    def _wait_code_server(self, proc: procs.Proc) -> None:
        from dagster._grpc.client import DagsterGrpcClient

        client = DagsterGrpcClient(port=self.services.code_server_port, host=self.services.host)

        def probe() -> str:
            try:  # a closed port first: the gRPC client logs every refused connection
                socket.create_connection((self.services.host, self.services.code_server_port), timeout=2).close()
            except OSError as exc:
                return repr(exc)
            try:
                return "ok" if client.health_check_query() == "SERVING" else "not serving"
            except Exception as exc:  # grpc raises its own error types while the port is closed
                return type(exc).__name__
        self._deadline_loop(proc, "gRPC health check", probe)

    def _wait_daemon(self, webserver: procs.Proc) -> None:
        from flywheel.services.submit import graphql

        query = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }"

        def probe() -> str:
            statuses = graphql(webserver.url, query)["instance"]["daemonHealth"]["allDaemonStatuses"]
            wanted = {d["daemonType"]: d["healthy"] for d in statuses}
            return "ok" if wanted.get("QUEUED_RUN_COORDINATOR") and wanted.get("SCHEDULER") else json.dumps(wanted)
        running, _ = procs.read_state(self.state_file)
        self._deadline_loop(running["daemon"], "daemon heartbeat", probe)

    # -- status and down -----------------------------------------------------------------------
    def status(self) -> dict:
        running, extra = procs.read_state(self.state_file)
        out = {name: {"pid": p.pid, "alive": p.alive(), "url": p.url, "log": p.log} for name, p in running.items()}
        if not self.services.postgres_url:
            pg = self.postgres
            up = pg.initialized() and pg.running()
            out["postgres"] = {"pid": pg.pid() if up else None, "alive": up,
                               "url": f"postgresql://{self.services.host}:{self.services.postgres_port}", "log": str(pg.log_file)}
        return out

    def down(self) -> dict[str, str]:
        """Stop every service (webservers first, PostgreSQL last); says how each one went."""
        running, extra = procs.read_state(self.state_file)
        result = {}
        order = {"daemon": 1, "mlflow": 2, "code-server": 3}
        for name in sorted(running, key=lambda n: 0 if n.startswith("webserver") else order.get(n, 4)):
            result[name] = procs.stop_group(running[name].pid)
            self.say(f"{name}: {result[name]}")
        if not self.services.postgres_url and self.postgres.initialized():
            result["postgres"] = self.postgres.stop()
            self.say(f"postgres: {result['postgres']}")
        if self.state_file.exists():
            self.state_file.unlink()
        return result

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal one service's process group (tests and benchmarks simulate crashes with this)."""
        running, _ = procs.read_state(self.state_file)
        procs.signal_group(running[name].pid, sig)
        return running[name].pid


def _tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""
