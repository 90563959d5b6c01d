"""Whether some kbundle process works on this machine right now, told without pid files.

Every kbundle command but `gc` holds a shared lock on one file in the user's cache while it
runs (`hold`); the kernel sees it closed when the process ends, SIGKILL included. `gc` asks
for the lock exclusively without waiting (`nobody_working`): when it gets it, no kbundle
process of this user is alive, so every staging and resolve folder kbundle left is an
orphan, whatever its age. When it does not, gc falls back to an age rule.
"""

from __future__ import annotations

from pathlib import Path

from kbundle import marks

_held: list[int] = []  # the open lock, kept for the life of the process


def lock_path() -> Path:
    from kbundle.cache import cache_root

    return cache_root() / "active.lock"


def hold(create: bool = False) -> None:
    """Mark this process as working until it exits (once per process).

    The CLI marks every command at its start, but only in a cache that exists: a bundle refused
    before any work must leave no file behind. A run marks itself again with `create` just
    before it first writes to the cache (flows/checks.py `prechecks`). A mark that cannot be
    taken (gc sweeping this instant, a read-only cache) only costs gc its shortcut."""
    if _held:
        return
    fd = marks.take(lock_path(), wait=False, create_folder=create)
    if fd is not None:
        _held.append(fd)


def nobody_working() -> bool:
    """True when no other kbundle process of this user holds the mark now."""
    return marks.anyone_holds(lock_path(), create_folder=False) is False
