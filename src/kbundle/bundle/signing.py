"""Signing a bundle: the sender's SSH key signs it (`kbundle pack --sign KEY`).

The signature is an SSHSIG (the format `git` and `ssh-keygen -Y` use), made by the real
`ssh-keygen`, with the namespace `kbundle`. It lives in the member `kbundle.sig`, the one member
the manifest does not list (it signs the manifest). The signed message (bundle/sshsig.py
`signed_message`) binds the signer's identity, the content hash and the sha256 of the manifest's
exact bytes.

This module is the sender's side only. Reading a signature and deciding whether the recipient
trusts it is kbundle/trust.py (`check_member`, `read_signature`); both share bundle/sshsig.py,
whose names are importable from here too.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from kbundle.bundle.sshsig import (
    IDENTITY,
    MEMBER_LIMIT,
    MEMBER_VERSION,
    NAMESPACE,
    fingerprint_of,
    key_type_of,
    parse_public_key,
    parse_sshsig,
    signed_message,
    ssh_keygen,
)
from kbundle.display import safe
from kbundle.errors import UsageError, first_line

__all__ = [
    "IDENTITY",
    "MEMBER_LIMIT",
    "NAMESPACE",
    "fingerprint_of",
    "parse_public_key",
    "signed_message",
    "signer_for",
]


# ------------------------------------------------------------------ the sender


def signer_for(key: Path) -> Callable[[bytes, str], bytes]:
    """Check the key now (before any slow step), and return `sign(manifest_raw, content_hash)`
    that gives the bytes of the `kbundle.sig` member."""
    key = Path(key).expanduser()
    if not key.is_file():
        raise UsageError(f"--sign {key}: no such key file")
    identity = _identity_of(key)

    def sign(manifest_raw: bytes, content_hash: str) -> bytes:
        message = signed_message(manifest_raw, content_hash, identity)
        # The message goes on stdin, the key by path: nothing secret is ever in argv.
        proc = ssh_keygen(["-Y", "sign", "-f", str(key), "-n", NAMESPACE], message, timeout=None)
        if proc.returncode != 0:
            raise UsageError(
                f"cannot sign with {key}: {first_line(proc.stderr.decode(errors='replace')) or 'ssh-keygen failed'}"
            )
        armored = proc.stdout.decode("ascii")
        blob, _ = parse_sshsig(armored)
        kind = key_type_of(blob)
        record = {
            "version": MEMBER_VERSION,
            "namespace": NAMESPACE,
            "identity": identity,
            "public_key": f"{kind} {base64.b64encode(blob).decode()}",
            "signature": armored,
        }
        return (json.dumps(record, indent=1) + "\n").encode()

    return sign


def _identity_of(key: Path) -> str:
    """The identity a key signs as: the comment of its public key (`ssh-keygen -C you@example.com`)."""
    pub = key.with_name(key.name + ".pub")
    if pub.is_file():
        text = pub.read_text(encoding="utf-8", errors="replace")
    else:
        proc = ssh_keygen(["-y", "-f", str(key)], b"", timeout=None)
        if proc.returncode != 0:
            raise UsageError(
                f"--sign {key}: not a usable SSH private key ({first_line(proc.stderr.decode(errors='replace'))})"
            )
        text = proc.stdout.decode("utf-8", errors="replace")
    try:
        _, _, comment = parse_public_key(text)
    except ValueError:
        raise UsageError(f"--sign {key}: its public key ({pub.name}) is not an SSH public key") from None
    if not IDENTITY.fullmatch(comment):
        raise UsageError(
            f"--sign {key}: the key's comment {safe(comment, 80)!r} is not an identity like you@example.com; "
            f"set one with: ssh-keygen -c -C you@example.com -f {key}"
        )
    return comment
