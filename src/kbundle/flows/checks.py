"""What `run` checks on this machine before the first download: writable places, free disk.

The sizes are estimates made offline from the lock (each package's download size): a conda
package unpacks to about UNPACK_FACTOR times its download. `kbundle doctor BUNDLE` shows them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle.cache import cache_root
from kbundle.display import size
from kbundle.errors import MachineError

UNPACK_FACTOR = 3  # unpacked environment / downloaded packages, for typical conda archives


@dataclass(frozen=True)
class Needs:
    """The bundle's appetite, estimated offline; None where it cannot be known before a solve."""

    download: Optional[int]  # conda packages to download, at most (bytes)
    base: Optional[int] = None  # the base image, when it is on this engine

    @property
    def env(self) -> Optional[int]:
        return None if self.download is None else self.download * UNPACK_FACTOR

    @property
    def image(self) -> Optional[int]:
        return None if self.env is None else self.env + (self.base or 0)

    @property
    def cache(self) -> Optional[int]:
        """In kbundle's cache while building: the packages, unpacked once in the package cache and
        once in the build context."""
        return None if self.download is None else self.download + 2 * self.env

    def describe(self) -> str:
        if self.download is None:
            return "unknown until the environment is solved"
        base = f" (with the base image's {size(self.base)})" if self.base else ""
        return f"about {size(self.image)} for the image{base}, {size(self.cache)} in kbundle's cache while it builds"


def estimate(records, base_size: Optional[int] = None) -> Needs:
    """Needs from the lock's records (None for an unlocked bundle, or a lock without sizes)."""
    if records is None:
        return Needs(None, base_size)
    sizes = [r.size for r in records]
    return Needs(sum(sizes) if all(sizes) else None, base_size)


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Refuse, naming it, a place kbundle must write to but cannot (read-only, or not ours)."""
    found = existing_ancestor(path)
    if os.access(found, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(found).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system (EROFS)" if read_only else "is not writable (EACCES)"
    raise MachineError(f"{what} {path} cannot be written: {found} {why}")


def check_free(path: Path, needed: Optional[int], what: str) -> None:
    if not needed:
        return
    free = shutil.disk_usage(existing_ancestor(path)).free
    if free < needed:
        raise MachineError(
            f"not enough disk space (ENOSPC ahead): {what} {path} needs about {size(needed)}, "
            f"and {size(free)} is free; free some space or set KBUNDLE_CACHE_DIR"
        )


def places(workdir: Path) -> list[tuple[Path, str]]:
    from kbundle.kernel.spec import user_kernels_dir

    return [
        (workdir, "the working directory"),
        (cache_root(), "kbundle's cache"),
        (user_kernels_dir(), "Jupyter's kernelspec directory"),
    ]


def prechecks(needs: Optional[Needs], workdir: Path) -> None:
    """Before the first download: every place run writes is writable, and the cache has room."""

    from kbundle import activity

    for path, what in places(workdir):
        check_writable(path, what)
    activity.hold(create=True)  # from here on the run writes to the cache: gc must see it working
    if needs is not None:
        check_free(cache_root(), needs.cache, "kbundle's cache")
