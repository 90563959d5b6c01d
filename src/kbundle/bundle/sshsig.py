"""The SSHSIG format and the `ssh-keygen` that makes and checks it: what the sender's side
(bundle/signing.py) and the recipient's side (kbundle/trust.py) share.

It imports neither of them, so signing and trust depend on it and never on each other's
internals (and the reader, which checks a bundle's signature through trust.py, sits above both).

The signed message is `signed_message()`: the signer's identity, the content hash, and the
sha256 of the manifest's exact bytes, so neither a member nor a manifest field (pip pins,
channels, base image, and so the bundle's identity, which is made of them) can change under
a good signature.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import struct
import subprocess

from kbundle.bundle.limits import SIGNATURE_LIMIT
from kbundle.errors import BundleError, KbundleError

NAMESPACE = "kbundle"
MEMBER_VERSION = 1
MEMBER_LIMIT = SIGNATURE_LIMIT  # bundle/limits.py
# What an identity may be: an email-like word. No spaces, commas, quotes or `*`/`?`/`!`, since
# it becomes the principal of an allowed_signers line, where those are list separators or patterns.
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+@-]{0,99}")
_KEY_TYPE = re.compile(r"(ssh|ecdsa|sk)-[a-z0-9@.-]{1,60}")
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"


def signed_message(manifest_raw: bytes, content_hash: str, identity: str) -> bytes:
    """The text the sender signs: binds the identity, the members (content hash) and the manifest."""
    return (
        f"kbundle signature {MEMBER_VERSION}\n"
        f"identity {identity}\n"
        f"content_hash {content_hash}\n"
        f"manifest sha256:{hashlib.sha256(manifest_raw).hexdigest()}\n"
    ).encode()


def fingerprint_of(key_blob: bytes) -> str:
    """`SHA256:…` exactly as `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def parse_public_key(text: str) -> tuple[str, bytes, str]:
    """`<type> <base64> [comment]` → (type, blob, comment); ValueError when it is not one."""
    parts = text.strip().split(None, 2)
    if len(parts) < 2 or not _KEY_TYPE.fullmatch(parts[0]):
        raise ValueError("not an SSH public key")
    blob = base64.b64decode(parts[1], validate=True)
    if ssh_string(blob, 0)[0].decode("ascii", "replace") != parts[0]:
        raise ValueError("the key's type does not match its data")
    return parts[0], blob, parts[2].strip() if len(parts) > 2 else ""


def key_type_of(blob: bytes) -> str:
    """The key type a public key blob starts with (`ssh-ed25519`)."""
    return ssh_string(blob, 0)[0].decode("ascii")


def parse_sshsig(armored: str) -> tuple[bytes, str]:
    """The signer's public key blob and the namespace, from an armored SSHSIG (BundleError when it
    is not one: only a bundle's kbundle.sig, or ssh-keygen's own output, is ever parsed here)."""
    lines = armored.strip().splitlines()
    try:
        if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
            raise ValueError("no armor")
        body = base64.b64decode("".join(lines[1:-1]), validate=True)
        if body[:6] != b"SSHSIG":
            raise ValueError("no magic")
        blob, pos = ssh_string(body, 10)  # after the magic and the uint32 version
        namespace, _ = ssh_string(body, pos)
        ssh_string(blob, 0)
        return blob, namespace.decode("utf-8")
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        raise BundleError("kbundle.sig is malformed: not an SSH signature") from None


def ssh_string(data: bytes, pos: int) -> tuple[bytes, int]:
    """One SSH wire-format string (uint32 length, bytes) at `pos`; the next position."""
    (length,) = struct.unpack_from(">I", data, pos)
    end = pos + 4 + length
    if end > len(data):
        raise ValueError("truncated")
    return data[pos + 4 : end], end


def ssh_keygen(args: list[str], stdin: bytes, *, timeout: float | None) -> subprocess.CompletedProcess:
    """Run the real `ssh-keygen` (nothing secret in argv: messages go on stdin, keys by path)."""
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise KbundleError("ssh-keygen (OpenSSH 8.2 or newer) is needed for signed bundles; install openssh-client")
    try:
        return subprocess.run([exe, *args], input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise KbundleError("ssh-keygen did not answer within a minute") from None
