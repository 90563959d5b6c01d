"""Presence marks: "a kbundle process works here", told without pid files.

A process that works somewhere holds a shared `flock` on a mark file for as long as it works
there; the kernel drops it when the process ends, SIGKILL included. Whether anyone holds it is
an exclusive lock tried without waiting: granted, nobody does (it is released at once).
`activity.py` marks the user's whole cache this way (gc's "is any run alive"), and
`image/locks.Presence` marks one workdir (a failed run removes nothing another run uses).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


def _open(path: Path, create_folder: bool) -> Optional[int]:
    """The mark file, opened (created if missing); None where its folder is absent and may not
    be made, or the disk refuses (a read-only or full cache)."""
    try:
        if create_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            return None
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def take(path: Path, wait: bool = True, create_folder: bool = True) -> Optional[int]:
    """Hold the mark at `path` (shared) until the returned descriptor is closed or the process
    ends; None where it cannot be held (no folder, or, without `wait`, someone holds it
    exclusively this instant)."""
    fd = _open(path, create_folder)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if wait else fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def anyone_holds(path: Path, create_folder: bool = True) -> Optional[bool]:
    """Whether a live process (this one included, if it holds it) holds the mark at `path`;
    None where the mark cannot be opened."""
    fd = _open(path, create_folder)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the exclusive lock at once
    return False
