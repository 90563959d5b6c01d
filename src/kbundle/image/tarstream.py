"""The build context as a tar stream that kbundle writes itself, counted as it is sent.

Why not the SDK's own tar: it reads the whole context into a temporary file first, with no
progress, and then uploads it with none; for a 7 GB environment that is minutes of
silence and 7 GB of extra disk. This stream is made while the engine reads it, and every
file's bytes are counted on a Meter (bytes, rate, ETA).

Each entry's header is normalised: owner 0:0, no user or group names, and one fixed time
(contract.CONTEXT_MTIME), so equal files give equal layers whenever and wherever they
are built. Modes are kept. Only files, folders and symbolic links are sent; links are sent
as links, never followed. Hard links are sent as separate files, since each layer folder
is COPYed on its own.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from kbundle import contract
from kbundle.display import safe
from kbundle.errors import KbundleError

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE


def entries(context: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `context`, its lstat) for everything under it, parents before children, sorted."""
    for top, dirnames, filenames in os.walk(context):
        dirnames.sort()
        rel_top = os.path.relpath(top, context)
        names = sorted(dirnames + filenames)
        for name in names:
            full = os.path.join(top, name)
            rel = name if rel_top == "." else f"{rel_top}/{name}".replace(os.sep, "/")
            yield rel, os.lstat(full)


def payload_bytes(context: Path) -> int:
    """The bytes of every regular file: what the Meter counts to."""
    return sum(info.st_size for _, info in entries(context) if stat.S_ISREG(info.st_mode))


def header(rel: str, info: os.stat_result, link: str = "") -> bytes:
    """One entry's tar header (PAX, for long names), normalised as the module says."""
    entry = tarfile.TarInfo(rel)
    entry.mode = stat.S_IMODE(info.st_mode)
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    entry.mtime = contract.CONTEXT_MTIME
    if stat.S_ISDIR(info.st_mode):
        entry.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(info.st_mode):
        entry.type, entry.linkname = tarfile.SYMTYPE, link
    elif stat.S_ISREG(info.st_mode):
        entry.type, entry.size = tarfile.REGTYPE, info.st_size
    else:
        raise KbundleError(
            f"the build context holds {safe(rel)}, which is neither a file, a folder nor a symbolic link"
        )
    return entry.tobuf(tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def stream(context: Path, meter=None, chunk: int = CHUNK) -> Iterator[bytes]:
    """The tar of `context`, piece by piece; `meter.add_bytes` counts each file's bytes as they go."""
    for rel, info in entries(context):
        full = context / rel
        link = os.readlink(full) if stat.S_ISLNK(info.st_mode) else ""
        yield header(rel, info, link)
        if stat.S_ISREG(info.st_mode):
            yield from _body(full, rel, info.st_size, meter, chunk)
    yield b"\0" * (2 * BLOCK)  # the end of the archive


def _body(path: Path, rel: str, expected: int, meter, chunk: int) -> Iterator[bytes]:
    """A file's bytes and the padding to a whole block; exactly the size its header announced."""
    sent = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        while sent < expected:
            data = fh.read(min(chunk, expected - sent))
            if not data:
                break
            sent += len(data)
            if meter is not None:
                meter.add_bytes(len(data))
            yield data
    if sent != expected:
        raise KbundleError(f"{safe(rel)} changed while the build context was being sent")
    yield b"\0" * (-expected % BLOCK)
