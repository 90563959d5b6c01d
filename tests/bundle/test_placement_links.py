"""Placement and extraction never follow a link already in the target folder, never leave a
partial file, and never write past the extraction limit. A marker carried in every member
proves, by searching the whole test folder, that no byte of the bundle landed outside."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from bundlekit import members, sealed

from helpers import assert_one_error_line, kbundle
from kbundle.bundle import BundleError, open_bundle
from kbundle.errors import KbundleError
from kbundle.image import workdir as wd

MARKER = f"kbundle-marker-{uuid.uuid4().hex}".encode()


def marked_bundle(path: Path) -> Path:
    content = {**members(), "work/data/table.csv": b"a,b\n" + MARKER + b"\n"}
    return sealed(path, content)


def marker_files(root: Path, inside: Path | None = None) -> list[str]:
    """Every file below `root` (outside `inside`, and not a bundle) that holds the marker."""
    found = []
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file() or path.suffix == ".kbundle":
            continue
        if inside is not None and path.resolve().is_relative_to(inside.resolve()):
            continue
        if MARKER in path.read_bytes():
            found.append(str(path.relative_to(root)))
    return found


@pytest.fixture
def scene(tmp_path):
    """A bundle, a workdir, and a folder outside it that a planted link points to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("the user's")
    work = tmp_path / "work"
    work.mkdir()
    return marked_bundle(tmp_path / "b.kbundle"), work, outside


def test_a_symlinked_folder_in_the_workdir_is_refused(scene, tmp_path):
    bundle, work, outside = scene
    os.symlink(outside, work / "data")
    with pytest.raises(KbundleError, match="symbolic link"):
        wd.place(open_bundle(bundle), work, "k", "k")
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]
    assert marker_files(tmp_path, inside=work) == []


def test_a_symlinked_state_folder_is_not_written_through(scene, tmp_path):
    bundle, work, outside = scene
    os.symlink(outside, work / ".kbundle")
    with pytest.raises(KbundleError, match="symbolic link"):
        wd.place(open_bundle(bundle), work, "k", "k")
    with pytest.raises(KbundleError, match="symbolic link"):
        wd.review_dockerfile(work, "FROM x\n")
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]


def test_a_symlinked_file_in_the_workdir_is_kept_and_not_followed(scene, tmp_path):
    bundle, work, outside = scene
    (work / "data").mkdir()
    os.symlink(outside / "sentinel.txt", work / "data" / "table.csv")
    result = wd.place(open_bundle(bundle), work, "k", "k")
    assert (outside / "sentinel.txt").read_text() == "the user's"
    assert [k.fresh.name for k in result.kept] == ["table.kbundle-new.csv"]
    assert marker_files(tmp_path, inside=work) == []


def test_kbundle_run_refuses_a_symlinked_folder_in_the_workdir(scene, tmp_path):
    bundle, work, outside = scene
    os.symlink(outside, work / "data")
    env = {
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"),
        "KBUNDLE_CACHE_DIR": str(tmp_path / "cache"),
        "KBUNDLE_CONFIG_DIR": str(tmp_path / "config"),
        "DOCKER_HOST": "unix:///nonexistent.sock",
    }
    result = kbundle("run", bundle, "--workdir", work, "--yes", env=env, cwd=tmp_path)
    assert_one_error_line(result, "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]
    assert marker_files(tmp_path, inside=work) == []


def test_extract_refuses_a_symlinked_folder_before_writing(scene, tmp_path):
    bundle, work, outside = scene
    os.symlink(outside, work / "work")
    with pytest.raises(KbundleError, match="symbolic link"):
        open_bundle(bundle).extract(work)
    assert sorted(p.name for p in work.iterdir()) == ["work"]  # the planted link only
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]
    assert marker_files(tmp_path) == []


def test_extract_is_refused_before_writing_when_sizes_pass_the_limit(scene):
    bundle, work, _ = scene
    opened = open_bundle(bundle)
    with pytest.raises(BundleError, match="limit"):
        opened.extract(work / "x", limit=100)
    assert not (work / "x").exists() or not any((work / "x").iterdir())
    tight = open_bundle(bundle, max_extract=sum(f.size for f in opened.files))
    assert len(tight.extract(work / "y")) == len(opened.files)  # exactly at the limit is fine


def test_a_bundle_changed_after_verification_leaves_no_file(scene, tmp_path):
    """Large members are read again from the zip: with the same hash check, into a temporary file,
    so a bundle swapped after `open_bundle` leaves neither a partial nor an unverified file."""
    bundle, work, _ = scene
    opened = open_bundle(bundle)
    swapped = {**members(), "work/data/table.csv": b"a,b\n" + MARKER[::-1] + b"\n"}  # same size, other bytes
    sealed(tmp_path / "other.kbundle", swapped)
    shutil.copyfile(tmp_path / "other.kbundle", bundle)
    with pytest.raises(BundleError, match="sha256"):
        opened.extract(work / "out")
    assert [p for p in (work / "out").rglob("*") if p.is_file()] == []  # what it wrote first is undone
    with pytest.raises(BundleError, match="sha256"):
        wd.place(opened, work / "placed", "k", "k")
    assert not (work / "placed" / "data" / "table.csv").exists()
    assert [p.name for p in (work / "placed" / "data").iterdir()] == []  # no temporary file left


def test_placement_writes_the_same_files_as_before(scene):
    bundle, work, _ = scene
    result = wd.place(open_bundle(bundle), work, "k", "k")
    assert (work / "data" / "table.csv").read_bytes() == b"a,b\n" + MARKER + b"\n"
    assert result.notebook == work.resolve() / "nb.ipynb" and (work / ".kbundle" / "state.json").is_file()
    again = wd.place(open_bundle(bundle), work, "k", "k")
    assert again.written == [] and again.kept == []
