"""Helpers for driving the real UIs (Dagster, MLflow) in a browser from tests.

Servers are started in their own process group (session) with SIGINT and SIGTERM reset to their
defaults: ``dagster dev`` started from a script inherits an ignored SIGINT and then shuts down
neither on SIGINT nor SIGTERM, and it spawns a webserver, a daemon, a code server and run
workers. Stopping kills the whole group, politely first, then for sure, within bounded waits.

Chromium is Debian's (``/usr/bin/chromium``, packages ``chromium`` and ``chromium-driver``),
driven by Playwright's Python package; nothing here downloads a browser.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flywheel.services.procs import port_free

# Headless, as root, on a machine with no internet: without the background-networking flags
# Chromium keeps trying (and failing) to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_executable() -> str | None:
    """Debian's Chromium (or $FLYWHEEL_CHROMIUM), or None where there is none."""
    for candidate in (os.environ.get("FLYWHEEL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(consecutive: int = 1) -> int:
    """A free port for a server a test starts (with the ``consecutive - 1`` ports after it free too).

    Chosen below the kernel's ephemeral range: a port the kernel hands out for ``bind(0)`` lies in
    the range it also gives every outgoing connection, so one chosen that way can be taken by some
    client's socket in the seconds before the server binds it (seen in CI as "address already in
    use"). No port is handed out twice in one process.
    """
    lo, _ = _ephemeral_range()
    first, last = 20000, min(lo, 65536) - consecutive
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(first, last) if last > first else rng.randrange(1024, 65536 - consecutive)
        ports = range(port, port + consecutive)
        if not _HANDED_OUT.intersection(ports) and all(port_free("127.0.0.1", p) for p in ports):
            _HANDED_OUT.update(ports)
            return port
    raise RuntimeError(f"no {consecutive} free consecutive port(s) found below the ephemeral range ({lo})")


def _restore_default_signals() -> None:  # runs in the child, between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_server(name: str, cmd: list[str], *, url: str, env: dict, log_path: Path, cwd: Path | None = None) -> Server:
    """Start ``cmd`` in a new session (its own process group), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_restore_default_signals,
        )
    finally:
        log.close()  # the child holds its own descriptor
    return Server(name, proc, url, log_path)


def stop_server(server: Server, *, grace_s: float = 15.0) -> None:
    """SIGTERM the server's whole process group, then SIGKILL whatever is left."""
    pgid = server.proc.pid  # start_new_session: the group id is the leader's pid
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            server.proc.poll()
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a group of only zombies still answers signal 0: look for a live member
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_http(server: Server, path: str = "", *, timeout_s: float = 120.0, ok=lambda status, body: status == 200) -> bytes:
    """Poll ``server.url + path`` until ``ok(status, body)``; fail early if the server died."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=5) as resp:
                body = resp.read()
                if ok(resp.status, body):
                    return body
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"{server.name} not ready at {server.url + path} after {timeout_s:.0f}s ({last}):\n{server.log_tail()}")


def graphql(base_url: str, query: str, variables: dict | None = None, *, timeout_s: float = 30.0) -> dict:
    """POST a query to Dagster's GraphQL endpoint (what the UI itself talks to)."""
    req = urllib.request.Request(
        base_url + "/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        payload = json.loads(resp.read())
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


def screenshots_dir(default: Path) -> Path:
    d = Path(os.environ.get("FLYWHEEL_SCREENSHOTS") or default)
    d.mkdir(parents=True, exist_ok=True)
    return d
