"""Append-only day files: the storage under the capture API.

Why JSON Lines and not Parquet: a log is written one record at a time, by a process that may be
killed at any moment. JSON Lines can be appended to record by record; a killed writer leaves at
most one torn last line, which the reader detects and sets aside. Parquet cannot be appended to
(its footer is written at close), so a killed writer would lose the whole file.

Layout: ``<log_dir>/day=YYYY-MM-DD/<host>-<pid>-<random>.jsonl``; the day is the UTC date of the
record's timestamp. Every process writes its own files (no locks between processes, no
interleaving), opened with ``O_APPEND``, and every record is one ``os.write`` of a whole line.
Once ``write`` has returned, the record is in the kernel: a SIGKILL of the process cannot lose it
(only a crash of the machine could, before the page cache is flushed; ``fsync=True`` closes that
gap at a cost of a disk flush per record). After a failed or short write the file is abandoned and
the next record starts a new file, so a torn line is always the last line of its file.
A forked child notices the new pid and opens its own files.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from pathlib import Path

_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"
_MAX_OPEN_DAYS = 8
_write = os.write  # indirection so tests can simulate a full disk


def day_dir_name(day: str) -> str:
    return f"day={day}"


def encode_line(record: dict) -> bytes:
    """One JSON line, UTF-8; strings that cannot be encoded (lone surrogates) are replaced."""
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return (line + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (line + "\n").encode("utf-8", "replace")


class DayFileWriter:
    """Writes JSON lines into per-process, per-day files. ``write`` raises on I/O errors."""

    def __init__(self, log_dir: str | Path, *, fsync: bool = False):
        self.log_dir = Path(log_dir)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}
        self._paths: dict[str, Path] = {}
        self._names: dict[str, str] = {}  # day -> file name, kept when an idle fd is closed

    def _open(self, day: str) -> int:
        if os.getpid() != self._pid:  # forked: the parent's files are not ours to append to
            self._fds.clear()
            self._paths.clear()
            self._names.clear()
            self._pid = os.getpid()
        fd = self._fds.get(day)
        if fd is not None:
            return fd
        if len(self._fds) >= _MAX_OPEN_DAYS:
            oldest = min(self._fds)
            self._close_day(oldest)
        folder = self.log_dir / day_dir_name(day)
        folder.mkdir(parents=True, exist_ok=True)
        name = self._names.get(day)
        if name is None:
            name = self._names[day] = f"{_HOST}-{self._pid}-{secrets.token_hex(4)}.jsonl"
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._fds[day] = fd
        self._paths[day] = path
        return fd

    def _close_day(self, day: str) -> None:
        fd = self._fds.pop(day, None)
        self._paths.pop(day, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def write_line(self, day: str, data: bytes) -> Path:
        """Append one encoded line (ending in a newline) to this process's file for ``day``."""
        with self._lock:
            fd = self._open(day)
            path = self._paths[day]
            try:
                n = _write(fd, data)
                if n != len(data):
                    raise OSError(f"short write to {path}: {n} of {len(data)} bytes")
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                # never append after a possibly torn line: the next record starts a fresh file
                self._close_day(day)
                self._names.pop(day, None)
                raise
            return path

    def write(self, record: dict) -> Path:
        """Encode and append a record; its day is the date part of its UTC ``timestamp``."""
        return self.write_line(record["timestamp"][:10], encode_line(record))

    def files(self) -> list[Path]:
        with self._lock:
            return list(self._paths.values())

    def close(self) -> None:
        with self._lock:
            if os.getpid() != self._pid:
                self._fds.clear()
                self._paths.clear()
                self._names.clear()
                return
            for day in list(self._fds):
                self._close_day(day)
