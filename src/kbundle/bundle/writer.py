"""Write a `.kbundle` zip deterministically and atomically.

Deterministic: members in a fixed order (manifest first, then by path), a fixed
timestamp and fixed permissions, so the same inputs give the same bytes.
Atomic: the zip is written to a temporary file beside the target and renamed over it,
so a failure never leaves a partial bundle and a reader never sees half a file.
Readable: with `check=True` (as pack writes), the bundle is checked against every limit and rule
a reader enforces (bundle/limits.py, the manifest's schema) before anything is signed or
written, so nothing pack writes is refused later. Without it the writer writes what it is given:
the reader's tests craft damaged bundles with it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from kbundle.atomic import atomic_writer
from kbundle.bundle import limits
from kbundle.bundle.format import (
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Manifest,
    content_hash,
    content_hash_of,
    identity_of,
    sha256_hex,
)
from kbundle.bundle.reader import notebook_problem
from kbundle.bundle.schema import SchemaError, check_manifest, member_path
from kbundle.display import safe
from kbundle.errors import KbundleError

Signer = Callable[[bytes, str], bytes]  # (manifest bytes, content hash) -> the kbundle.sig member

# zip cannot store dates before 1980; any fixed date makes the bytes reproducible.
_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644  # regular file, rw-r--r--


class OverLimit(KbundleError):
    """The bundle about to be written breaks a limit or rule that every reader enforces:
    nothing is written (kbundle verify, inspect and run would refuse it as damaged)."""


def manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=1, ensure_ascii=False) + "\n").encode()


def seal(manifest: Manifest, members: dict[str, bytes]) -> Manifest:
    """The manifest with one FileEntry per member (sorted by path) and its identity (`bundle_hash`),
    made from the content hash it states (or, sealed without one, the members' own)."""
    files = [FileEntry(path, sha256_hex(data), len(data)) for path, data in sorted(members.items())]
    digests = {entry.path: entry.sha256 for entry in files}
    identity = identity_of(manifest, manifest.content_hash or content_hash_of(digests))
    return replace(manifest, files=files, bundle_hash=identity)


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


def check_writable(manifest: Manifest, members: dict[str, bytes]) -> None:
    """Raise OverLimit unless a reader accepts this bundle: the member count and names, their
    sizes (in all, and the texts kbundle reads), the manifest's size and schema, the zip's
    directory (room left for a signature), the content hash. `manifest` is the sealed one (`seal`)."""
    if len(members) > limits.MAX_MEMBERS:
        raise OverLimit(
            f"the bundle would hold {len(members):,} files, more than the {limits.MAX_MEMBERS:,} a bundle may hold"
        )
    for name in members:
        try:
            member_path(name, f"the member name '{safe(name, 200)}'")
        except SchemaError as exc:
            raise OverLimit(f"cannot write this bundle: {exc}") from None
    total = sum(len(data) for data in members.values())
    if total > limits.DEFAULT_MAX_EXTRACT:
        raise OverLimit(
            f"the bundle would unpack to {limits.mib(total)}, more than the {limits.mib(limits.DEFAULT_MAX_EXTRACT)} "
            "limit of kbundle verify and run"
        )
    sizes = {name: len(data) for name, data in members.items()}
    texts = limits.text_size(manifest, sizes)
    if texts > limits.TEXT_BUDGET:
        raise OverLimit(
            f"the notebook, Dockerfile, environment and lock together would be {limits.mib(texts)}, "
            f"more than the {limits.mib(limits.TEXT_BUDGET)} kbundle verify and run read"
        )
    for text in limits.text_members(manifest) - {manifest.notebook}:
        try:
            members[text].decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            raise OverLimit(f"cannot write this bundle: member '{safe(text, 200)}' is missing or not UTF-8") from None
    problem = notebook_problem(members.get(manifest.notebook, b""))
    if problem:
        raise OverLimit(f"cannot write this bundle: its notebook is not a Jupyter notebook ({problem})")
    raw = manifest_bytes(manifest)
    if len(raw) > limits.MANIFEST_LIMIT:
        raise OverLimit(
            f"the bundle's manifest would be {limits.mib(len(raw))}, more than the {limits.mib(limits.MANIFEST_LIMIT)} "
            "a reader accepts (too many files, or names too long)"
        )
    names = [MANIFEST, SIGNATURE, *members]
    if limits.directory_size(names) > limits.DIRECTORY_LIMIT:
        raise OverLimit(
            f"the zip's directory would pass {limits.mib(limits.DIRECTORY_LIMIT)}: "
            f"{len(members):,} files with names too long for one bundle"
        )
    try:
        check_manifest(manifest.to_dict())
    except SchemaError as exc:
        raise OverLimit(f"cannot write this bundle: the manifest would be malformed ({exc})") from None
    if manifest.content_hash and manifest.content_hash != content_hash_of({f.path: f.sha256 for f in manifest.files}):
        raise OverLimit("cannot write this bundle: its content hash does not match its members")


def write_bundle(
    target: Path, manifest: Manifest, members: dict[str, bytes], sign: Signer | None = None, *, check: bool = False
) -> Manifest:
    """Write `members` plus the sealed manifest to `target`; return the sealed manifest.

    `sign(manifest_bytes, content_hash)` (bundle/signing.py `signer_for`) gives the signature
    member; it runs before anything is written, so a failed signature leaves no bundle.
    With `check`, OverLimit (`check_writable`) before anything is signed or written when a reader
    would refuse the bundle."""
    for reserved in (MANIFEST, SIGNATURE):
        if reserved in members:
            raise ValueError(f"{reserved} is reserved for kbundle")
    sealed = seal(manifest, members)
    if check:
        check_writable(sealed, members)
    signature = sign(manifest_bytes(sealed), sealed.content_hash or content_hash(members)) if sign is not None else None
    if check and signature is not None and len(signature) > limits.SIGNATURE_LIMIT:
        raise OverLimit(
            f"the signature is {len(signature):,} bytes, more than the {limits.SIGNATURE_LIMIT:,} a reader accepts"
        )
    with atomic_writer(Path(target), fsync=True) as out:
        zip_bytes_to(out, sealed, members, signature)
    return sealed
