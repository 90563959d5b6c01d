"""The limits every bundle keeps: one place, for the writer and every reader.

A reader (`kbundle verify`, `inspect`, `run`) refuses a bundle past any of these as damaged;
`kbundle pack` checks every member against the same numbers before it writes a byte, so pack
never writes what run refuses. docs/format.md lists them in one table.

Only MAIL_LIMIT is advice rather than a rule: pack warns above it, nobody refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# kbundle.json: a few KB (a few hundred for 10,000 members); anything far larger is not one.
MANIFEST_LIMIT = 4 * MIB
# The texts kbundle reads into memory (notebook, Dockerfile, environment, lock), together.
TEXT_BUDGET = 16 * MIB
# What the members may unpack to, together (a recipient may allow more: `run --max-extract`).
DEFAULT_MAX_EXTRACT = 2 * GIB
# zipfile reads the whole central directory and makes an object per entry: bound both.
DIRECTORY_LIMIT = 3 * MIB
MAX_MEMBERS = 10_000  # the members the manifest lists (`files`): all but kbundle.json and kbundle.sig
MEMBER_NAME_LIMIT = 1024  # characters in a member's path
SIGNATURE_LIMIT = 64 * KIB  # kbundle.sig: an ed25519 or RSA-4096 signature with its key is a few KB
# Not a reader's limit: mail servers commonly cap attachments at 20-25 MB, so pack warns above it.
MAIL_LIMIT = 20 * MIB

# A central directory entry is 46 bytes and the name; a zip64 extra field adds at most 28.
_DIRECTORY_ENTRY = 46 + 28


class _Texts(Protocol):
    notebook: str
    dockerfile: str
    environment: str
    lock: str | None


def text_members(manifest: _Texts) -> set[str]:
    """The members TEXT_BUDGET covers: the ones kbundle reads into memory."""
    return {m for m in (manifest.notebook, manifest.dockerfile, manifest.environment, manifest.lock) if m}


def text_size(manifest: _Texts, sizes: Mapping[str, int]) -> int:
    """What the members under TEXT_BUDGET come to, from each member's size."""
    return sum(sizes.get(m, 0) for m in text_members(manifest))


def directory_size(names: Iterable[str]) -> int:
    """At most what the zip's central directory takes for entries with these names."""
    return sum(_DIRECTORY_ENTRY + len(name.encode("utf-8")) for name in names)


def mib(n: int) -> str:
    """A size in MiB, as limit messages print it (`2,048.0 MiB`)."""
    return f"{n / MIB:,.1f} MiB"
