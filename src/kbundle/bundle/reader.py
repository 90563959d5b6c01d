"""Read, verify and safely extract a `.kbundle` zip, in bounded memory.

Every check happens before any byte is trusted: the size of the zip's directory, the member
names (no absolute paths, no `..`, no backslashes, no links, no duplicates, no encryption,
only stored or deflated data), the manifest against its schema (bundle/schema.py), that the
members are exactly the ones the manifest lists (plus an optional signature), each member's
size and sha256, the content hash, the notebook, and the signature.

Members are streamed: verification hashes each one in chunks and keeps only the few texts
kbundle itself reads (notebook, Dockerfile, environment, lock: at most TEXT_BUDGET together).
Everything else is read again from the zip when extracted, with the same size and hash
check, into a temporary file that only becomes visible once it matched. So `verify`, `inspect`
and `run` stay within a few tens of MB whatever sizes a bundle declares.

Every limit lives in bundle/limits.py, where pack reads the same numbers before it writes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO

from kbundle.bundle import safefs
from kbundle.bundle.format import (
    FORMAT_VERSION,
    MANIFEST,
    SIGNATURE,
    FileEntry,
    Manifest,
    content_hash_of,
    identity_of,
)
from kbundle.bundle.limits import (
    DEFAULT_MAX_EXTRACT,
    DIRECTORY_LIMIT,
    MANIFEST_LIMIT,
    MAX_MEMBERS,
    MEMBER_NAME_LIMIT,
    SIGNATURE_LIMIT,
    TEXT_BUDGET,
    mib,
    text_members,
    text_size,
)
from kbundle.bundle.schema import SchemaError, check_manifest
from kbundle.display import safe
from kbundle.errors import BundleError, KbundleError

if TYPE_CHECKING:
    from kbundle.trust import Signer

__all__ = ["Bundle", "BundleError", "MemberSource", "extract_bundle", "notebook_problem", "open_bundle"]

_CHUNK = 1 << 20
_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # no bzip2/lzma: their decoders can take GBs
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    OSError,
    UnicodeDecodeError,  # a member name that is not the UTF-8 its flag claims
    struct.error,
)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: the manifest, each member's FileEntry, and the few texts kbundle reads."""

    path: Path
    manifest: Manifest
    members: Mapping[str, FileEntry]  # every member but the manifest and the signature
    signer: Signer | None = None  # the verified signature (kbundle/trust.py), or None when unsigned
    max_extract: int = DEFAULT_MAX_EXTRACT
    cached: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    # The manifest's fields, for callers that only want to read them.
    name = property(lambda self: self.manifest.name)
    notebook = property(lambda self: self.manifest.notebook)
    python = property(lambda self: self.manifest.python)
    cuda = property(lambda self: self.manifest.cuda)
    cudnn = property(lambda self: self.manifest.cudnn)
    base_image = property(lambda self: self.manifest.base_image)
    channels = property(lambda self: list(self.manifest.channels))
    dependencies = property(lambda self: list(self.manifest.dependencies))
    pip = property(lambda self: list(self.manifest.pip))
    dropped = property(lambda self: list(self.manifest.dropped))
    locked = property(lambda self: self.manifest.locked)
    includes = property(lambda self: list(self.manifest.includes))
    files = property(lambda self: list(self.manifest.files))

    @property
    def content_hash(self) -> str:
        """The manifest's content hash (verified), or for a bundle sealed without one, computed."""
        return self.manifest.content_hash or content_hash_of({p: e.sha256 for p, e in self.members.items()})

    @functools.cached_property
    def identity(self) -> str:
        """The bundle's identity (bundle/format.py `identity_of`): the content hash and every manifest
        field that defines what is built. What kbundle keys a bundle's images, caches and kernels on,
        since two bundles with the same members may still say different things in their manifests."""
        return identity_of(self.manifest, self.content_hash)

    @property
    def lock_text(self) -> str | None:
        return self.text(self.manifest.lock) if self.manifest.lock else None

    @property
    def dockerfile_text(self) -> str:
        return self.text(self.manifest.dockerfile)

    @property
    def environment_text(self) -> str:
        return self.text(self.manifest.environment)

    def entry(self, member: str) -> FileEntry:
        try:
            return self.members[member]
        except KeyError:
            raise BundleError(f"{self.path.name} has no member '{safe(member, 200)}'") from None

    def read(self, member: str) -> bytes:
        """A member's bytes (checked again against its sha256 when not already in memory).
        For large members, prefer `copy_member` or `extract`, which stream."""
        entry = self.entry(member)
        if member in self.cached:
            return self.cached[member]
        out = io.BytesIO()
        self.copy_member(entry.path, out)
        return out.getvalue()

    def text(self, member: str) -> str:
        try:
            return self.read(member).decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"member '{safe(member, 200)}' is not UTF-8 text") from None

    def copy_member(self, member: str, out: BinaryIO) -> None:
        """Stream a member into `out`; BundleError (after the last byte) when it does not match its
        sha256, so the caller must discard `out` then."""
        with self.reading() as source:
            source.copy(member, out)

    @contextlib.contextmanager
    def reading(self) -> Iterator[MemberSource]:
        """One open zip for many `copy` calls (opened only when a member is not in memory)."""
        source = MemberSource(self)
        try:
            yield source
        finally:
            source.close()

    def extract(
        self, dest: str | os.PathLike, members: list[str] | None = None, limit: int | None = None
    ) -> list[Path]:
        """Write the verified members (or only `members`) under `dest`; return the written paths.

        Refused before anything is written when the members' sizes pass `limit` (default: the
        bundle's max_extract) or a target exists. No existing file is overwritten, no link is
        followed, and a failure part way removes what this call wrote. `dest` is created if needed.
        """
        entries = [self.entry(name) for name in (sorted(self.members) if members is None else members)]
        _check_limit(entries, self.max_extract if limit is None else limit)
        dest = Path(dest)
        with safefs.root(dest) as root:
            for entry in entries:
                if safefs.exists(root, entry.path):
                    raise BundleError(f"refusing to overwrite {dest / entry.path} while extracting {self.path}")
            written: list[str] = []
            made: list[str] = []
            try:
                with self.reading() as source:
                    for entry in entries:
                        _extract_one(root, entry, source, made)
                        written.append(entry.path)
            except BaseException:
                safefs.undo(root, written, made)
                raise
        return [dest.resolve() / rel for rel in written]

    def members_under(self, prefix: str) -> list[str]:
        """The member paths below `prefix` (e.g. `work/`), sorted."""
        return sorted(m for m in self.members if m.startswith(prefix))


def _extract_one(root: int, entry: FileEntry, source: MemberSource, made: list[str]) -> None:
    with safefs.parent_of(root, entry.path, created=made) as folder:
        try:
            safefs.write_file(
                folder, entry.path.rpartition("/")[2], lambda out: source.copy(entry.path, out), replace=False
            )
        except FileExistsError:
            raise BundleError(f"refusing to overwrite {entry.path}: it appeared while extracting") from None


def _check_limit(entries: list[FileEntry], limit: int) -> None:
    total = sum(e.size for e in entries)
    if total > limit:
        raise BundleError(f"the bundle would unpack to {mib(total)}, more than the {mib(limit)} limit")


class MemberSource:
    """Members of a verified bundle, from memory or read again from the zip with the same checks."""

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle
        self._zip: zipfile.ZipFile | None = None

    def copy(self, member: str, out: BinaryIO) -> None:
        entry = self._bundle.entry(member)
        if member in self._bundle.cached:
            out.write(self._bundle.cached[member])
            return
        with _zip_errors(self._bundle.path):
            if self._zip is None:
                _check_directory(self._bundle.path)  # the file may have changed since it was verified
                self._zip = zipfile.ZipFile(self._bundle.path)
            info = self._zip.getinfo(member)
            _check_entry(info)
            _stream(self._zip, info, entry, _writer(out))

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _writer(out: BinaryIO):
    """`out.write`, with a failure to write (a full disk) told apart from a damaged archive."""

    def write(chunk: bytes) -> None:
        try:
            out.write(chunk)
        except OSError as exc:
            raise KbundleError(f"cannot write the bundle's files: {exc.strerror or exc}") from None

    return write


@contextlib.contextmanager
def _zip_errors(path: Path) -> Iterator[None]:
    """Whatever zipfile or zlib raise on a damaged archive becomes one BundleError line."""
    try:
        yield
    except KbundleError:
        raise
    except KeyError:
        raise BundleError(f"{path.name} changed since it was verified (a member is gone)") from None
    except _ZIP_ERRORS as exc:
        raise BundleError(
            f"{path.name} is not a valid bundle: the archive is truncated or corrupt ({safe(exc, 200)})"
        ) from None


def check_member_name(name: str) -> None:
    """Refuse names that could escape the folder they are extracted into."""
    path = PurePosixPath(name)
    bad = (
        not name
        or len(name) > MEMBER_NAME_LIMIT
        or "\\" in name
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("..", ".", "") for part in name.rstrip("/").split("/"))
        or path.is_absolute()
    )
    if bad:
        raise BundleError(f"unsafe member name '{safe(name, 200)}' in bundle")


def _is_link_or_special(info: zipfile.ZipInfo) -> bool:
    # Only unix-made zips set the file-type bits; a plain mode (0o600) is a regular file.
    kind = stat.S_IFMT(info.external_attr >> 16)
    return bool(kind) and kind not in (stat.S_IFREG, stat.S_IFDIR)


def _check_entry(info: zipfile.ZipInfo) -> None:
    if _is_link_or_special(info):
        raise BundleError(f"member '{safe(info.filename, 200)}' is a link or special file")
    if info.flag_bits & 0x1:
        raise BundleError(f"member '{safe(info.filename, 200)}' is encrypted")
    if info.compress_type not in _COMPRESSION:
        raise BundleError(f"member '{safe(info.filename, 200)}' uses a compression kbundle does not read")


def _stream(zf: zipfile.ZipFile, info: zipfile.ZipInfo, entry: FileEntry, sink=None) -> None:
    """Hash a member in chunks, feeding `sink`; stop as soon as it passes its declared size."""
    if info.file_size != entry.size:
        raise BundleError(f"member '{safe(entry.path, 200)}' has size {info.file_size}, the manifest says {entry.size}")
    digest, seen = hashlib.sha256(), 0
    with zf.open(info) as src:
        while chunk := src.read(_CHUNK):
            seen += len(chunk)
            if seen > entry.size:
                raise BundleError(f"member '{safe(entry.path, 200)}' is larger than the manifest says")
            digest.update(chunk)
            if sink is not None:
                sink(chunk)
    if seen != entry.size or digest.hexdigest() != entry.sha256:
        raise BundleError(f"member '{safe(entry.path, 200)}' does not match its sha256 in the manifest (modified?)")


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str) -> bytes:
    if info.file_size > limit:
        raise BundleError(f"{what} is larger than {mib(limit)}")
    with zf.open(info) as src:
        data = src.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{what} is larger than {mib(limit)}")
    return data


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # Two values for one key would let two JSON readers see two different manifests.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        data = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"the manifest is not valid JSON ({safe(exc, 120)})") from None
    if not isinstance(data, dict):
        raise BundleError("the manifest is not a JSON object")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        if type(version) is int and version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this kbundle reads ({FORMAT_VERSION}); upgrade kbundle"
            )
        raise BundleError(
            f"unknown bundle format version {safe(repr(version), 40)} (this kbundle reads {FORMAT_VERSION})"
        )
    try:
        check_manifest(data)
        return Manifest.from_dict(data)
    except (SchemaError, TypeError, ValueError) as exc:
        raise BundleError(f"the manifest is malformed: {safe(exc, 300)}") from None


def _check_directory(path: Path) -> None:
    """Bound the zip's central directory before zipfile reads it all into objects."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        tail = min(size, 22 + 0xFFFF)
        handle.seek(size - tail)
        data = handle.read(tail)
    at = data.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(data):
        return  # no end record: zipfile refuses it as "not a zip file"
    entries, directory_size = struct.unpack_from("<HI", data, at + 10)
    if entries > MAX_MEMBERS + 2 or directory_size > DIRECTORY_LIMIT:
        raise BundleError(f"{path.name} has more members than a bundle may ({MAX_MEMBERS})")


def open_bundle(path: str | os.PathLike, *, max_extract: int = DEFAULT_MAX_EXTRACT) -> Bundle:
    """Open and fully verify a bundle; raise BundleError (one line) if anything is off.

    `max_extract` bounds what the bundle may declare in all (and so what it unpacks to)."""
    path = Path(path)
    if not path.is_file():
        from kbundle.errors import UsageError

        raise UsageError(f"{path} does not exist or is not a file")
    with _zip_errors(path):
        _check_directory(path)
        with zipfile.ZipFile(path) as zf:
            return _open(path, zf, max_extract)


def _open(path: Path, zf: zipfile.ZipFile, max_extract: int) -> Bundle:
    by_name = _entries(path, zf)
    if MANIFEST not in by_name:
        raise BundleError(f"{path.name} is not a kbundle (no {MANIFEST})")
    manifest_raw = _read_capped(zf, by_name.pop(MANIFEST), MANIFEST_LIMIT, "the manifest")
    manifest = _parse_manifest(manifest_raw)
    signature_info = by_name.pop(SIGNATURE, None)
    expected = {f.path: f for f in manifest.files}
    _check_listing(by_name, expected)
    _check_limit(manifest.files, max_extract)
    cached = _verify_members(zf, by_name, manifest)
    computed = content_hash_of({p: e.sha256 for p, e in expected.items()})
    _check_content_hash(manifest, expected, signed=signature_info is not None)
    _check_texts(manifest, cached)
    signer = None
    if signature_info is not None:
        from kbundle.trust import check_member  # late: trust.py's imports load this package

        raw = _read_capped(zf, signature_info, SIGNATURE_LIMIT, "kbundle.sig")
        signer = check_member(raw, manifest_raw, manifest.content_hash or computed)
    _check_identity(manifest, manifest.content_hash or computed)
    return Bundle(path, manifest, MappingProxyType(expected), signer, max_extract, MappingProxyType(cached))


def _entries(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The zip's file entries by name, after the checks on names and kinds."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise BundleError(f"{path.name} has duplicate members")
    for info in infos:
        check_member_name(info.filename)
        _check_entry(info)
    return {i.filename: i for i in infos if not i.is_dir()}


def _check_listing(by_name: Mapping[str, zipfile.ZipInfo], expected: Mapping[str, FileEntry]) -> None:
    extra = sorted(set(by_name) - set(expected))
    if extra:
        raise BundleError(f"member '{safe(extra[0], 200)}' is not listed in the manifest")
    missing = sorted(set(expected) - set(by_name))
    if missing:
        raise BundleError(f"member '{safe(missing[0], 200)}' listed in the manifest is missing")


def _verify_members(
    zf: zipfile.ZipFile, by_name: Mapping[str, zipfile.ZipInfo], manifest: Manifest
) -> dict[str, bytes]:
    """Hash every member in chunks; keep only the texts kbundle reads, within TEXT_BUDGET."""
    texts = text_members(manifest)
    if text_size(manifest, {f.path: f.size for f in manifest.files}) > TEXT_BUDGET:
        raise BundleError(
            f"the notebook, Dockerfile, environment and lock together are more than {mib(TEXT_BUDGET)} "
            "(the sender can pack it again with --strip-outputs)"
        )
    cached: dict[str, bytes] = {}
    for entry in sorted(manifest.files, key=lambda f: f.path):
        if entry.path in texts:
            parts: list[bytes] = []
            _stream(zf, by_name[entry.path], entry, parts.append)
            cached[entry.path] = b"".join(parts)
        else:
            _stream(zf, by_name[entry.path], entry)
    return cached


def _check_content_hash(manifest: Manifest, expected: Mapping[str, FileEntry], *, signed: bool) -> None:
    if not manifest.content_hash:
        return  # sealed without one (kbundle 0.1 allowed it): the per-member hashes still hold
    digests = {p: e.sha256 for p, e in expected.items()}
    if content_hash_of(digests) == manifest.content_hash:
        return
    # Before kbundle 0.2 the hash left out the Dockerfile (its template carried the hash as a
    # LABEL). Such bundles still open; a signed one (0.2 and later only) must use the new rule.
    if not signed and _older_than_0_2(manifest.kbundle_version):
        if content_hash_of(digests, legacy=True) == manifest.content_hash:
            return
    raise BundleError("the manifest's content hash does not match its members")


def _check_identity(manifest: Manifest, content_hash: str) -> None:
    """A manifest that states its identity must state the one its fields and members make. (After
    the signature check: a signed manifest edited by hand is told as a bad signature.)"""
    if manifest.bundle_hash and manifest.bundle_hash != identity_of(manifest, content_hash):
        raise BundleError("the manifest's bundle_hash does not match its fields and members (edited by hand?)")


def _older_than_0_2(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version("0.2")
    except InvalidVersion:
        return False


def _check_texts(manifest: Manifest, cached: Mapping[str, bytes]) -> None:
    """The texts kbundle reads are what they claim: UTF-8, and the notebook a Jupyter notebook."""
    for member in text_members(manifest) - {manifest.notebook}:
        try:
            cached[member].decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"member '{safe(member, 200)}' is not UTF-8 text") from None
    _check_notebook(manifest.notebook, cached[manifest.notebook])


def _check_notebook(member: str, data: bytes) -> None:
    problem = notebook_problem(data)
    if problem:
        raise BundleError(f"the notebook '{safe(member, 200)}' is not a Jupyter notebook ({problem})")


def notebook_problem(data: bytes) -> str | None:
    """Why `data` is not a Jupyter notebook kbundle reads (`not JSON`, `no cells/nbformat`), or None.
    pack asks the same question of the sender's notebook, so it never packs one a reader refuses."""
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "not JSON"
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("cells"), list)
        or type(doc.get("nbformat")) is not int
        or not isinstance(doc.get("metadata", {}), dict)
    ):
        return "no cells/nbformat"
    return None


def extract_bundle(path: str | os.PathLike, dest: str | os.PathLike, members: list[str] | None = None) -> list[Path]:
    """Open and verify the bundle at `path`, then `Bundle.extract` it (see there)."""
    return open_bundle(path).extract(dest, members)
