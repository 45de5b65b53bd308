"""One progress helper for every long loop: "label: done/total (pct%), rate, ~time left".

Encoding a corpus, judging pairs, reranking queries and training steps all report through
:class:`Progress`, so the terminal shows one format, and a meter says at most one line per
``every_s`` seconds (the last line, ``force=True``, always shows). Lines go to any callable that
takes a string: a Dagster logger's ``info``, ``print``, or nothing (``say=None``: silent).

The rate is measured from the meter's start, so time left is the plain extrapolation
``(total - done) / rate``; where items differ in cost (texts encoded longest first), the caller
passes ``work``, the share of the whole work done, and time left is ``elapsed x (1 - work) / work``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

Say = Callable[[str], None]


def rate_text(rate: float) -> str:
    """'12.3/s', or '0.42/s' for slow loops (two figures that mean something); '-' before any."""
    if not rate > 0:
        return "-/s"
    return f"{rate:.1f}/s" if rate >= 1 else f"{rate:.2g}/s"


@dataclass
class Progress:
    """A throttled meter: ``update(done)`` says a line at most every ``every_s`` seconds."""

    label: str
    total: int
    say: Optional[Say] = None
    every_s: float = 10.0
    unit: str = ""  # e.g. "steps": "train: 4/8 steps (50%)"
    clock: Callable[[], float] = time.monotonic  # injectable, for tests
    start: float = field(init=False)
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()
        self.last = -math.inf

    def line(self, done: int, detail: str = "", now: float | None = None, work: float | None = None) -> str:
        """The line for ``done`` items, e.g. 'encode: 512/5183 (10%), 40.1/s, ~117s left'."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        if work is not None:
            left = elapsed * (1.0 - work) / work if work > 0 else float("nan")
        else:
            left = (self.total - done) / rate if rate > 0 else float("nan")
        unit = f" {self.unit}" if self.unit else ""
        text = (f"{self.label}: {done}/{self.total}{unit} ({100 * done / max(self.total, 1):.0f}%), "
                f"{rate_text(rate)}, ~{left:.0f}s left")
        return f"{text}, {detail}" if detail else text

    def update(self, done: int, *, force: bool = False, detail: str = "", work: float | None = None) -> str | None:
        """Say the line when ``every_s`` has passed since the last one (or ``force``); return it.
        ``work``: the share of the whole work done, where items differ in cost (default: done/total)."""
        now = self.clock()
        if self.say is None or (not force and now - self.last < self.every_s):
            return None
        self.last = now
        text = self.line(done, detail, now, work)
        self.say(text)
        return text

    def finish(self, done: int | None = None, detail: str = "") -> str | None:
        """The last line (always said)."""
        return self.update(self.total if done is None else done, force=True, detail=detail)
