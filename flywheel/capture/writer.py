"""Append-only day files: the storage under the capture API.

Why JSON Lines and not Parquet: a log is written one record at a time, by a process that may be
killed at any moment. JSON Lines can be appended to record by record; a killed writer leaves at
most one torn last line, which the reader detects and sets aside. Parquet cannot be appended to
(its footer is written at close), so a killed writer would lose the whole file.

Layout: ``<log_dir>/day=YYYY-MM-DD/<host>-<pid>-<random>.jsonl``; the day is the UTC date of the
record's timestamp. Records that could not be made valid go to ``<log_dir>/dead-letter/`` (same
file naming), each with the reason. Every process writes its own files (no locks between
processes, no interleaving), opened with ``O_APPEND``, and every record is one ``os.write`` of a
whole line. Once ``write`` has returned, the record is in the kernel: a SIGKILL of the process
cannot lose it (only a crash of the machine could, before the page cache is flushed;
``fsync=True`` closes that gap at a cost of a disk flush per record).

Failures: a write that raised wrote nothing, so the same file is used again (a full disk does not
create a file per call). A *short* write left a torn line: that file is abandoned and the next
record starts a new one, so a torn line is always the last line of its file. A failed write is
retried ``retries`` times after ``retry_delay_s``, doubling (a few milliseconds in all); after
that the writer pauses: for ``pause_s`` (doubling with each further failure, up to
``max_pause_s``) calls fail at once without touching the disk, then one call tries again.

Processes: ``os.register_at_fork`` gives every live writer, in a forked child, a fresh lock and
no open files (a lock held by another thread of the parent at fork time would otherwise never
be released in the child). Writers pickle as their settings, so they can be sent to spawn and
forkserver processes, which open their own files.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import weakref
from pathlib import Path

_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"
_MAX_OPEN_FILES = 8
DEAD_LETTER_DIR = "dead-letter"
_write = os.write  # indirection so tests can simulate a full disk
_monotonic = time.monotonic  # and a clock
_sleep = time.sleep


def day_dir_name(day: str) -> str:
    return f"day={day}"


def encode_line(record: dict) -> bytes:
    """One JSON line, UTF-8; strings that cannot be encoded (lone surrogates) are replaced."""
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return (line + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (line + "\n").encode("utf-8", "replace")


class WritesPaused(OSError):
    """Raised without touching the disk while the writer pauses after repeated failures."""


_LIVE: "weakref.WeakSet[DayFileWriter]" = weakref.WeakSet()


def _reset_all_after_fork() -> None:
    for writer in list(_LIVE):
        writer._after_fork()


os.register_at_fork(after_in_child=_reset_all_after_fork)


class DayFileWriter:
    """Writes JSON lines into per-process, per-folder files. ``write`` raises on I/O errors."""

    def __init__(self, log_dir: str | Path, *, fsync: bool = False, retries: int = 2,
                 retry_delay_s: float = 0.001, pause_s: float = 0.5, max_pause_s: float = 30.0):
        self.log_dir = Path(log_dir)
        self.fsync = fsync
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.pause_s = pause_s
        self.max_pause_s = max_pause_s
        self._init_state()
        _LIVE.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}  # folder name -> fd
        self._names: dict[str, str] = {}  # folder name -> file name, kept across failures
        self._failures = 0
        self._paused_until = 0.0
        self._last_error = ""
        self.files_created = 0

    def _after_fork(self) -> None:
        fds = list(self._fds.values())
        self._init_state()  # a new lock: the parent's may be held by a thread that does not exist here
        for fd in fds:
            try:
                os.close(fd)  # the child's copy only; the parent's file stays open
            except OSError:
                pass

    def __getstate__(self) -> dict:
        return {"log_dir": str(self.log_dir), "fsync": self.fsync, "retries": self.retries,
                "retry_delay_s": self.retry_delay_s, "pause_s": self.pause_s, "max_pause_s": self.max_pause_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state.pop("log_dir"), **state)

    def _open(self, folder: str) -> tuple[int, Path]:
        if os.getpid() != self._pid:  # a fork the hook did not see (os.fork from C code)
            self._fds.clear()
            self._names.clear()
            self._pid = os.getpid()
        name = self._names.get(folder)
        if name is None:
            name = self._names[folder] = f"{_HOST}-{self._pid}-{secrets.token_hex(4)}.jsonl"
            self.files_created += 1
        path = self.log_dir / folder / name
        fd = self._fds.get(folder)
        if fd is not None:
            return fd, path
        if len(self._fds) >= _MAX_OPEN_FILES:
            self._close(min(self._fds))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._fds[folder] = fd
        return fd, path

    def _close(self, folder: str) -> None:
        fd = self._fds.pop(folder, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _attempt(self, folder: str, data: bytes) -> Path:
        fd, path = self._open(folder)
        try:
            n = _write(fd, data)
        except BaseException:
            self._close(folder)  # nothing was written: the same file is reopened next time
            raise
        if n != len(data):
            # never append after a torn line: the next record starts a fresh file
            self._close(folder)
            self._names.pop(folder, None)
            raise OSError(f"short write to {path}: {n} of {len(data)} bytes")
        if self.fsync:
            os.fsync(fd)
        return path

    def write_to(self, folder: str, data: bytes) -> Path:
        """Append one encoded line (ending in a newline) to this process's file in ``folder``."""
        with self._lock:
            now = _monotonic()
            if now < self._paused_until:
                raise WritesPaused(f"writes paused for {self._paused_until - now:.2f}s after "
                                   f"{self._failures} failed writes; last: {self._last_error}")
            delay = self.retry_delay_s
            for attempt in range(self.retries + 1):
                try:
                    path = self._attempt(folder, data)
                except OSError as exc:
                    if attempt == self.retries:
                        self._failures += 1
                        self._last_error = f"{type(exc).__name__}: {exc}"
                        pause = min(self.max_pause_s, self.pause_s * 2 ** (self._failures - 1))
                        self._paused_until = _monotonic() + pause
                        raise
                    _sleep(delay)
                    delay *= 2
                    continue
                self._failures = 0
                return path
            raise AssertionError("unreachable")  # pragma: no cover

    def write_line(self, day: str, data: bytes) -> Path:
        return self.write_to(day_dir_name(day), data)

    def write_dead_letter(self, data: bytes) -> Path:
        return self.write_to(DEAD_LETTER_DIR, data)

    def write(self, record: dict) -> Path:
        """Encode and append a record; its day is the date part of its UTC ``timestamp``."""
        return self.write_line(record["timestamp"][:10], encode_line(record))

    def files(self) -> list[Path]:
        with self._lock:
            return [self.log_dir / folder / name for folder, name in self._names.items()
                    if (self.log_dir / folder / name).exists()]

    def close(self) -> None:
        with self._lock:
            if os.getpid() != self._pid:
                self._fds.clear()
                self._names.clear()
                return
            for folder in list(self._fds):
                self._close(folder)
