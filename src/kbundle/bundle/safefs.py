"""Writing below a folder without ever following a link that is already inside it.

Every path below the root is walked one component at a time with `O_NOFOLLOW`, relative to
the open folder above it (`dir_fd`), so a symbolic link planted in a work dir (by a user, an
earlier bundle or another process) is refused instead of followed out of the folder. The
root itself is the user's choice and may be a link. Files appear complete or not at all:
they are written to a temporary name and then linked (never clobbering) or renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from kbundle.errors import KbundleError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW
_CHUNK = 1 << 20


class LinkInTheWay(KbundleError):
    """A symbolic link (or a file where a folder belongs) stands on the path to write."""


@contextmanager
def root(path: Path) -> Iterator[int]:
    """The folder everything is written below, created if needed, as an open descriptor."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, _DIR)
    try:
        yield fd
    finally:
        os.close(fd)


def open_dir(root_fd: int, parts: list[str], *, create: bool, created: list[str] | None = None) -> int | None:
    """The folder `parts` below `root_fd`, never through a link; None when absent and not `create`.

    Folders this call makes are appended to `created` (relative POSIX paths), so a caller can undo."""
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR | _NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if created is not None:
                        created.append("/".join(parts[: i + 1]))
                except FileExistsError:
                    pass  # made meanwhile by someone else: open it like any other
                child = _open_child_dir(fd, parts[: i + 1])
            except OSError as exc:
                _refuse(exc, parts[: i + 1])
            os.close(fd)
            fd = child
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _open_child_dir(fd: int, parts: list[str]) -> int:
    try:
        return os.open(parts[-1], _DIR | _NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        _refuse(exc, parts)
        raise  # unreachable: _refuse always raises


def _refuse(exc: OSError, parts: list[str]) -> None:
    where = "/".join(parts)
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        raise LinkInTheWay(f"refusing to write through {where}: it is a symbolic link or not a folder") from None
    raise exc


@contextmanager
def parent_of(root_fd: int, rel: str, *, create: bool = True, created: list[str] | None = None) -> Iterator[int | None]:
    """The open folder holding `rel` (a relative POSIX path), as `open_dir` finds or makes it."""
    fd = open_dir(root_fd, rel.split("/")[:-1], create=create, created=created)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def kind(dir_fd: int | None, name: str) -> str:
    """ "absent", "file" (a regular file) or "other" (a link, a folder, anything else) — links not followed."""
    if dir_fd is None:
        return "absent"
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return "absent"
    return "file" if stat.S_ISREG(mode) else "other"


def exists(root_fd: int, rel: str) -> bool:
    """Whether anything (a link included) is at `rel`; a link on the way there is refused."""
    with parent_of(root_fd, rel, create=False) as fd:
        return kind(fd, rel.rpartition("/")[2]) != "absent"


def read_file(dir_fd: int | None, name: str, limit: int) -> bytes | None:
    """A regular file's bytes (at most `limit`), never through a link; None when it is not one."""
    if dir_fd is None or kind(dir_fd, name) != "file":
        return None
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit)


def file_sha256(dir_fd: int, name: str) -> str | None:
    """sha256 of a regular file, streamed; "" when absent; None for a link or anything else."""
    found = kind(dir_fd, name)
    if found != "file":
        return "" if found == "absent" else None
    digest = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_file(dir_fd: int, name: str, fill: Callable[[BinaryIO], None], *, replace: bool) -> None:
    """Write `name` in `dir_fd` through `fill(handle)`: complete or not at all.

    `replace=False` never clobbers anything (a link included): it fails with FileExistsError.
    `replace=True` swaps the name over what is there; a link there is replaced, not followed."""
    tmp = f".{name[:40]}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
        if replace:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def write_bytes(root_fd: int, rel: str, data: bytes, *, replace: bool = True) -> None:
    """`data` at `rel` below the root, folders made as needed, no link followed."""
    with parent_of(root_fd, rel) as fd:
        write_file(fd, rel.rpartition("/")[2], lambda out: out.write(data), replace=replace)


def undo(root_fd: int, files: list[str], folders: list[str]) -> None:
    """Remove files and then (empty) folders this process made, after a failure part way."""
    for rel in files:
        _remove(root_fd, rel, os.unlink)
    for rel in reversed(folders):
        _remove(root_fd, rel, os.rmdir)


def _remove(root_fd: int, rel: str, remove) -> None:
    """`remove(name, dir_fd=...)` for `rel` under the root, never following a link; quiet when gone."""
    try:
        with parent_of(root_fd, rel, create=False) as fd:
            if fd is not None:
                remove(rel.rpartition("/")[2], dir_fd=fd)
    except OSError:
        pass
