"""Signed bundles: the sender's SSH key signs the bundle, the recipient checks who signed it.

The signature is an SSHSIG (the format `git` and `ssh-keygen -Y` use), made and checked by
the real `ssh-keygen`, with the namespace `kbundle`. It lives in the member `kbundle.sig`,
the one member the manifest does not list (it signs the manifest). The signed message is
`signed_message()`: the signer's identity, the content hash, and the sha256 of the manifest's
exact bytes, so neither a member nor a manifest field (pip pins, channels, base image) can
change under a good signature.

A signature that does not verify makes the bundle damaged (BundleError, exit 3). A valid
one is "trusted" when the recipient's `allowed_signers` (kbundle/trust.py) names its key
for its identity, and "unknown" otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kbundle.bundle.limits import SIGNATURE_LIMIT
from kbundle.bundle.reader import BundleError
from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError, first_line

NAMESPACE = "kbundle"
MEMBER_VERSION = 1
MEMBER_LIMIT = SIGNATURE_LIMIT  # bundle/limits.py
# What an identity may be: an email-like word. No spaces, commas, quotes or `*`/`?`/`!`, since
# it becomes the principal of an allowed_signers line, where those are list separators or patterns.
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+@-]{0,99}")
_KEY_TYPE = re.compile(r"(ssh|ecdsa|sk)-[a-z0-9@.-]{1,60}")
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"


@dataclass(frozen=True)
class Signature:
    """Who signed a bundle, as the recipient sees it (the interface `run` uses)."""

    state: str  # "unsigned" | "trusted" | "unknown" (valid signature, signer not in allowed_signers)
    identity: str | None  # the signer's claimed identity, from kbundle.sig (e.g. an email)
    fingerprint: str | None  # "SHA256:…" of the signer's key
    public_key: str | None = None  # "ssh-ed25519 AAAA…", so trust_signer can write allowed_signers

    def describe(self) -> str:
        if self.state == "unsigned":
            return "unsigned"
        if self.state == "trusted":
            return f"signed by {safe(self.identity, 100)} ({self.fingerprint})"
        return f"signed by an unknown key {self.fingerprint} (claims {safe(self.identity, 100)})"

    def to_dict(self) -> dict[str, str | None]:
        return {"state": self.state, "identity": self.identity, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Signer:
    """A signature that verified: what `open_bundle` keeps, and what trust checks need."""

    identity: str
    public_key: str  # "<type> <base64>"
    fingerprint: str
    armored: str  # the SSHSIG, as ssh-keygen wrote it
    message: bytes  # exactly what was signed


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
    if _ssh_string(blob, 0)[0].decode("ascii", "replace") != parts[0]:
        raise ValueError("the key's type does not match its data")
    return parts[0], blob, parts[2].strip() if len(parts) > 2 else ""


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
        proc = _ssh_keygen(["-Y", "sign", "-f", str(key), "-n", NAMESPACE], message, timeout=None)
        if proc.returncode != 0:
            raise UsageError(
                f"cannot sign with {key}: {first_line(proc.stderr.decode(errors='replace')) or 'ssh-keygen failed'}"
            )
        armored = proc.stdout.decode("ascii")
        blob, _ = _parse_sshsig(armored)
        kind = _ssh_string(blob, 0)[0].decode("ascii")
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
        proc = _ssh_keygen(["-y", "-f", str(key)], b"", timeout=None)
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


# ------------------------------------------------------------------ the recipient


def check_member(raw: bytes, manifest_raw: bytes, content_hash: str) -> Signer:
    """Verify `kbundle.sig` against this manifest and content hash; BundleError when it does not."""
    record = _parse_member(raw)
    blob, namespace = _parse_sshsig(record["signature"])
    if namespace != NAMESPACE:
        raise BundleError(f"the bundle's signature is for {safe(namespace, 40)!r}, not for kbundle")
    kind, claimed, _ = _public_key_field(record["public_key"])
    if claimed != blob:
        raise BundleError("the bundle's signature was made by another key than kbundle.sig names")
    message = signed_message(manifest_raw, content_hash, record["identity"])
    with tempfile.TemporaryDirectory(prefix="kbundle-sig-") as tmp:
        sig = Path(tmp) / "kbundle.sig"
        sig.write_text(record["signature"], encoding="ascii")
        proc = _ssh_keygen(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig)], message, timeout=60)
    if proc.returncode != 0:
        raise BundleError("the bundle's signature does not match its content (tampered with, or signed by another key)")
    return Signer(
        record["identity"],
        f"{kind} {base64.b64encode(blob).decode()}",
        fingerprint_of(blob),
        record["signature"],
        message,
    )


def read_signature(bundle) -> Signature:
    """Who signed `bundle` (an opened, verified Bundle), and whether this recipient trusts them.

    `open_bundle` already refused a bad signature (BundleError); this adds the trust lookup."""
    signer: Signer | None = getattr(bundle, "signer", None)
    if signer is None:
        return Signature("unsigned", None, None)
    from kbundle.trust import is_trusted

    state = "trusted" if is_trusted(signer) else "unknown"
    return Signature(state, signer.identity, signer.fingerprint, signer.public_key)


def verify_with(allowed_signers: Path, signer: Signer) -> bool:
    """`ssh-keygen -Y verify` of the signature against an allowed_signers file, for its identity."""
    with tempfile.TemporaryDirectory(prefix="kbundle-sig-") as tmp:
        sig = Path(tmp) / "kbundle.sig"
        sig.write_text(signer.armored, encoding="ascii")
        args = ["-Y", "verify", "-f", str(allowed_signers), "-I", signer.identity, "-n", NAMESPACE, "-s", str(sig)]
        return _ssh_keygen(args, signer.message, timeout=60).returncode == 0


def _parse_member(raw: bytes) -> dict:
    if len(raw) > MEMBER_LIMIT:
        raise BundleError("kbundle.sig is too large to be a signature")
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleError("kbundle.sig is not valid JSON") from None
    if (
        not isinstance(record, dict)
        or record.get("version") != MEMBER_VERSION
        or type(record.get("version")) is not int
    ):
        raise BundleError("kbundle.sig is not a kbundle signature this kbundle reads (version 1)")
    for key in ("identity", "public_key", "signature", "namespace"):
        if not isinstance(record.get(key), str) or len(record[key]) > MEMBER_LIMIT:
            raise BundleError(f"kbundle.sig is malformed: {key} must be a string")
    if not IDENTITY.fullmatch(record["identity"]):
        raise BundleError(f"kbundle.sig is malformed: the identity {safe(record['identity'], 80)!r} is not allowed")
    return record


def _public_key_field(text: str) -> tuple[str, bytes, str]:
    try:
        return parse_public_key(text)
    except (ValueError, IndexError, struct.error):
        raise BundleError("kbundle.sig is malformed: public_key is not an SSH public key") from None


def _parse_sshsig(armored: str) -> tuple[bytes, str]:
    """The signer's public key blob and the namespace, from an armored SSHSIG."""
    lines = armored.strip().splitlines()
    try:
        if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
            raise ValueError("no armor")
        body = base64.b64decode("".join(lines[1:-1]), validate=True)
        if body[:6] != b"SSHSIG":
            raise ValueError("no magic")
        blob, pos = _ssh_string(body, 10)  # after the magic and the uint32 version
        namespace, _ = _ssh_string(body, pos)
        _ssh_string(blob, 0)
        return blob, namespace.decode("utf-8")
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        raise BundleError("kbundle.sig is malformed: not an SSH signature") from None


def _ssh_string(data: bytes, pos: int) -> tuple[bytes, int]:
    """One SSH wire-format string (uint32 length, bytes) at `pos`; the next position."""
    (length,) = struct.unpack_from(">I", data, pos)
    end = pos + 4 + length
    if end > len(data):
        raise ValueError("truncated")
    return data[pos + 4 : end], end


def _ssh_keygen(args: list[str], stdin: bytes, *, timeout: float | None) -> subprocess.CompletedProcess:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise KbundleError("ssh-keygen (OpenSSH 8.2 or newer) is needed for signed bundles; install openssh-client")
    try:
        return subprocess.run([exe, *args], input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise KbundleError("ssh-keygen did not answer within a minute") from None
