"""Read, verify and safely extract a `.kbundle` zip.

Every check happens before any byte is trusted: the manifest's format version, the
member names (no absolute paths, no `..`, no backslashes, no links, no duplicates),
that the members are exactly the ones the manifest lists, and each member's size and
sha256. Reads are capped at the size the manifest declares, so a zip bomb stops early.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kbundle.bundle.format import (
    FORMAT_VERSION,
    MANIFEST,
    FileEntry,
    Manifest,
    content_hash,
    sha256_hex,
)
from kbundle.errors import KbundleError

# A manifest is a few KB; anything far larger is not one.
_MANIFEST_LIMIT = 4 * 1024 * 1024


class BundleError(KbundleError):
    """The bundle is damaged, tampered with, or from an unknown format version."""

    exit_code = 3


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, held in memory (bundles are mail-sized)."""

    path: Path
    manifest: Manifest
    members: dict[str, bytes]

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
    def lock_text(self) -> str | None:
        return self.text(self.manifest.lock) if self.manifest.lock else None

    @property
    def dockerfile_text(self) -> str:
        return self.text(self.manifest.dockerfile)

    @property
    def environment_text(self) -> str:
        return self.text(self.manifest.environment)

    def read(self, member: str) -> bytes:
        try:
            return self.members[member]
        except KeyError:
            raise BundleError(f"{self.path.name} has no member {member!r}") from None

    def text(self, member: str) -> str:
        return self.read(member).decode("utf-8")

    def extract(self, dest: str | os.PathLike, members: list[str] | None = None) -> list[Path]:
        """Write the verified members (or only `members`) under `dest`; return the written paths.

        The bytes come from the verification itself, never from a second read of the file.
        `dest` is created if needed. An existing file is never overwritten, and no link is followed.
        """
        wanted = sorted(self.members) if members is None else list(members)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        written: list[Path] = []
        for name in wanted:
            data = self.read(name)
            target = (root / name).resolve()
            if root != target and root not in target.parents:
                raise BundleError(f"member {name!r} would be written outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: never clobber, never follow a link planted at the target.
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                raise BundleError(f"refusing to overwrite {target} while extracting {self.path}") from None
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            written.append(target)
        return written

    def members_under(self, prefix: str) -> list[str]:
        """The member paths below `prefix` (e.g. `work/`), sorted."""
        return sorted(m for m in self.members if m.startswith(prefix))


def check_member_name(name: str) -> None:
    """Refuse names that could escape the folder they are extracted into."""
    path = PurePosixPath(name)
    bad = (
        not name
        or "\\" in name
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("..", ".", "") for part in name.rstrip("/").split("/"))
        or path.is_absolute()
    )
    if bad:
        raise BundleError(f"unsafe member name {name!r} in bundle")


def _is_link_or_special(info: zipfile.ZipInfo) -> bool:
    # Only unix-made zips set the file-type bits; a plain mode (0o600) is a regular file.
    kind = stat.S_IFMT(info.external_attr >> 16)
    return bool(kind) and kind not in (stat.S_IFREG, stat.S_IFDIR)


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    with zf.open(info) as src:
        data = src.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"member {info.filename!r} is larger than the manifest says")
    return data


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"the manifest is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BundleError("the manifest is not a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {version} is newer than this kbundle reads ({FORMAT_VERSION}); upgrade kbundle"
            )
        raise BundleError(f"unknown bundle format version {version!r} (this kbundle reads {FORMAT_VERSION})")
    try:
        return Manifest.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"the manifest is malformed: {exc}") from None


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Open and fully verify a bundle; raise BundleError (one line) if anything is off."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path} does not exist or is not a file")
    try:
        with zipfile.ZipFile(path) as zf:
            return _open(path, zf)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path.name} is not a valid bundle: the archive is truncated or corrupt ({exc})") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError, OSError) as exc:
        if isinstance(exc, KbundleError):
            raise
        raise BundleError(f"{path.name} is not a valid bundle: the archive is truncated or corrupt ({exc})") from None


def _open(path: Path, zf: zipfile.ZipFile) -> Bundle:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise BundleError(f"{path.name} has duplicate members")
    for info in infos:
        check_member_name(info.filename)
        if _is_link_or_special(info):
            raise BundleError(f"member {info.filename!r} is a link or special file")
    by_name = {i.filename: i for i in infos if not i.is_dir()}
    if MANIFEST not in by_name:
        raise BundleError(f"{path.name} is not a kbundle (no {MANIFEST})")
    manifest = _parse_manifest(_read_capped(zf, by_name.pop(MANIFEST), _MANIFEST_LIMIT))
    expected = {f.path: f for f in manifest.files}
    for entry in manifest.files:
        check_member_name(entry.path)
    extra = sorted(set(by_name) - set(expected))
    if extra:
        raise BundleError(f"member {extra[0]!r} is not listed in the manifest")
    missing = sorted(set(expected) - set(by_name))
    if missing:
        raise BundleError(f"member {missing[0]!r} listed in the manifest is missing")
    members = {name: _verified(zf, by_name[name], expected[name]) for name in sorted(expected)}
    if manifest.content_hash and content_hash(members) != manifest.content_hash:
        raise BundleError("the manifest's content hash does not match its members")
    for needed in (manifest.notebook, manifest.dockerfile, manifest.environment, manifest.lock):
        if needed and needed not in members:
            raise BundleError(f"the manifest names {needed!r}, which is not in the bundle")
    return Bundle(path=path, manifest=manifest, members=members)


def _verified(zf: zipfile.ZipFile, info: zipfile.ZipInfo, entry: FileEntry) -> bytes:
    if info.file_size != entry.size:
        raise BundleError(f"member {entry.path!r} has size {info.file_size}, the manifest says {entry.size}")
    data = _read_capped(zf, info, entry.size)
    if len(data) != entry.size or sha256_hex(data) != entry.sha256:
        raise BundleError(f"member {entry.path!r} does not match its sha256 in the manifest (modified?)")
    return data


def extract_bundle(path: str | os.PathLike, dest: str | os.PathLike, members: list[str] | None = None) -> list[Path]:
    """Open and verify the bundle at `path`, then `Bundle.extract` it (see there)."""
    return open_bundle(path).extract(dest, members)
