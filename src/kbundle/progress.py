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


QUIET = 3.0  # seconds without a byte after which a progress line names what it waits for, and where


class Meter:
    """Items and bytes done for one step, with rate and ETA; thread-safe (downloads run in a pool).

    A download says what it waits for (`waiting`), each chunk that it is alive (`heard`), and
    when it is over (`over`): while one has had no byte for QUIET seconds, the line names it and
    its host, so that a stalled server shows as such rather than as silence. A `Heartbeat`
    re-sends the line while nothing else does."""

    def __init__(self, what: str, total: int = 0, total_bytes: int = 0, on_change=None, clock=time.monotonic):
        self.what, self.total, self.total_bytes = what, total, total_bytes
        self.done = 0
        self.bytes = 0
        self.clock = clock
        self.started = clock()
        self.on_change = on_change or (lambda line: None)
        self._lock = threading.Lock()
        self._waits: dict[object, list] = {}  # key -> [what, host, since the last byte, note]

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

    def waiting(self, key, what: str, host: str, note: str = "") -> None:
        """A request for `what` went to `host`: no byte of it has come yet (`note`: a retry, say)."""
        with self._lock:
            self._waits[key] = [what, host, self.clock(), note]

    def heard(self, key) -> None:
        """A byte of `key` came: it is not stalled."""
        with self._lock:
            if key in self._waits:
                self._waits[key][2] = self.clock()

    def over(self, key) -> None:
        with self._lock:
            self._waits.pop(key, None)

    def tell(self, text: str) -> None:
        """A line of its own for this step (pip resolving: no items or bytes to count)."""
        self.on_change(text)

    def pulse(self) -> None:
        """The line again, with how long the quietest download has waited (the heartbeat's tick)."""
        self.on_change(self.line())

    def stalled(self) -> Optional[str]:
        """`waiting for WHAT from HOST (N s without a byte)`, for the longest-silent download, or None."""
        with self._lock:
            now = self.clock()
            quiet = [(now - since, what, host, note) for what, host, since, note in self._waits.values()]
        if not quiet:
            return None
        silent, what, host, note = max(quiet, key=lambda q: q[0])
        if silent < QUIET:
            return None
        return f"waiting for {what} from {host} ({silent:.0f} s without a byte{', ' + note if note else ''})"

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
        if not self.total and not self.done and not self.total_bytes:
            parts = []  # nothing counted yet (an index is asked first): no lone "0"
        stalled = self.stalled()
        if not parts:
            return f"{self.what}: {stalled}" if stalled else self.what
        return f"{self.what}: " + ", ".join(parts) + (f"; {stalled}" if stalled else "")


class Heartbeat:
    """A thread that calls `tick()` every `every` seconds while its `with` block runs: a plain
    console prints at most one line per INTERVAL, so a tick every second gives a line every ~5 s
    even while no byte arrives and nothing else would print."""

    def __init__(self, tick, every: float = 1.0):
        self.tick, self.every = tick, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kbundle-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.tick()
            except Exception:  # a progress line must never break the work it reports on
                pass


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
