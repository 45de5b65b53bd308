"""Which files of the log folder a week's ingest reads, which it does not and why, and how lines are read.

Read: every file under a day folder of the week (and of the grace days after it), nested folders
included, whose name is a log: ``.jsonl``, ``.ndjson`` or ``.json``, optionally gzip-compressed
(``.gz``) and/or rotated (``app.jsonl.1``, ``app.jsonl.2.gz``, ``app.jsonl-20261006``). Day
folders are ``day=YYYY-MM-DD``; unpadded ones (``day=2026-10-6``) are read too.

Not read, and each one reported with its reason (never silently): files with another name
(``unknown_extension``), hidden files (``hidden_file``), dangling symlinks (``dangling_symlink``),
symlinks that lead outside the log folder (``symlink_outside_log_dir``: not followed), unreadable
entries (``unreadable``), and, at the top of the log folder, entries that are not day folders
(``not_a_day_folder``) or day folders with an impossible date (``bad_day_folder``). The capture
library's own ``dead-letter/`` folder and the flywheel's ``simulation.json`` and ``backfill.json``
markers (``flywheel.layout``) are expected there and are listed apart (``expected``), not as unread.

Lines: a UTF-8 byte-order mark at the start of a file is dropped (it would cost the first
record); a line longer than ``MAX_LINE_BYTES`` is skipped without being held in memory.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Iterator

from flywheel.capture import schema

MAX_LINE_BYTES = schema.MAX_LINE_BYTES  # the capture library writes none longer
GRACE_DAYS = 1
EXPECTED_TOP_LEVEL = frozenset({"dead-letter", "simulation.json", "backfill.json"})
_DAY_RE = re.compile(r"^day=(\d{4})-(\d{1,2})-(\d{1,2})$")
_LOG_NAME_RE = re.compile(r"\.(jsonl|ndjson|json)((\.\d+)|([.-]\d{8}(T?\d{4,6})?))*(\.gz)?((\.\d+)|([.-]\d{8}))*$")


@dataclass
class LogScan:
    """The files of a week (and its grace days) and everything in the log folder left unread."""

    week: list[Path] = field(default_factory=list)
    grace: list[Path] = field(default_factory=list)
    not_read: dict[str, str] = field(default_factory=dict)  # path relative to log_dir -> reason
    expected: list[str] = field(default_factory=list)


def is_log_name(name: str) -> bool:
    return bool(_LOG_NAME_RE.search(name))


def parse_day_folder(name: str) -> date | None:
    """The date of ``day=YYYY-MM-DD`` (or unpadded ``day=2026-10-6``); None when not one."""
    m = _DAY_RE.match(name)
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def _inside(path: Path, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _classify(path: Path, root_real: str) -> str | None:
    """None when ``path`` (a file) is to be read, else the reason it is not."""
    if path.is_symlink():
        if not path.exists():
            return "dangling_symlink"
        if not _inside(path, root_real):
            return "symlink_outside_log_dir"
    if path.name.startswith("."):
        return "hidden_file"
    if not is_log_name(path.name):
        return "unknown_extension"
    return None


def _walk_day(folder: Path, log_dir: Path, root_real: str, scan: LogScan, out: list[Path]) -> None:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        scan.not_read[folder.relative_to(log_dir).as_posix()] = f"unreadable: {exc.strerror}"
        return
    for p in entries:
        rel = p.relative_to(log_dir).as_posix()
        if p.is_dir() and not p.is_symlink():
            _walk_day(p, log_dir, root_real, scan, out)
        elif p.is_dir():  # a symlinked folder: followed only inside the log folder
            if _inside(p, root_real):
                _walk_day(p, log_dir, root_real, scan, out)
            else:
                scan.not_read[rel] = "symlink_outside_log_dir"
        else:
            reason = _classify(p, root_real)
            if reason:
                scan.not_read[rel] = reason
            else:
                out.append(p)


def scan_week(log_dir: Path, week_start: date, week_end: date, grace_days: int = GRACE_DAYS) -> LogScan:
    """The week's files, the grace days' files, and what was not read (see the module doc)."""
    log_dir = Path(log_dir)
    scan = LogScan()
    if not log_dir.is_dir():
        return scan
    root_real = os.path.realpath(log_dir)
    grace_end = week_end + timedelta(days=grace_days)
    for entry in sorted(log_dir.iterdir()):
        name = entry.name
        if name in EXPECTED_TOP_LEVEL:
            scan.expected.append(name)
            continue
        day = parse_day_folder(name)
        if day is None:
            if name.startswith("day="):
                scan.not_read[name] = "bad_day_folder"
            elif not name.startswith("."):
                scan.not_read[name] = "not_a_day_folder"
            continue
        if not week_start <= day < grace_end:
            continue
        if entry.is_symlink() and not _inside(entry, root_real):
            scan.not_read[name] = "symlink_outside_log_dir" if entry.exists() else "dangling_symlink"
            continue
        if not entry.is_dir():
            scan.not_read[name] = "not_a_day_folder"
            continue
        _walk_day(entry, log_dir, root_real, scan, scan.week if day < week_end else scan.grace)
    return scan


def week_files(log_dir: Path, week_start: date, week_end: date, grace_days: int = GRACE_DAYS
               ) -> tuple[list[Path], list[Path]]:
    """The week's day files and the grace-period files after it (read for feedback only)."""
    scan = scan_week(log_dir, week_start, week_end, grace_days)
    return scan.week, scan.grace


def fingerprint(entries: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for name, size in sorted(entries):
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def log_fingerprint(log_dir: Path, week_start: date, week_end: date) -> str:
    """What the week's ingest depends on (file names and sizes, grace day included).

    Equal to ``IngestStats.fingerprint`` when no file changed since the ingest; the sensor uses it
    to notice new or grown files for a week that is already materialized.
    """
    log_dir = Path(log_dir)
    scan = scan_week(log_dir, week_start, week_end)
    entries = []
    for f in scan.week + scan.grace:
        try:
            entries.append((f.relative_to(log_dir).as_posix(), f.stat().st_size))
        except FileNotFoundError:
            continue
    return fingerprint(entries)


def _open(path: Path):
    f = open(path, "rb")
    if f.read(2) == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb"), True
    f.seek(0)
    return f, False


def read_lines(path: Path, sizes: dict) -> Iterator[tuple[int, bytes, str]]:
    """(line number, bytes, state) with state "ok", "no_newline" (last line) or "too_long".

    ``sizes[path]`` is set to the bytes read (a live appender's later lines are not counted, so
    the sensor sees them as new) or, for a gzip file, its size on disk.
    """
    f, zipped = _open(path)
    with f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if len(raw) > MAX_LINE_BYTES:
                head = raw[:2000]
                while not raw.endswith(b"\n"):  # skip the rest without holding it
                    raw = f.readline(1 << 20)
                    if not raw:
                        break
                yield lineno, head, "too_long"
                continue
            yield lineno, raw, "ok" if raw.endswith(b"\n") else "no_newline"
        sizes[path] = path.stat().st_size if zipped else f.tell()
