"""What `run` checks on this machine before the first download: writable places, free disk; and
what it says when a disk fills anyway (`disk_truth`).

The sizes are estimates made offline from the lock, covering everything a run writes (`Needs`).
Each factor below names where it comes from. `kbundle doctor BUNDLE` shows them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle.cache import cache_root
from kbundle.display import size
from kbundle.errors import KbundleError, MachineError, first_line

# Unpacked conda packages / their downloads. Measured: the test world's env (tests/world: python
# 3.11, numpy, ipykernel and their 32 packages) downloads 47.3 MB and unpacks to 191.8 MB in
# kbundle's package cache (4.05x).
UNPACK_FACTOR = 4
# Of the unpacked conda env, the share the build context holds as copies rather than hard links
# into the package cache (files rattler rewrites for the prefix, and all of it where the cache
# and the context sit on different disks they cannot: kbundle keeps both in its cache). Measured:
# the same env's peak cache use (309 MB) less its archives, package cache and .pyc is 14 MB (7%),
# rounded up.
CONTEXT_COPY_SHARE = 0.1
# Installed pip files / their wheels. Measured over the 967 wheels of a development host's local
# wheel mirror: 8.0 GB of wheels unpack to 22.0 GB (2.74x).
WHEEL_UNPACK_FACTOR = 3
# pip's lock (`name==version --hash=sha256:...`, docs/format.md) records no sizes, and an unlocked
# pip line is resolved only after consent: each pip line is allowed the mean wheel size of that
# same mirror (8.3 MB), rounded up. An allowance, not a measurement: one line may pull much more.
PIP_LINE_ALLOWANCE = 10 * 1024 * 1024
# The .pyc files kbundle compiles (image/bytecode.py) / the env they compile. Measured: the world
# env's 45.4 MB of .py sources compile to 56.2 MB of .pyc, 29% of its 191.8 MB, rounded up.
PYC_SHARE = 0.3
# The engine holds the image's new layers, and while the legacy builder runs it also unpacks the
# whole build context (the same bytes) in its own storage: twice the layers, at the peak.
ENGINE_COPIES = 2


@dataclass(frozen=True)
class Needs:
    """The bundle's appetite, estimated offline; None where it cannot be known before a solve."""

    download: Optional[int]  # conda packages to download, at most (bytes)
    base: Optional[int] = None  # the base image, when it is on this engine
    pip_wheels: int = 0  # pip wheels to download (bytes): PIP_LINE_ALLOWANCE per pip line

    @property
    def conda(self) -> Optional[int]:
        """The conda env unpacked (once in the package cache; the context hard-links most of it)."""
        return None if self.download is None else self.download * UNPACK_FACTOR

    @property
    def pip(self) -> int:
        """The pip section installed into the env (not linked: pip writes its files anew)."""
        return self.pip_wheels * WHEEL_UNPACK_FACTOR

    @property
    def pyc(self) -> Optional[int]:
        return None if self.conda is None else int((self.conda + self.pip) * PYC_SHARE)

    @property
    def env(self) -> Optional[int]:
        """The whole environment: conda, pip and .pyc (the image's env layers, a native prefix)."""
        return None if self.conda is None else self.conda + self.pip + self.pyc

    @property
    def image(self) -> Optional[int]:
        return None if self.env is None else self.env + (self.base or 0)

    @property
    def engine(self) -> Optional[int]:
        """In the engine's storage while it builds: the new layers and its copy of the context."""
        return None if self.env is None else ENGINE_COPIES * self.env

    @property
    def cache(self) -> Optional[int]:
        """In kbundle's cache while building, at the peak: the archives, the package cache, the
        context's copies, the wheels and their installed files, and the .pyc (cached once, linked)."""
        if self.conda is None:
            return None
        copies = int(self.conda * CONTEXT_COPY_SHARE)
        return self.download + self.conda + copies + self.pip_wheels + self.pip + self.pyc

    def describe(self) -> str:
        if self.download is None:
            return "unknown until the environment is solved"
        base = f" (with the base image's {size(self.base)})" if self.base else ""
        return f"about {size(self.image)} for the image{base}, {size(self.cache)} in kbundle's cache while it builds"


def estimate(records, base_size: Optional[int] = None, pip: tuple = ()) -> Needs:
    """Needs from the lock's records (None for an unlocked bundle, or a lock without sizes) and
    the pip section's lines."""
    wheels = PIP_LINE_ALLOWANCE * len(pip)
    if records is None:
        return Needs(None, base_size, wheels)
    sizes = [r.size for r in records]
    return Needs(sum(sizes) if all(sizes) else None, base_size, wheels)


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


def prechecks(needs: Optional[Needs], workdir: Path, engine_root: Optional[Path] = None) -> None:
    """Before the first download: every place run writes is writable, and the cache (and the
    engine's storage, when it is on this machine) has room."""

    from kbundle import activity

    for path, what in places(workdir):
        check_writable(path, what)
    activity.hold(create=True)  # from here on the run writes to the cache: gc must see it working
    if needs is not None:
        check_free(cache_root(), needs.cache, "kbundle's cache")
        if engine_root is not None:
            check_free(engine_root, needs.engine, "the engine's storage")


def check_solved(records, pip: tuple, engine_root: Optional[Path] = None, base_size: Optional[int] = None) -> None:
    """An unlocked bundle's sizes are known once it is solved, before the first package is
    fetched: the same free-space check a lock gets before consent."""
    needs = estimate(records, base_size, pip)
    if needs.download is None:
        return
    check_free(cache_root(), needs.cache, "kbundle's cache")
    if engine_root is not None:
        check_free(engine_root, needs.engine, "the engine's storage")


def engine_root(client) -> Optional[Path]:
    """The engine's storage (`docker info` DockerRootDir) when it is a folder on this machine."""
    try:
        root = Path(client.info().get("DockerRootDir") or "")
    except Exception:  # an engine that does not say: its disk is its own business
        return None
    return root if str(root) not in ("", ".") and root.is_dir() else None


# ----------------------------------------------------------------- a disk that fills anyway

_FULL = re.compile(r"ENOSPC|EDQUOT|no space left|disk quota exceeded|os error (?:28|122)\b", re.IGNORECASE)


def full_disk(exc: BaseException) -> bool:
    """Whether `exc`, or what it was raised from, says a disk or quota filled (any step's
    wording: an OSError, rattler's `os error 28`, pip's or the engine's text)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _FULL.search(str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _filled(exc: BaseException, candidates: list[tuple[Path, str]]) -> str:
    """Where the disk filled, in words: the OSError's own path when it names one, else the
    candidate place whose disk has the least room left now."""
    chain, seen = exc, 0
    while chain is not None and seen < 8:
        if isinstance(chain, OSError) and chain.filename:
            return f"writing {os.fsdecode(chain.filename)}"
        chain, seen = chain.__cause__ or chain.__context__, seen + 1

    def free(place: tuple[Path, str]) -> int:
        try:
            return shutil.disk_usage(existing_ancestor(place[0])).free
        except OSError:
            return 1 << 62

    path, what = min(candidates, key=free)
    return f"{what} {path} is full"


@contextmanager
def disk_truth(candidates: Callable[[], list[tuple[Path, str]]]) -> Iterator[None]:
    """A disk that fills during the block is this machine's limit: exit 4 (MachineError), naming
    the place that filled, whichever step met it and however it worded it (a step that wrapped
    the OSError in a plain KbundleError would otherwise exit 1)."""
    try:
        yield
    except MachineError:
        raise
    except (KbundleError, OSError) as exc:
        if not full_disk(exc):
            raise
        said = re.sub(r"[:;,]\s*free some space.*$", "", first_line(exc))  # said once, below
        raise MachineError(
            f"no space left on device (ENOSPC): {_filled(exc, candidates())} ({said}); "
            "free some space there, or set KBUNDLE_CACHE_DIR to a disk with room"
        ) from None
