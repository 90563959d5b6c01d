"""Write a `.kbundle` zip deterministically and atomically.

Deterministic: members in a fixed order (manifest first, then by path), a fixed
timestamp and fixed permissions, so the same inputs give the same bytes.
Atomic: the zip is written to a temporary file beside the target and renamed over it,
so a failure never leaves a partial bundle and a reader never sees half a file.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

from kbundle.atomic import atomic_writer
from kbundle.bundle.format import MANIFEST, FileEntry, Manifest, sha256_hex

# zip cannot store dates before 1980; any fixed date makes the bytes reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644  # regular file, rw-r--r--


def manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=1, ensure_ascii=False) + "\n").encode()


def seal(manifest: Manifest, members: dict[str, bytes]) -> Manifest:
    """The manifest with one FileEntry per member (sorted by path)."""
    files = [FileEntry(path, sha256_hex(data), len(data)) for path, data in sorted(members.items())]
    return replace(manifest, files=files)


def zip_bytes_to(fileobj, manifest: Manifest, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        ordered = [(MANIFEST, manifest_bytes(manifest))] + sorted(members.items())
        for path, data in ordered:
            info = zipfile.ZipInfo(path, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the mode below is honoured by unzip
            info.external_attr = _FILE_MODE << 16
            zf.writestr(info, data, compresslevel=9)


def write_bundle(target: Path, manifest: Manifest, members: dict[str, bytes]) -> Manifest:
    """Write `members` plus the sealed manifest to `target`; return the sealed manifest."""
    if MANIFEST in members:
        raise ValueError(f"{MANIFEST} is reserved for the manifest")
    sealed = seal(manifest, members)
    with atomic_writer(Path(target), fsync=True) as out:
        zip_bytes_to(out, sealed, members)
    return sealed
