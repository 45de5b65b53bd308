"""A local PostgreSQL server in a folder of its own, from the distribution's package.

Dagster's run, event and schedule storage and MLflow's tracking store live in two databases of
one server started with the package's own tools (``initdb``, ``pg_ctl``) in
``<home>/services/postgres``: no system service, no sudo. PostgreSQL refuses to run as root, so
when flywheel itself runs as root (CI, containers) the server runs as an unprivileged user
(``FLYWHEEL_SERVICES_POSTGRES_RUN_AS``, default ``postgres``) that owns that folder. It listens on
127.0.0.1 only and asks for a password (SCRAM), generated once and kept in a 0600 file beside
the data; clients get it through environment variables, never on a command line.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "flywheel"
INSTALL_HINT = "install Debian's package: apt-get install -y postgresql (it provides initdb and pg_ctl)"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine, or no user that may run them."""


def find_bindir() -> Path:
    """The folder with initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    raise PostgresUnavailable(f"no PostgreSQL server (initdb, pg_ctl) on PATH or in /usr/lib/postgresql: {INSTALL_HINT}")


@dataclass
class LocalPostgres:
    """One server: data in ``root/data``, log in ``root/postgres.log``, socket in ``root/run``."""

    root: Path
    port: int
    host: str = "127.0.0.1"
    run_as: str = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    # -- who runs it ---------------------------------------------------------------------------
    def _user(self) -> pwd.struct_passwd | None:
        """The account the server runs as: None (ourselves) unless we are root."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            raise PostgresUnavailable(
                f"PostgreSQL refuses to run as root and there is no user {self.run_as!r} to run it as "
                f"(set FLYWHEEL_SERVICES_POSTGRES_RUN_AS to an existing unprivileged user)"
            ) from None

    def _run(self, args: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        user = self._user()
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": user.pw_dir if user else os.environ.get("HOME", "/")}
        proc = subprocess.run(
            [str(find_bindir() / args[0]), *args[1:]], env=env, cwd=self.root, capture_output=True, text=True,
            timeout=timeout, start_new_session=True, **as_user,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        user = self._user()
        if user is None:
            return
        for path in (self.root, self.root / "run", *self.root.rglob("*")):
            os.chown(path, user.pw_uid, user.pw_gid)
        probe = self._run(["pg_ctl", "--version"], check=False)
        reach = subprocess.run(["test", "-w", str(self.root)], user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        if probe.returncode != 0 or reach.returncode != 0:
            raise PostgresUnavailable(
                f"PostgreSQL runs as {self.run_as!r} (it refuses root), who cannot reach {self.root}: make its parent "
                f"folders traversable (chmod o+x) or set FLYWHEEL_HOME to a folder that user can reach"
            )

    # -- lifecycle -----------------------------------------------------------------------------
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """initdb once: superuser ``flywheel`` with a generated password, SCRAM on TCP."""
        find_bindir()
        self._prepare_root()
        if self.initialized():
            return
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
            self._prepare_root()  # the run-as user must own the password file initdb reads
        self._run(["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--pwfile", str(self.password_file),
                   "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--locale=C"])

    def running(self) -> bool:
        """The postmaster of ``postmaster.pid`` is alive (read from /proc: no child process, see procs.spawn)."""
        pid = self.pid()
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return b"postgres" in cmdline and state not in ("Z", "X")

    def start(self, timeout_s: float = 60) -> None:
        self.init()
        if self.running():
            return
        opts = f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories={self.root / 'run'}"
        self._run(["pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", opts,
                   "-w", "-t", str(int(timeout_s))], timeout=timeout_s + 10)

    def stop(self, timeout_s: float = 60) -> str:
        """Fast shutdown (what ``pg_ctl stop -m fast`` sends: SIGINT to the postmaster), then wait."""
        pid = self.pid()
        if pid is None or not self.running():
            return "not running"
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        while self.running():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown; recovery replays the WAL at next start
                return "killed"
            time.sleep(0.2)
        return "stopped"

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # -- clients -------------------------------------------------------------------------------
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def server_url(self) -> str:
        """``postgresql://flywheel:<password>@host:port`` (no database): keep it out of logs."""
        return f"postgresql://{SUPERUSER}:{quote(self.password(), safe='')}@{self.host}:{self.port}"


def ensure_databases(server_url: str, names: list[str], *, timeout_s: float = 30) -> None:
    """Create each database that does not exist yet (connecting to the ``postgres`` database)."""
    import psycopg2

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = psycopg2.connect(f"{server_url}/postgres", connect_timeout=5)
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
