"""Long-lived child processes that can be stopped: own process group, default signal handlers.

A process started from a script or a background shell may inherit SIGINT (and SIGTERM) set to
"ignore"; Dagster's processes then never stop on them and leave run workers behind. Every
service here starts in a new session (its own process group) with SIGINT and SIGTERM reset to
their defaults, and is stopped by signalling the whole group: SIGTERM first, SIGKILL after a
bounded wait. A pid file per service lets `flywheel services down` stop what `up` started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Proc:
    """A started service: its name, process-group leader, command and log file."""

    name: str
    pid: int
    cmd: list[str]
    log: str
    url: str = ""

    def alive(self) -> bool:
        return pid_alive(self.pid)


def spawn(name: str, cmd: list[str], *, env: dict[str, str], log_path: Path, url: str = "") -> Proc:
    """Start ``cmd`` in its own session with SIGINT/SIGTERM at their defaults; output appends to ``log_path``.

    ``posix_spawn``, not fork: a parent that has loaded gRPC (Dagster's client does) must not
    fork, gRPC's fork handlers abort the child ("Check failed: wakeup_fd_->Wakeup()").
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = cmd[0] if os.path.isabs(cmd[0]) else shutil.which(cmd[0]) or cmd[0]
    pid = os.posix_spawn(
        exe, cmd, env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True, setsigdef=(signal.SIGINT, signal.SIGTERM), setsigmask=(),
    )
    _CHILDREN.add(pid)
    return Proc(name, pid, list(cmd), str(log_path), url)


_CHILDREN: set[int] = set()  # started by this process: reaped here so they do not linger as zombies


def _reap(pid: int) -> bool:
    """True when ``pid`` was our child and has exited (and is now reaped)."""
    if pid not in _CHILDREN:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = pid
    if done == pid:
        _CHILDREN.discard(pid)
        return True
    return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    if _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) not in ("Z", "X", None)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(int(stat.parent.name))
    return out


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_group(pgid: int, *, grace_s: float = 20.0) -> str:
    """SIGTERM the group, wait up to ``grace_s``, then SIGKILL what is left. Says which it took."""
    for sig, wait_s, how in ((signal.SIGTERM, grace_s, "stopped"), (signal.SIGKILL, 10.0, "killed")):
        if not signal_group(pgid, sig):
            return "not running" if sig == signal.SIGTERM else "stopped"
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pgid)
            if not group_members(pgid):
                return how
            time.sleep(0.2)
    return "still running"


def write_state(path: Path, procs: dict[str, Proc], extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"procs": {k: asdict(v) for k, v in procs.items()}, **extra}, indent=2))
    os.replace(tmp, path)


def read_state(path: Path) -> tuple[dict[str, Proc], dict]:
    if not path.exists():
        return {}, {}
    data = json.loads(path.read_text())
    procs = {k: Proc(**v) for k, v in data.pop("procs", {}).items()}
    return procs, data


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (as servers do, with SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return True  # the server will report the bad host itself
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            return False
    return True
