"""Signed bundles with the real ssh-keygen and real ed25519 keys: round trips, `ssh-keygen -Y
verify` accepting kbundle's signature as it is, tampering, wrong keys, unknown signers, and
the recipient's allowed_signers through `kbundle trust`."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from bundlekit import edit_manifest, good_bundle, make_key, members, rewrite, sealed

from helpers import assert_one_error_line, kbundle, notebook
from kbundle.bundle import BundleError, open_bundle
from kbundle.bundle.format import MANIFEST, SIGNATURE
from kbundle.bundle.signing import signed_message, signer_for
from kbundle.errors import UsageError
from kbundle.trust import Signature, allowed_signers_path, list_signers, read_signature, trust_signer


@pytest.fixture(autouse=True)
def config(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv("KBUNDLE_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def alice(tmp_path) -> Path:
    return make_key(tmp_path, "alice@example.com", "alice")


@pytest.fixture
def signed(tmp_path, alice) -> Path:
    return good_bundle(tmp_path / "signed.kbundle", sign=signer_for(alice))


def _sig_record(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read(SIGNATURE))


def test_a_signed_bundle_round_trips(signed, alice):
    opened = open_bundle(signed)
    fingerprint = subprocess.run(["ssh-keygen", "-lf", f"{alice}.pub"], capture_output=True, text=True).stdout.split()[
        1
    ]
    signature = read_signature(opened)
    assert signature == Signature("unknown", "alice@example.com", fingerprint, signature.public_key)
    assert signature.describe() == f"signed by an unknown key {fingerprint} (claims alice@example.com)"
    trust_signer(signature)
    trusted = read_signature(open_bundle(signed))
    assert trusted.state == "trusted" and trusted.describe() == f"signed by alice@example.com ({fingerprint})"
    assert [s.identity for s in list_signers()] == ["alice@example.com"]
    line = allowed_signers_path().read_text()
    assert line.startswith('alice@example.com namespaces="kbundle" ssh-ed25519 AAAA') and line.count("\n") == 1


def test_an_unsigned_bundle_says_so(tmp_path):
    signature = read_signature(open_bundle(good_bundle(tmp_path / "u.kbundle")))
    assert signature == Signature("unsigned", None, None) and signature.describe() == "unsigned"
    with pytest.raises(Exception, match="unsigned"):
        trust_signer(signature)


def test_ssh_keygen_verify_accepts_the_signature_as_it_is(signed, alice, tmp_path):
    """The signature member is plain SSHSIG: git's allowed_signers and `ssh-keygen -Y verify` check it."""
    record = _sig_record(signed)
    (tmp_path / "bundle.sig").write_text(record["signature"])
    allowed = tmp_path / "allowed_signers"
    key_type, key_data = Path(f"{alice}.pub").read_text().split()[:2]
    allowed.write_text(f'alice@example.com namespaces="kbundle" {key_type} {key_data}\n')
    with zipfile.ZipFile(signed) as zf:
        message = signed_message(zf.read(MANIFEST), open_bundle(signed).manifest.content_hash, "alice@example.com")
    verify = ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "alice@example.com", "-n", "kbundle"]
    ok = subprocess.run([*verify, "-s", str(tmp_path / "bundle.sig")], input=message, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    assert b"Good" in ok.stdout + ok.stderr
    other = subprocess.run([*verify, "-s", str(tmp_path / "bundle.sig")], input=message + b"x", capture_output=True)
    assert other.returncode != 0


def test_a_tampered_member_with_a_resealed_manifest_breaks_the_signature(signed, tmp_path):
    """The tamperer reseals files[] and the content hash, but cannot re-sign as the sender."""
    changed = {**members(), "env/environment.yml": b"dependencies: [python=3.11, ipykernel, evil]\n"}
    resealed = sealed(tmp_path / "resealed.kbundle", changed)
    with zipfile.ZipFile(signed) as zf:
        sig = zf.read(SIGNATURE)
    with zipfile.ZipFile(resealed, "a") as zf:
        zf.writestr(SIGNATURE, sig)
    with pytest.raises(BundleError, match="signature does not match"):
        open_bundle(resealed)
    assert_one_error_line(kbundle("verify", resealed), "signature")


def test_a_tampered_manifest_field_breaks_the_signature(signed, tmp_path):
    """Manifest fields (pip pins, base image) are signed too, not only the members."""

    def evil(doc: dict) -> None:
        doc["pip"] = ["evil==1.0"]

    with pytest.raises(BundleError, match="signature does not match"):
        open_bundle(edit_manifest(signed, tmp_path / "evil.kbundle", evil))


def test_a_swapped_identity_breaks_the_signature(signed, tmp_path):
    def swap(name: str, data: bytes) -> bytes:
        if name != SIGNATURE:
            return data
        record = json.loads(data)
        record["identity"] = "bob@example.com"
        return json.dumps(record).encode()

    with pytest.raises(BundleError, match="signature does not match"):
        open_bundle(rewrite(signed, tmp_path / "swapped.kbundle", swap))


def test_a_signature_by_another_key_than_named_is_refused(signed, tmp_path):
    mallory = make_key(tmp_path, "alice@example.com", "mallory")
    by_mallory = good_bundle(tmp_path / "m.kbundle", sign=signer_for(mallory))
    mallory_sig = _sig_record(by_mallory)["signature"]

    def swap(name: str, data: bytes) -> bytes:
        if name != SIGNATURE:
            return data
        record = json.loads(data)
        record["signature"] = mallory_sig  # a valid SSHSIG, but by mallory, while alice's key is named
        return json.dumps(record).encode()

    with pytest.raises(BundleError, match="another key"):
        open_bundle(rewrite(signed, tmp_path / "wrong-key.kbundle", swap))


def test_a_valid_signature_by_an_unknown_key_is_unknown_not_trusted(signed, tmp_path):
    bob = make_key(tmp_path, "bob@example.com", "bob")
    result = kbundle("trust", "add", "alice@example.com", f"{bob}.pub")  # alice's name, bob's key
    assert result.returncode == 0, result.stderr
    signature = read_signature(open_bundle(signed))
    assert signature.state == "unknown" and signature.identity == "alice@example.com"


@pytest.mark.parametrize(
    "record",
    [
        b"not json",
        b"[]",
        b'{"version": 2}',
        b'{"version": true, "identity": "a", "public_key": "x", "signature": "y", "namespace": "kbundle"}',
        json.dumps(
            {"version": 1, "identity": "*", "public_key": "x", "signature": "y", "namespace": "kbundle"}
        ).encode(),
        json.dumps(
            {
                "version": 1,
                "identity": "a@b",
                "public_key": "ssh-ed25519 AAAA",
                "signature": "y",
                "namespace": "kbundle",
            }
        ).encode(),
    ],
)
def test_a_malformed_signature_member_is_a_damaged_bundle(signed, tmp_path, record):
    bad = rewrite(signed, tmp_path / "bad.kbundle", lambda n, d: record if n == SIGNATURE else d)
    result = kbundle("verify", bad)
    assert_one_error_line(result, "kbundle.sig")
    assert result.returncode == 3


def test_verify_and_inspect_show_the_signer(signed, alice, config):
    env = {"KBUNDLE_CONFIG_DIR": str(config)}
    assert "signature: signed by an unknown key SHA256:" in kbundle("verify", signed, env=env).stdout
    assert kbundle("trust", "add", "alice@example.com", f"{alice}.pub", env=env).returncode == 0
    verified = kbundle("verify", signed, env=env)
    assert verified.returncode == 0 and "signature: signed by alice@example.com (SHA256:" in verified.stdout
    text = kbundle("inspect", signed, env=env).stdout
    assert "  signature  signed by alice@example.com (SHA256:" in text
    doc = json.loads(kbundle("inspect", signed, "--json", env=env).stdout)
    assert doc["signature"]["state"] == "trusted" and doc["signature"]["identity"] == "alice@example.com"
    assert doc["signature"]["fingerprint"].startswith("SHA256:")
    listed = kbundle("trust", "list", env=env).stdout
    assert listed.startswith("alice@example.com\tSHA256:")


def test_pack_sign_writes_a_signed_bundle(tmp_path, alice, config):
    nb = notebook(tmp_path)
    env_file = tmp_path / "environment.yml"
    env_file.write_text("name: x\nchannels: [conda-forge]\ndependencies: [python=3.11]\n")
    out = tmp_path / "nb.kbundle"
    result = kbundle("pack", nb, "-e", env_file, "--lock", "never", "--sign", alice, "-o", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    opened = open_bundle(out)
    assert read_signature(opened).identity == "alice@example.com"
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist()[-1] == SIGNATURE and "content-hash" not in zf.read("Dockerfile").decode()
    assert "signed by an unknown key" in kbundle("verify", out, env={"KBUNDLE_CONFIG_DIR": str(config)}).stdout


def test_pack_sign_with_a_bad_key_fails_before_writing(tmp_path):
    nb = notebook(tmp_path)
    env_file = tmp_path / "environment.yml"
    env_file.write_text("name: x\nchannels: [conda-forge]\ndependencies: [python=3.11]\n")
    nameless = make_key(tmp_path, "", "nameless")
    for key, words in ((tmp_path / "missing", "no such key"), (nameless, "comment")):
        result = kbundle("pack", nb, "-e", env_file, "--lock", "never", "--sign", key, "-o", tmp_path / "o.kbundle")
        assert_one_error_line(result, words)
        assert result.returncode == 2 and not (tmp_path / "o.kbundle").exists()


def test_trust_add_refuses_pattern_identities_and_non_keys(tmp_path, alice):
    for identity, key in (("*", f"{alice}.pub"), ("a b", f"{alice}.pub"), ("alice@example.com", "not-a-key")):
        assert_one_error_line(kbundle("trust", "add", identity, key))
    with pytest.raises(UsageError):
        signer_for(tmp_path / "nope")
    assert list_signers() == []


def test_a_signed_bundle_with_the_old_hash_rule_is_refused(tmp_path, alice):
    """Only unsigned bundles from before 0.2 may use the old rule (which left out the Dockerfile)."""
    import hashlib

    from kbundle.bundle.format import content_hash_of

    content = members()
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in content.items()}
    old = good_bundle(
        tmp_path / "old.kbundle",
        content,
        sign=signer_for(alice),
        content_hash=content_hash_of(digests, legacy=True),
        kbundle_version="0.1.0",
    )
    with pytest.raises(BundleError, match="content hash"):
        open_bundle(old)
