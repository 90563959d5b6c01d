"""Hostile bundles through `kbundle run`: each is rejected with one error line, and nothing is
written anywhere (not outside the target, and not even inside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from kbundle.bundle import Manifest, content_hash
from kbundle.bundle.format import MANIFEST, sha256_hex

KBUNDLE = str(Path(sys.executable).parent / "kbundle")
NOTEBOOK = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode()


def good_members() -> dict[str, bytes]:
    return {"work/nb.ipynb": NOTEBOOK, "Dockerfile": b"FROM scratch\n", "env/environment.yml": b"dependencies: []\n"}


def craft(
    path: Path,
    members: dict[str, bytes],
    *,
    sizes: dict[str, int] | None = None,
    hashes: dict[str, bytes] | None = None,
    links: set[str] = frozenset(),
) -> Path:
    """A zip whose manifest lists `members` (with optional lies about sizes and hashes)."""
    sizes = sizes or {}
    hashes = hashes or {}
    manifest = Manifest(
        name="evil",
        notebook="work/nb.ipynb",
        python="3.11",
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image="scratch",
        base_image_reason="",
        channels=[],
        dependencies=[],
        pip=[],
    )
    raw = manifest.to_dict()
    raw["files"] = [
        {"path": name, "sha256": sha256_hex(hashes.get(name, data)), "size": sizes.get(name, len(data))}
        for name, data in sorted(members.items())
    ]
    raw["content_hash"] = content_hash(members)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(raw))
        for name, data in sorted(members.items()):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            if name in links:
                info.create_system = 3
                info.external_attr = 0o120777 << 16  # a symbolic link; the data is its target
            zf.writestr(info, data)
    return path


ABSOLUTE = f"/tmp/kbundle-hostile-{uuid.uuid4().hex}.txt"

CASES = {
    "traversal": (lambda p: craft(p, good_members() | {"work/../../../evil.txt": b"pwned\n"}), ["unsafe member"]),
    "dotdot-only": (lambda p: craft(p, good_members() | {"../evil.txt": b"pwned\n"}), ["unsafe member"]),
    "symlink": (lambda p: craft(p, good_members() | {"work/passwd": b"/etc/passwd"}, links={"work/passwd"}), ["link"]),
    "absolute": (lambda p: craft(p, good_members() | {ABSOLUTE: b"pwned\n"}), ["unsafe member"]),
    "size-mismatch": (lambda p: craft(p, good_members(), sizes={"work/nb.ipynb": len(NOTEBOOK) + 7}), ["size"]),
    "hash-mismatch": (lambda p: craft(p, good_members(), hashes={"work/nb.ipynb": NOTEBOOK + b" "}), ["sha256"]),
    "not-a-zip": (lambda p: (p.write_bytes(b"PK\x03\x04 truncated"), p)[1], ["corrupt"]),
}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_bundle_is_rejected_and_writes_nothing(tmp_path, case):
    make, words = CASES[case]
    recipient = tmp_path / "a" / "b" / "recipient"  # deep enough for ../../../ to stay inside tmp_path
    recipient.mkdir(parents=True)
    bundle = make(tmp_path / "evil.kbundle")
    before = tree(tmp_path)
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), KBUNDLE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [KBUNDLE, "run", str(bundle), "--workdir", str(recipient / "target"), "--yes"],
        cwd=recipient,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert tree(tmp_path) == before, "kbundle run wrote files for a hostile bundle"
    assert not Path(ABSOLUTE).exists()


def test_a_sound_crafted_bundle_passes_the_same_checks(tmp_path):
    """The crafting helper itself makes bundles the reader accepts, so the rejections above are real."""
    from kbundle.bundle import open_bundle

    assert open_bundle(craft(tmp_path / "ok.kbundle", good_members())).name == "evil"


def test_a_hostile_bundle_name_cannot_steer_the_default_workdir(tmp_path):
    """The manifest's name picks ./<name>/; a name like ../../escape breaks the manifest schema, so
    the bundle is refused as damaged (exit 3) before anything is written anywhere."""
    from kbundle.bundle import write_bundle

    manifest = Manifest(
        name="../../escape",
        notebook="work/nb.ipynb",
        python="3.11",
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image="scratch",
        base_image_reason="",
        channels=[],
        dependencies=[],
        pip=[],
    )
    bundle = tmp_path / "b.kbundle"
    write_bundle(bundle, manifest, good_members())
    recipient = tmp_path / "x" / "y" / "recipient"
    recipient.mkdir(parents=True)
    before = tree(tmp_path)
    env = dict(
        os.environ,
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),
        KBUNDLE_CACHE_DIR=str(tmp_path / "cache"),
        DOCKER_HOST="unix:///nonexistent.sock",
    )
    proc = subprocess.run(
        [KBUNDLE, "run", str(bundle), "--yes"], cwd=recipient, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.name" in lines[0], proc.stderr
    assert tree(tmp_path) == before


def test_the_default_workdir_is_one_folder_under_cwd_whatever_the_name():
    """Defence in depth below the schema: even a name that got past it stays one folder down."""
    from kbundle.image.workdir import default_workdir

    for name in ("../../escape", "/etc", "a/../../b", "..", ""):
        path = default_workdir(name, Path("/home/u"))
        assert path.parent == Path("/home/u") and path.name not in ("", ".", ".."), path


def test_max_extract_refuses_before_writing_anything(tmp_path):
    members = {**good_members(), "work/data.bin": b"x" * 4096}
    bundle = craft(tmp_path / "big.kbundle", members)
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [KBUNDLE, "run", str(bundle), "--yes", "--gpus", "none", "--max-extract", "2K"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "limit" in proc.stderr
    assert list(work.iterdir()) == []  # not even the working directory


@pytest.mark.parametrize(
    "text, size",
    [("2G", 2 * 1024**3), ("500M", 500 * 1024**2), ("64k", 64 * 1024), ("1GiB", 1024**3), ("4096", 4096)],
)
def test_max_extract_sizes(text, size):
    from kbundle.commands.run import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "0", ""])
def test_bad_max_extract_is_a_usage_error(text):
    from kbundle.commands.run import parse_size
    from kbundle.errors import UsageError

    with pytest.raises(UsageError, match="--max-extract"):
        parse_size(text)
