"""The `.kbundle` format: member names, the manifest record and its JSON form.

See docs/format.md for the full description. This module only knows the shape of the
data; writer.py and reader.py move bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "kbundle.json"
# The sender's signature (bundle/signing.py): the one member the manifest does not list,
# since it signs the manifest itself.
SIGNATURE = "kbundle.sig"
DOCKERFILE = "Dockerfile"
ENVIRONMENT = "env/environment.yml"
LOCK = "env/rattler.lock"
ORIGINAL_DIR = "env/original/"
WORK_DIR = "work/"


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Dropped:
    spec: str
    reason: str


@dataclass(frozen=True)
class Added:
    spec: str
    reason: str


@dataclass(frozen=True)
class Changed:
    """An input line the bundle carries in another form (`libgfortran=5.0.0.dev0` -> `libgfortran`)."""

    spec: str
    to: str
    reason: str


@dataclass(frozen=True)
class Variant:
    package: str
    spec: str
    intent: str


@dataclass
class Manifest:
    """Everything `run` needs to rebuild the environment, plus each member's hash."""

    name: str
    notebook: str
    python: str | None
    cuda: str | None
    cudnn: str | None
    cuda_runtime_in_env: bool
    base_image: str
    base_image_reason: str
    channels: list[str]
    dependencies: list[str]
    pip: list[str]
    dropped: list[Dropped] = field(default_factory=list)
    # The pip: section's indexes ({index_url, extra_index_urls, find_links}) and whether every
    # pip line is an exact pin with its wheel's hash (pack resolved it with pip's resolver).
    pip_indexes: dict[str, Any] = field(
        default_factory=lambda: {"index_url": None, "extra_index_urls": [], "find_links": []}
    )
    pip_locked: bool = False
    cuda_env_libs: bool = False  # the env's lib/ holds CUDA libraries a pip framework must find
    require_cuda: str | None = None  # NVIDIA_REQUIRE_CUDA, when the env needs less than the base image has
    channel_urls: list[str] = field(default_factory=list)
    added: list[Added] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)  # added in 0.2: older bundles read as []
    locked: bool = False
    lock: str | None = None
    # The image's virtual packages (`__glibc=2.35`, `__cuda=11.8`, ...): what the lock was
    # solved for, and what an unlocked bundle is solved for on the recipient's machine.
    virtual_packages: list[str] = field(default_factory=list)
    lock_note: str | None = None
    environment: str = ENVIRONMENT
    original_environment: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    dockerfile: str = DOCKERFILE
    includes: list[str] = field(default_factory=list)
    content_hash: str = ""
    # The bundle's identity (`identity_of`): the content hash and the fields that define what is
    # built. Bundles written before it existed read without it: the reader works it out the same way.
    bundle_hash: str = ""
    files: list[FileEntry] = field(default_factory=list)
    platform: str = "linux-64"
    kbundle_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        # The public JSON groups conda's channels and dependencies the way environment.yml does.
        raw["conda"] = {"channels": raw.pop("channels"), "dependencies": raw.pop("dependencies")}
        ordered = {"format_version": raw.pop("format_version")}
        ordered.update(raw)
        return ordered

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        data = dict(raw)
        conda = data.pop("conda", None) or {}
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        if "virtual_packages" not in data and data.get("lock_virtual_packages"):
            kwargs["virtual_packages"] = data["lock_virtual_packages"]  # its name in kbundle 0.1
        kwargs["channels"] = list(conda.get("channels") or [])
        kwargs["dependencies"] = list(conda.get("dependencies") or [])
        for key, record in (
            ("dropped", Dropped),
            ("added", Added),
            ("variants", Variant),
            ("changed", Changed),
            ("files", FileEntry),
        ):
            kwargs[key] = [_record(record, d) for d in kwargs.get(key) or []]
        return cls(**kwargs)


def _record(cls, raw: dict[str, Any]):
    # Fields may be added within a format version: ignore the ones this reader does not know.
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {raw!r}")
    return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Members outside the content hash: the manifest holds the hash, the signature signs it.
_NOT_CONTENT = (MANIFEST, SIGNATURE)


def content_hash(members: Mapping[str, bytes]) -> str:
    """One hash over every member that changes what is built: all but the manifest and the signature."""
    return content_hash_of({path: sha256_hex(data) for path, data in members.items()})


def content_hash_of(digests: Mapping[str, str], *, legacy: bool = False) -> str:
    """The content hash from each member's sha256 (hex), so a reader never holds the members.

    `legacy` is the rule kbundle before 0.2 used: it also left out the Dockerfile, whose
    template carried the hash as a LABEL. Readers accept it only for bundles that old.
    """
    skipped = _NOT_CONTENT + ((DOCKERFILE,) if legacy else ())
    lines = "".join(f"{digest}  {path}\n" for path, digest in sorted(digests.items()) if path not in skipped)
    return sha256_hex(lines.encode())


# ------------------------------------------------------------------ the bundle's identity

# The manifest fields that decide what `run` builds and how the kernel runs: the conda side
# (specs, channels, lock, the virtual packages an unlocked solve targets), the pip side (lines,
# indexes, whether locked), the base image and CUDA (which also render the Dockerfile), the
# Python version, and where the notebook and the environment are. Two bundles that differ in
# any of them are two bundles, whatever their members.
IDENTITY_FIELDS = (
    "format_version",
    "name",
    "notebook",
    "includes",
    "python",
    "cuda",
    "cudnn",
    "cuda_runtime_in_env",
    "cuda_env_libs",
    "require_cuda",
    "base_image",
    "channels",
    "dependencies",
    "channel_urls",
    "pip",
    "pip_indexes",
    "pip_locked",
    "locked",
    "lock",
    "virtual_packages",
    "environment",
    "dockerfile",
    "platform",
    "kbundle_version",
)
# Left out, and why: text and records shown to people only (why a base, what normalisation did,
# where the environment came from, the original file's member path); `files`, which the content
# hash covers; the two hashes themselves. A field added to Manifest must join one of the two lists
# (tests/bundle/test_identity.py holds it).
NOT_IDENTITY = (
    "base_image_reason",
    "dropped",
    "added",
    "changed",
    "variants",
    "lock_note",
    "source",
    "original_environment",
    "files",
    "content_hash",
    "bundle_hash",
)
IDENTITY_VERSION = 1


def identity_of(manifest: Manifest, content_hash: str) -> str:
    """The bundle's identity: sha256 (hex) over its content hash and its IDENTITY_FIELDS.

    Everything kbundle keys on a bundle (the image's label, the recorded pip resolution, the
    kernel's record, the native prefix) uses it, so a copy with the same members and another
    manifest (a stranger's pip section, say) shares nothing with the original. A field at its
    default value is left out, so a field that joins IDENTITY_FIELDS later does not change the
    identity of bundles that never set it. The JSON is canonical: sorted keys, ASCII only."""
    defaults = _defaults()
    chosen = {}
    for name in IDENTITY_FIELDS:
        value = getattr(manifest, name)
        if name in defaults and value == defaults[name]:
            continue
        chosen[name] = value
    doc = {"kbundle identity": IDENTITY_VERSION, "content_hash": content_hash, "fields": chosen}
    return sha256_hex(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())


def _defaults() -> dict[str, Any]:
    """Each Manifest field's default (fields without one are always part of the identity)."""
    out = {}
    for spec in fields(Manifest):
        if spec.default is not MISSING:
            out[spec.name] = spec.default
        elif spec.default_factory is not MISSING:
            out[spec.name] = spec.default_factory()
    return out
