"""One vocabulary for progress on long work: lines, a live line, and byte meters.

Workflows report through a ``Progress``; the command line gives them one that writes to
stderr (a live, rewritten line on a terminal; plain, rate-limited lines otherwise), and
tests give them a ``Quiet`` one that only records.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import IO


class Progress:
    """Progress lines on ``stream`` (stderr by default)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self._live = False
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        """A line that stays."""
        with self._lock:
            if self._live:
                self.out.write("\r\x1b[K")
                self._live = False
            self.out.write(text + "\n")
            self.out.flush()

    def live(self, text: str) -> None:
        """A line that the next one replaces (on a terminal; a plain line otherwise)."""
        if not self.tty:
            self.say(text)
            return
        with self._lock:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r\x1b[K" + text[:width])
            self.out.flush()
            self._live = True

    def end_live(self) -> None:
        with self._lock:
            if self._live:
                self.out.write("\r\x1b[K")
                self.out.flush()
                self._live = False

    def meter(self, what: str, total: int | None) -> Meter:
        return Meter(self, what, total)

    @property
    def interval(self) -> float:
        """Seconds between live updates: often on a terminal, seldom in a log."""
        return 0.5 if self.tty else 10.0


class Quiet(Progress):
    """Records every line instead of printing it (for tests and library callers)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.tty = False
        self._live = False
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            self.lines.append(text)

    def live(self, text: str) -> None:
        self.say(text)

    def end_live(self) -> None:
        pass


class Meter:
    """Rate-limited progress of a byte stream: ``add(n)`` as bytes pass."""

    def __init__(self, progress: Progress, what: str, total: int | None,
                 every: float = 2.0) -> None:
        self.progress, self.what, self.total, self.every = progress, what, total, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def to(self, done: int) -> None:
        """Progress given as the bytes passed so far (an ``OnBytes`` callback)."""
        self.add(done - self.done)

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.start, 1e-6) / 1e6
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.progress.live(f"  {self.what}: {self.done / 1e6:,.0f} MB{pct}, "
                               f"{rate:,.0f} MB/s")
