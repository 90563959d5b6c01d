"""The .kbundle zip: determinism, verification, tamper detection and safe extraction."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from kbundle.bundle import (
    BundleError,
    Dropped,
    Manifest,
    content_hash,
    extract_bundle,
    open_bundle,
    write_bundle,
)
from kbundle.bundle.format import MANIFEST, SIGNATURE, content_hash_of


def _members() -> dict[str, bytes]:
    return {
        "work/nb.ipynb": b'{"cells": [], "nbformat": 4}',
        "work/data/x.csv": b"a,b\n1,2\n",
        "env/environment.yml": b"dependencies: [python=3.11, ipykernel]\n",
        "env/original/environment.yml": b"dependencies: [python=3.11=h0, vc=14]\n",
        "Dockerfile": b"FROM scratch\n",
    }


def _manifest(members: dict[str, bytes]) -> Manifest:
    return Manifest(
        name="nb",
        notebook="work/nb.ipynb",
        python="3.11",
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image="debian:bookworm-slim",
        base_image_reason="test",
        channels=["conda-forge"],
        dependencies=["python=3.11", "ipykernel"],
        pip=["rich==13.0.0"],
        dropped=[Dropped("vc=14", "exists only for Windows")],
        includes=["work/data/x.csv"],
        content_hash=content_hash(members),
    )


@pytest.fixture
def bundle(tmp_path) -> Path:
    members = _members()
    path = tmp_path / "nb.kbundle"
    write_bundle(path, _manifest(members), members)
    return path


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy a zip member by member, letting `change(name, data)` alter or drop members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            result = change(info.filename, zin.read(info))
            if result is not None:
                zout.writestr(info, result)


def test_round_trip_exposes_manifest_fields(bundle):
    opened = open_bundle(bundle)
    assert opened.name == "nb" and opened.notebook == "work/nb.ipynb"
    assert opened.python == "3.11" and opened.cuda is None
    assert opened.channels == ["conda-forge"] and opened.pip == ["rich==13.0.0"]
    assert opened.dropped == [Dropped("vc=14", "exists only for Windows")]
    assert opened.locked is False and opened.lock_text is None
    assert opened.dockerfile_text == "FROM scratch\n"
    assert opened.includes == ["work/data/x.csv"]
    assert {f.path for f in opened.files} == set(_members())
    assert all(len(f.sha256) == 64 for f in opened.files)


def test_same_inputs_give_the_same_bytes(tmp_path):
    members = _members()
    a, b = tmp_path / "a.kbundle", tmp_path / "b.kbundle"
    write_bundle(a, _manifest(members), members)
    os.utime(tmp_path, (0, 0))
    write_bundle(b, _manifest(dict(reversed(list(members.items())))), dict(reversed(list(members.items()))))
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        names = zf.namelist()
        assert names[0] == MANIFEST and names[1:] == sorted(names[1:])
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_write_is_atomic_and_leaves_no_temp_on_failure(tmp_path):
    members = _members()
    target = tmp_path / "x.kbundle"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        write_bundle(target, _manifest(members), {**members, MANIFEST: b"{}"})
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.kbundle"]


def test_modified_member_is_detected(bundle, tmp_path):
    bad = tmp_path / "bad.kbundle"
    _rewrite(bundle, bad, lambda n, d: d.replace(b"python=3.11", b"python=3.12") if n == "env/environment.yml" else d)
    with pytest.raises(BundleError, match="env/environment.yml.*(sha256|size)"):
        open_bundle(bad)


def test_same_size_modification_is_detected(bundle, tmp_path):
    bad = tmp_path / "bad.kbundle"
    _rewrite(bundle, bad, lambda n, d: d.replace(b"FROM scratch", b"FROM scratcH") if n == "Dockerfile" else d)
    with pytest.raises(BundleError, match="Dockerfile.*sha256"):
        open_bundle(bad)


def test_member_changed_with_a_resealed_manifest_breaks_the_content_hash(tmp_path):
    """A tamperer who updates the manifest's per-file sha256 and size still cannot keep the
    content hash (which names the bundle's image and kernel) in step without redoing it."""
    members = _members()
    manifest = _manifest(members)  # content_hash over the original members
    changed = {**members, "env/environment.yml": b"dependencies: [python=3.11, ipykernel, evil]\n"}
    path = tmp_path / "resealed.kbundle"
    write_bundle(path, manifest, changed)  # files[] now match the changed bytes exactly
    with pytest.raises(BundleError, match="content hash"):
        open_bundle(path)


def test_content_hash_covers_every_member_but_the_manifest_and_signature():
    members = _members()
    base = content_hash(members)
    assert content_hash({**members, MANIFEST: b"{}", SIGNATURE: b"sig"}) == base
    for name in ("work/nb.ipynb", "env/environment.yml", "env/original/environment.yml", "Dockerfile"):
        assert content_hash({**members, name: members[name] + b" "}) != base, name
    assert content_hash({**members, "work/extra.txt": b""}) != base


def _legacy_bundle(tmp_path: Path, version: str) -> Path:
    """A bundle sealed the way kbundle 0.1 did: the content hash leaves out the Dockerfile."""
    members = _members()
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in members.items()}
    manifest = _manifest(members)
    manifest.content_hash = content_hash_of(digests, legacy=True)
    manifest.kbundle_version = version
    path = tmp_path / f"legacy-{version or 'none'}.kbundle"
    write_bundle(path, manifest, members)
    return path


def test_bundles_from_before_0_2_still_open_with_the_old_hash_rule(tmp_path):
    assert open_bundle(_legacy_bundle(tmp_path, "0.1.0")).name == "nb"


@pytest.mark.parametrize("version", ["0.2.0", "1.0", "", "not-a-version"])
def test_the_old_hash_rule_is_refused_for_newer_bundles(tmp_path, version):
    with pytest.raises(BundleError, match="content hash"):
        open_bundle(_legacy_bundle(tmp_path, version))


def test_truncated_archive_is_detected(bundle, tmp_path):
    data = bundle.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.kbundle"
        bad.write_bytes(data[:cut])
        with pytest.raises(BundleError, match="truncated or corrupt"):
            open_bundle(bad)


def test_corrupt_member_bytes_are_detected(bundle, tmp_path):
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo("work/data/x.csv")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 2
    data[start] ^= 0xFF
    bad = tmp_path / "flip.kbundle"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        open_bundle(bad)


def test_not_a_zip(tmp_path):
    bad = tmp_path / "nb.kbundle"
    bad.write_text("hello")
    with pytest.raises(BundleError, match="truncated or corrupt"):
        open_bundle(bad)


@pytest.mark.parametrize(
    "version, message", [(2, "newer than this kbundle"), (0, "unknown bundle format version"), ("1", "unknown")]
)
def test_unknown_format_version(bundle, tmp_path, version, message):
    def change(name, data):
        if name != MANIFEST:
            return data
        doc = json.loads(data)
        doc["format_version"] = version
        return json.dumps(doc).encode()

    bad = tmp_path / "v.kbundle"
    _rewrite(bundle, bad, change)
    with pytest.raises(BundleError, match=message):
        open_bundle(bad)


def test_unlisted_and_missing_members(bundle, tmp_path):
    extra = tmp_path / "extra.kbundle"
    _rewrite(bundle, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("work/evil.py", b"print(1)")
    with pytest.raises(BundleError, match="not listed in the manifest"):
        open_bundle(extra)
    missing = tmp_path / "missing.kbundle"
    _rewrite(bundle, missing, lambda n, d: None if n == "work/data/x.csv" else d)
    with pytest.raises(BundleError, match="missing"):
        open_bundle(missing)


def _evil_bundle(tmp_path: Path, name: str, *, symlink: bool = False) -> Path:
    members = {**_members(), name: b"x"}
    path = tmp_path / "evil.kbundle"
    manifest = _manifest(members)
    from kbundle.bundle.writer import seal

    sealed = seal(manifest, members)
    with zipfile.ZipFile(path, "w") as zf:
        from kbundle.bundle.writer import manifest_bytes

        zf.writestr(MANIFEST, manifest_bytes(sealed))
        for member, data in members.items():
            info = zipfile.ZipInfo(member)
            if symlink and member == name:
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/etc/passwd", "work/../../x", "C:/x.txt", "work\\..\\x", "work/a\nb"]
)
def test_unsafe_member_names_are_refused(tmp_path, name):
    with pytest.raises(BundleError, match="unsafe member name"):
        open_bundle(_evil_bundle(tmp_path, name))


def test_symlink_members_are_refused(tmp_path):
    with pytest.raises(BundleError, match="link"):
        open_bundle(_evil_bundle(tmp_path, "work/link", symlink=True))


def test_extract_writes_members_and_never_clobbers(bundle, tmp_path):
    dest = tmp_path / "out"
    written = extract_bundle(bundle, dest)
    assert (dest / "work/data/x.csv").read_bytes() == b"a,b\n1,2\n"
    assert len(written) == len(_members()) and all(p.is_file() for p in written)
    (dest / "work/nb.ipynb").write_text("user edit")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        extract_bundle(bundle, dest, members=["work/nb.ipynb"])
    assert (dest / "work/nb.ipynb").read_text() == "user edit"
    only = extract_bundle(bundle, tmp_path / "only", members=["work/nb.ipynb"])
    assert [p.relative_to((tmp_path / "only").resolve()).as_posix() for p in only] == ["work/nb.ipynb"]


def test_extract_refuses_a_planted_symlink(bundle, tmp_path):
    dest = tmp_path / "out"
    (dest / "work").mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    os.symlink(outside, dest / "work" / "nb.ipynb")
    with pytest.raises((BundleError, OSError)):
        extract_bundle(bundle, dest, members=["work/nb.ipynb"])
    assert not outside.exists()


def test_fields_added_later_in_version_1_are_ignored(bundle, tmp_path):
    def change(name, data):
        if name != MANIFEST:
            return data
        doc = json.loads(data)
        doc["future_field"] = {"x": 1}
        for entry in doc["files"]:
            entry["mode"] = "0644"
        return json.dumps(doc).encode()

    newer = tmp_path / "newer.kbundle"
    _rewrite(bundle, newer, change)
    assert open_bundle(newer).name == "nb"


def test_malformed_manifest(bundle, tmp_path):
    bad = tmp_path / "bad.kbundle"
    _rewrite(bundle, bad, lambda n, d: b'{"format_version": 1, "files": [1]}' if n == MANIFEST else d)
    with pytest.raises(BundleError, match="malformed"):
        open_bundle(bad)
