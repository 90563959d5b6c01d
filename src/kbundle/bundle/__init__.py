"""The `.kbundle` archive: write it deterministically and atomically, read it, verify it,
extract it safely. docs/format.md describes the format itself.

Public API (other stages use only these):

``open_bundle(path) -> Bundle``
    Opens and fully verifies a bundle (format version, safe member names, no links,
    every member's size and sha256, the content hash). Raises ``BundleError`` (a
    ``KbundleError``, so the CLI prints one ``error:`` line) when anything is off.
    ``Bundle`` is a frozen dataclass holding ``path``, ``manifest`` (a ``Manifest``)
    and ``members`` (``dict[str, bytes]``), with read-only shortcuts for the manifest
    fields: ``name``, ``notebook`` (member path, e.g. ``work/nb.ipynb``), ``python``,
    ``cuda``, ``cudnn``, ``base_image``, ``channels``, ``dependencies`` (normalised conda
    specs), ``pip`` (exact pins, in install order), ``dropped``, ``locked``,
    ``includes`` (member paths under ``work/``), ``files``; and the texts
    ``lock_text`` (rattler lock file, or None), ``dockerfile_text``,
    ``environment_text`` (normalised environment.yml). ``bundle.read(member)`` and
    ``bundle.text(member)`` give any member. ``bundle.manifest.cuda_runtime_in_env``
    says whether the environment carries its own CUDA runtime;
    ``bundle.manifest.content_hash`` identifies the bundle's content.

``extract_bundle(path, dest, members=None) -> list[Path]``
    Verifies the bundle, then writes its members (or only ``members``) under ``dest``,
    refusing to overwrite any existing file or to write outside ``dest``. Returns the
    written paths.

``write_bundle(target, manifest, members) -> Manifest``
    Writes ``members`` (``dict[str, bytes]``) plus the sealed manifest, atomically and
    byte-for-byte reproducibly. Returns the manifest with its ``files`` filled in.

``Manifest``, ``FileEntry``, ``Dropped``, ``Added``, ``Variant``: the typed records.
``FORMAT_VERSION`` and the member-name constants live in ``kbundle.bundle.format``.
"""

from kbundle.bundle.format import (
    FORMAT_VERSION,
    Added,
    Dropped,
    FileEntry,
    Manifest,
    Variant,
    content_hash,
)
from kbundle.bundle.reader import Bundle, BundleError, extract_bundle, open_bundle
from kbundle.bundle.writer import write_bundle

__all__ = [
    "FORMAT_VERSION",
    "Added",
    "Bundle",
    "BundleError",
    "Dropped",
    "FileEntry",
    "Manifest",
    "Variant",
    "content_hash",
    "extract_bundle",
    "open_bundle",
    "write_bundle",
]
