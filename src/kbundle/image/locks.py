"""Named locks in kbundle's cache: one run builds (or registers) what several runs want at once.

An exclusive `flock` on `<cache>/locks/<name>.lock`, held for a block (`held`). The kernel drops
it when the process ends, however it ends, so a killed run never leaves the others waiting. The
lock files themselves stay (a few bytes each).

`Presence` is the shared kind: every run that works in one place holds it for as long as it
works there, and `others_present` tells whether any other live process does, so that a run that
fails removes nothing another run still uses. A SIGKILLed run's presence ends with it.

`deferred_signals` is the other half of a critical section: a cleanup that must not stop half-way."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from rich.markup import escape

from kbundle import marks
from kbundle.cache import cache_root


def lock_path(name: str, suffix: str = ".lock") -> Path:
    """The lock file of `name` (any text: it is made one harmless file name)."""
    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:200] + suffix)


@contextmanager
def held(name: str, console, waiting: str = "") -> Iterator[None]:
    """The lock `name`, held for the block; `waiting` is printed when another run holds it now
    (nothing is printed without a console or a message)."""
    with open(lock_path(name), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if console is not None and waiting:
                console.print(escape(waiting), soft_wrap=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


class Presence:
    """A shared lock on `name`, held until `leave` or the end of the process: "a run works here"."""

    def __init__(self, name: str):
        self.name = name
        self.fd: Optional[int] = marks.take(lock_path(name, ".users"))
        if self.fd is None:
            raise OSError(f"cannot hold {lock_path(name, '.users')}")

    def leave(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the shared lock
            self.fd = None


def others_present(name: str) -> bool:
    """Whether a live process other than this one holds `name`'s Presence (this one must have
    left it first: its own shared lock would count). A mark that cannot be opened counts as
    present: a failed run then removes nothing."""
    return marks.anyone_holds(lock_path(name, ".users")) is not False


class deferred_signals:
    """Ctrl-C and SIGTERM wait for the block, then interrupt as usual (main thread only).

    For cleanups that must not stop half-way: a KeyboardInterrupt inside shutil.rmtree, just after
    it closed a folder and before it noted so, makes it close that descriptor again (EBADF, or
    someone else's descriptor), and the interruption turns into that error."""

    def __enter__(self):
        self.saved, self.caught = {}, []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, lambda signum, frame: self.caught.append(signum))
        return self

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.caught and exc_type is None:
            raise KeyboardInterrupt
        return False
