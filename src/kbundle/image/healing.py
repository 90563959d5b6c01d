"""What kbundle found damaged in its caches during this run, and removed to fetch or build again.

A cache entry that fails its check (a wheel against its sha256, a conda package against its
paths.json, a .pyc against its digest) is never used: it is removed, and the run fetches or
builds it again. The checks happen deep in the image stage, in threads; they note each case
here, and the flow prints one `warning:` line per case at the end of the stage
(`drain`), so the user learns that their disk or cache lost bytes.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_noted: list[str] = []


def note(what: str) -> None:
    """`what`: the damaged entry and what replaced it, e.g. `wheel six-1.16.0-py2.py3-none-any.whl
    in kbundle's cache failed its sha256: fetched again`."""
    with _lock:
        if what not in _noted:
            _noted.append(what)


def drain() -> list[str]:
    """Everything noted since the last drain, oldest first."""
    with _lock:
        found = list(_noted)
        _noted.clear()
    return found
