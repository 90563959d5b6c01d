"""Write a `.kbundle` zip deterministically and atomically.

Deterministic: members in a fixed order (manifest first, then by path), a fixed
timestamp and fixed permissions, so the same inputs give the same bytes.
Atomic: the zip is written to a temporary file beside the target and renamed over it,
so a failure never leaves a partial bundle and a reader never sees half a file.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from kbundle.atomic import atomic_writer
from kbundle.bundle.format import MANIFEST, SIGNATURE, FileEntry, Manifest, content_hash, sha256_hex

Signer = Callable[[bytes, str], bytes]  # (manifest bytes, content hash) -> the kbundle.sig member

# zip cannot store dates before 1980; any fixed date makes the bytes reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644  # regular file, rw-r--r--


def manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=1, ensure_ascii=False) + "\n").encode()


def seal(manifest: Manifest, members: dict[str, bytes]) -> Manifest:
    """The manifest with one FileEntry per member (sorted by path)."""
    files = [FileEntry(path, sha256_hex(data), len(data)) for path, data in sorted(members.items())]
    return replace(manifest, files=files)


def zip_bytes_to(fileobj, manifest: Manifest, members: dict[str, bytes], signature: bytes | None = None) -> None:
    """The zip: the manifest, the members by path, and last the signature when there is one."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        ordered = [(MANIFEST, manifest_bytes(manifest))] + sorted(members.items())
        ordered += [(SIGNATURE, signature)] if signature is not None else []
        for path, data in ordered:
            info = zipfile.ZipInfo(path, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the mode below is honoured by unzip
            info.external_attr = _FILE_MODE << 16
            zf.writestr(info, data, compresslevel=9)


def write_bundle(target: Path, manifest: Manifest, members: dict[str, bytes], sign: Signer | None = None) -> Manifest:
    """Write `members` plus the sealed manifest to `target`; return the sealed manifest.

    `sign(manifest_bytes, content_hash)` (bundle/signing.py `signer_for`) gives the signature
    member; it runs before anything is written, so a failed signature leaves no bundle."""
    for reserved in (MANIFEST, SIGNATURE):
        if reserved in members:
            raise ValueError(f"{reserved} is reserved for kbundle")
    sealed = seal(manifest, members)
    signature = sign(manifest_bytes(sealed), sealed.content_hash or content_hash(members)) if sign is not None else None
    with atomic_writer(Path(target), fsync=True) as out:
        zip_bytes_to(out, sealed, members, signature)
    return sealed
