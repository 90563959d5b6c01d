"""Named locks in kbundle's cache: one run builds (or registers) what several runs want at once.

An exclusive `flock` on `<cache>/locks/<name>.lock`, held for a block. The kernel drops it when
the process ends, however it ends, so a killed run never leaves the others waiting. The lock
files themselves stay (a few bytes each)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from rich.markup import escape

from kbundle.cache import cache_root


@contextmanager
def held(name: str, console, waiting: str) -> Iterator[None]:
    """The lock `name`, held for the block; `waiting` is printed when another run holds it now."""
    import fcntl

    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:200] + ".lock")
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(escape(waiting), soft_wrap=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
