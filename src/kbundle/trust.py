"""The recipient's list of senders they trust: an `allowed_signers` file in git's format.

One line per signer: `alice@example.com namespaces="kbundle" ssh-ed25519 AAAA…`. It lives in
kbundle's config folder (`platformdirs.user_config_dir("kbundle")`, or `$KBUNDLE_CONFIG_DIR`),
so `ssh-keygen -Y verify -f` (and git, if the user points it there) reads it as it is.
"""

from __future__ import annotations

import base64
import binascii
import os
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

from kbundle.atomic import write_atomic
from kbundle.bundle.signing import (
    IDENTITY,
    NAMESPACE,
    Signature,
    Signer,
    fingerprint_of,
    parse_public_key,
    verify_with,
)
from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError

ALLOWED_SIGNERS = "allowed_signers"


@dataclass(frozen=True)
class TrustedSigner:
    identity: str  # the principals field, as written
    key_type: str
    fingerprint: str


def config_dir() -> Path:
    override = os.environ.get("KBUNDLE_CONFIG_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("kbundle"))


def allowed_signers_path() -> Path:
    return config_dir() / ALLOWED_SIGNERS


def is_trusted(signer: Signer) -> bool:
    """Whether allowed_signers names this key for this identity (ssh-keygen decides, as git does)."""
    path = allowed_signers_path()
    return path.is_file() and verify_with(path, signer)


def trust_signer(signature: Signature) -> None:
    """Trust on first use: add the signature's key, for its claimed identity, to allowed_signers."""
    if signature.state == "unsigned" or not signature.identity or not signature.public_key:
        raise KbundleError("an unsigned bundle has no signer to trust")
    add_signer(signature.identity, signature.public_key)


def add_signer(identity: str, public_key: str) -> TrustedSigner:
    """Append `identity namespaces="kbundle" <key>` to allowed_signers (atomically; once)."""
    if not IDENTITY.fullmatch(identity):
        raise UsageError(f"identity {safe(identity, 80)!r} must look like you@example.com (no spaces, commas or *)")
    try:
        kind, blob, _ = parse_public_key(public_key)
    except (ValueError, binascii.Error, IndexError, struct.error):
        raise UsageError("the key must be an SSH public key: `ssh-ed25519 AAAA…`, or the path of a .pub file") from None
    entry = TrustedSigner(identity, kind, fingerprint_of(blob))
    path = allowed_signers_path()
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if entry in list_signers():
        return entry
    line = f'{identity} namespaces="{NAMESPACE}" {kind} {base64.b64encode(blob).decode()}\n'
    if current and not current.endswith("\n"):
        current += "\n"
    write_atomic(path, current + line)
    return entry


def list_signers() -> list[TrustedSigner]:
    """Every key allowed_signers names, in file order (lines this reader cannot parse are skipped)."""
    path = allowed_signers_path()
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        entry = _parse_line(line)
        if entry is not None:
            found.append(entry)
    return found


def _parse_line(line: str) -> TrustedSigner | None:
    """`principals [options] keytype base64 [comment]`; options may hold quoted spaces."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    try:
        words = shlex.split(line, posix=True)
    except ValueError:
        words = line.split()
    for i in range(1, min(len(words), 3)):
        try:
            kind, blob, _ = parse_public_key(" ".join(words[i : i + 2]))
        except (ValueError, binascii.Error, IndexError, struct.error):
            continue
        return TrustedSigner(words[0], kind, fingerprint_of(blob))
    return None
