"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file kbundle writes for a user (bundles, notebooks, kernelspecs, state) goes
through here, so an interrupted write leaves no partial file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    """The process's umask, read without changing it. os.umask can only set it, and setting it to
    0 for a moment, even to put it back, gives every file another thread creates in that moment
    (an unpacking worker's, a download's) mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no /proc (not Linux): the moment's mask is the private one
    os.umask(mask)
    return mask


@contextmanager
def atomic_writer(path: Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary handle on a temp file beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to `path` atomically."""
    with atomic_writer(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
