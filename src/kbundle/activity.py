"""Whether some kbundle process works on this machine right now, told without pid files.

Every kbundle command but `gc` holds a shared lock on one file in the user's cache while it
runs (`hold`); the kernel sees it closed when the process ends, SIGKILL included. `gc` asks
for the lock exclusively without waiting (`nobody_working`): when it gets it, no kbundle
process of this user is alive, so every staging and resolve folder kbundle left is an
orphan, whatever its age. When it does not, gc falls back to an age rule.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_held: list[int] = []  # the open lock, kept for the life of the process


def lock_path() -> Path:
    from kbundle.cache import cache_root

    return cache_root() / "active.lock"


def _open(create: bool = True) -> int | None:
    path = lock_path()
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            return None
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None  # a read-only or full cache: nothing to hold, and gc keeps to its age rule


def hold(create: bool = False) -> None:
    """Mark this process as working until it exits (once per process).

    The CLI marks every command at its start, but only in a cache that exists: a bundle refused
    before any work must leave no file behind. A run marks itself again with `create` just
    before it first writes to the cache (flows/checks.py `prechecks`)."""
    if _held:
        return
    fd = _open(create)
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # gc is sweeping this instant; working without the mark only costs gc its shortcut
        os.close(fd)
        return
    _held.append(fd)


def nobody_working() -> bool:
    """True when no other kbundle process of this user holds the mark now."""
    fd = _open()
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock at once: a run may start again
    return True
