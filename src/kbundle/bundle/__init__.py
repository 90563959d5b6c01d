"""The `.kbundle` archive: write it deterministically and atomically, read it, verify it,
extract it safely. docs/format.md describes the format itself.

Public API (other stages use only these):

``open_bundle(path, *, max_extract=2 GiB) -> Bundle``
    Opens and fully verifies a bundle, streaming it in bounded memory (the zip's directory,
    safe member names, no links, the manifest's schema, every member's size and sha256, the
    content hash, the notebook, the signature when there is one, the stated identity). Raises
    ``BundleError`` (kbundle.errors; a ``KbundleError``, exit 3, so the CLI prints one ``error:``
    line) when anything is off.
    ``Bundle`` is a frozen dataclass holding ``path``, ``manifest`` (a ``Manifest``),
    ``members`` (a read-only mapping name -> ``FileEntry``), ``signer`` (the verified
    signature or None; ``kbundle.trust.read_signature(bundle)`` says who and whether trusted) and
    ``max_extract``, with read-only shortcuts for the manifest fields: ``name``, ``notebook``
    (member path, e.g. ``work/nb.ipynb``), ``python``, ``cuda``, ``cudnn``, ``base_image``,
    ``channels``, ``dependencies`` (normalised conda specs), ``pip`` (exact pins, in install
    order), ``dropped``, ``locked``, ``includes`` (member paths under ``work/``), ``files``,
    ``content_hash`` (the members only), ``identity`` (the bundle's identity: the content hash and
    the manifest fields that define what is built; what kbundle keys a bundle's images, caches and
    kernels on; ``format.identity_of``); and the texts ``lock_text`` (rattler lock file, or None),
    ``dockerfile_text``, ``environment_text`` (normalised environment.yml), which stay in
    memory. ``bundle.read(member)`` and ``bundle.text(member)`` give any member (read again
    from the zip, with the hash check, when it is not one of those texts);
    ``bundle.copy_member(member, fileobj)`` streams one.

``Bundle.extract(dest, members=None, limit=None)`` / ``extract_bundle(path, dest, members=None) -> list[Path]``
    Writes the bundle's members (or only ``members``) under ``dest``: refused before anything is
    written when their sizes pass ``limit`` (default ``max_extract``) or a target exists; never
    follows a link already in ``dest``; each file appears only once its sha256 matched. Returns
    the written paths.

``write_bundle(target, manifest, members, sign=None, *, check=False) -> Manifest``
    Writes ``members`` (``dict[str, bytes]``) plus the sealed manifest, atomically and
    byte-for-byte reproducibly; with ``sign`` (``signing.signer_for(key)``) also the signature
    member ``kbundle.sig``. Returns the manifest with its ``files`` and ``bundle_hash`` filled in. With ``check``
    (pack's way), ``writer.OverLimit`` before anything is written when a reader would refuse the
    bundle: the limits of ``kbundle.bundle.limits`` (shared with the reader), the schema, the notebook.

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
from kbundle.bundle.reader import Bundle, extract_bundle, open_bundle
from kbundle.bundle.writer import write_bundle
from kbundle.errors import BundleError  # defined there; kept here for older call sites

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
