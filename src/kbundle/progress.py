"""How `kbundle run` shows progress on stderr: `--progress auto|rich|plain|none`.

- rich: spinners and bars on a terminal (a rich Console).
- plain: one line per step, and while a step runs at most one line every 5 s, e.g.
  `installing conda packages: 12/32, 45.1 MiB of 120.0 MiB, 8.2 MiB/s, ETA 9 s` (for logs and CI).
- none: no progress at all; warnings, the review and its question still print.
- auto: rich when stderr is a terminal, plain otherwise.

Every reporter is console-like (`print`, `status`), so the steps that take a rich Console take
a plain one too. A `Meter` counts items and bytes for one step and formats its line.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO

from kbundle.display import size

MODES = ("auto", "rich", "plain", "none")
INTERVAL = 5.0  # seconds between two plain progress lines


def reporter(mode: str = "auto", stream: Optional[TextIO] = None):
    """The console for `--progress MODE`."""
    from kbundle.errors import UsageError

    if mode not in MODES:
        raise UsageError(f"--progress must be one of {', '.join(MODES)}, not {mode!r}")
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "rich" if stream.isatty() else "plain"
    if mode == "rich":
        from rich.console import Console

        return Console(file=stream, highlight=False)
    return PlainConsole(stream, progress=mode == "plain")


def seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


class Meter:
    """Items and bytes done for one step, with rate and ETA; thread-safe (downloads run in a pool)."""

    def __init__(self, what: str, total: int = 0, total_bytes: int = 0, on_change=None, clock=time.monotonic):
        self.what, self.total, self.total_bytes = what, total, total_bytes
        self.done = 0
        self.bytes = 0
        self.clock = clock
        self.started = clock()
        self.on_change = on_change or (lambda line: None)
        self._lock = threading.Lock()

    def items(self, done: int, total: Optional[int] = None) -> None:
        with self._lock:
            self.done, self.total = done, total if total is not None else self.total
        self.on_change(self.line())

    def item_done(self) -> None:
        with self._lock:
            self.done += 1
        self.on_change(self.line())

    def plan_bytes(self, total_bytes: int) -> None:
        with self._lock:
            self.total_bytes = total_bytes
            self.started = self.clock()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self.on_change(self.line())

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.bytes / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        parts = [f"{self.done}/{self.total}" if self.total else str(self.done)]
        if not self.total and not self.done and self.total_bytes:
            parts = []  # bytes alone (the build context): no count of items to show
        if self.total_bytes:
            parts.append(f"{size(self.bytes)} of {size(self.total_bytes)}")
            rate = self.rate()
            if rate > 0 and self.bytes < self.total_bytes:
                parts.append(f"{size(rate)}/s, ETA {seconds((self.total_bytes - self.bytes) / rate)}")
        return f"{self.what}: " + ", ".join(parts)


class PlainConsole:
    """A console for logs: plain text lines, progress throttled to one line every INTERVAL seconds."""

    is_plain = True

    def __init__(self, stream: TextIO, progress: bool = True, interval: float = INTERVAL, clock=time.monotonic):
        self.stream = stream
        self.progress = progress
        self.interval = interval
        self.clock = clock
        self._last = float("-inf")
        self._lock = threading.Lock()

    def print(self, *objects, end: str = "\n", markup: bool = True, **_ignored) -> None:
        text = " ".join(_plain(o, markup) for o in objects)
        with self._lock:
            self.stream.write(text + end)
            self.stream.flush()

    def status(self, message: str, **_ignored) -> PlainStatus:
        return PlainStatus(self, _plain(message, True))

    def progress_line(self, text: str, force: bool = False) -> None:
        """A progress line: always when `force` (a step starts or ends), else at most one per interval."""
        if not self.progress:
            return
        now = self.clock()
        with self._lock:
            if not force and now - self._last < self.interval:
                return
            self._last = now
            self.stream.write(text + "\n")
            self.stream.flush()


class PlainStatus:
    """`console.status(...)` for a PlainConsole: the step's first line now, updates throttled."""

    def __init__(self, console: PlainConsole, message: str):
        self.console = console
        self.message = message

    def __enter__(self) -> PlainStatus:
        self.console.progress_line(self.message, force=True)
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, message: str = "", **_ignored) -> None:
        if message:
            self.console.progress_line(_plain(message, True))

    def finish(self, message: str) -> None:
        self.console.progress_line(_plain(message, True), force=True)


def _plain(obj, markup: bool) -> str:
    text = str(obj)
    if not markup or "[" not in text:
        return text
    from rich.text import Text

    return Text.from_markup(text).plain


def finish(status, message: str) -> None:
    """A step's last line: in plain mode always printed; a rich status just ends."""
    if hasattr(status, "finish"):
        status.finish(message)
