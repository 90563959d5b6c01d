"""The recipient's side of signatures: who signed a bundle, and whether this recipient trusts them.

A bundle's `kbundle.sig` is checked here (`check_member`, which the reader calls): a signature
that does not verify makes the bundle damaged (BundleError, exit 3). A valid one is "trusted"
when the recipient's `allowed_signers` names its key for its identity, and "unknown" otherwise
(`read_signature`); only a trusted one satisfies `kbundle run --require-signature`.

`allowed_signers` is git's format, one line per signer:
`alice@example.com namespaces="kbundle" ssh-ed25519 AAAA…`. It lives in kbundle's config folder
(`platformdirs.user_config_dir("kbundle")`, or `$KBUNDLE_CONFIG_DIR`), so `ssh-keygen -Y verify -f`
(and git, if the user points it there) reads it as it is.

The SSHSIG format itself is bundle/sshsig.py, shared with the sender's side (bundle/signing.py).
This module imports neither the reader nor signing.py, so none of the three imports another in a
circle.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shlex
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kbundle.atomic import write_atomic
from kbundle.bundle.sshsig import (
    IDENTITY,
    MEMBER_LIMIT,
    MEMBER_VERSION,
    NAMESPACE,
    fingerprint_of,
    parse_public_key,
    parse_sshsig,
    signed_message,
    ssh_keygen,
)
from kbundle.display import safe
from kbundle.errors import BundleError, KbundleError, UsageError

ALLOWED_SIGNERS = "allowed_signers"


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

    def trust_command(self) -> str | None:
        """The command that would make this signer trusted (`kbundle trust add IDENTITY KEY`),
        quoted for a shell; None when there is no signer. Both parts were checked when the
        signature was read (an identity without spaces or patterns, `<type> <base64>`)."""
        if not self.identity or not self.public_key:
            return None
        return f"kbundle trust add {shlex.quote(self.identity)} {shlex.quote(self.public_key)}"


@dataclass(frozen=True)
class Signer:
    """A signature that verified: what `open_bundle` keeps, and what trust checks need."""

    identity: str
    public_key: str  # "<type> <base64>"
    fingerprint: str
    armored: str  # the SSHSIG, as ssh-keygen wrote it
    message: bytes  # exactly what was signed


# ------------------------------------------------------------------ reading a bundle's signature


def check_member(raw: bytes, manifest_raw: bytes, content_hash: str) -> Signer:
    """Verify `kbundle.sig` against this manifest and content hash; BundleError when it does not."""
    record = _parse_member(raw)
    blob, namespace = parse_sshsig(record["signature"])
    if namespace != NAMESPACE:
        raise BundleError(f"the bundle's signature is for {safe(namespace, 40)!r}, not for kbundle")
    kind, claimed, _ = _public_key_field(record["public_key"])
    if claimed != blob:
        raise BundleError("the bundle's signature was made by another key than kbundle.sig names")
    message = signed_message(manifest_raw, content_hash, record["identity"])
    with tempfile.TemporaryDirectory(prefix="kbundle-sig-") as tmp:
        sig = Path(tmp) / "kbundle.sig"
        sig.write_text(record["signature"], encoding="ascii")
        proc = ssh_keygen(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sig)], message, timeout=60)
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
    state = "trusted" if is_trusted(signer) else "unknown"
    return Signature(state, signer.identity, signer.fingerprint, signer.public_key)


def verify_with(allowed_signers: Path, signer: Signer) -> bool:
    """`ssh-keygen -Y verify` of the signature against an allowed_signers file, for its identity."""
    with tempfile.TemporaryDirectory(prefix="kbundle-sig-") as tmp:
        sig = Path(tmp) / "kbundle.sig"
        sig.write_text(signer.armored, encoding="ascii")
        args = ["-Y", "verify", "-f", str(allowed_signers), "-I", signer.identity, "-n", NAMESPACE, "-s", str(sig)]
        return ssh_keygen(args, signer.message, timeout=60).returncode == 0


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
    except (ValueError, IndexError, struct.error, binascii.Error):
        raise BundleError("kbundle.sig is malformed: public_key is not an SSH public key") from None


# ------------------------------------------------------------------ allowed_signers


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
