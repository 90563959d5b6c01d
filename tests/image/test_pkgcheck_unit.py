"""image/pkgcheck.py: a cached conda package's files against its paths.json, cheaply when unchanged."""

from __future__ import annotations

import hashlib
import json
import os

from kbundle.image import pkgcheck


def package(root, files: dict[str, bytes], with_sha: bool = True):
    folder = root / "numpy-1.26.4-py311_0"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    paths = [
        {"_path": rel, "path_type": "hardlink", "size_in_bytes": len(data)}
        | ({"sha256": hashlib.sha256(data).hexdigest()} if with_sha else {})
        for rel, data in files.items()
    ]
    (folder / "info").mkdir(exist_ok=True)
    (folder / "info" / "paths.json").write_text(json.dumps({"paths": paths, "paths_version": 1}))
    return folder


FILES = {"lib/python3.11/site-packages/numpy/__init__.py": b"x = 1\n" * 100, "bin/f2py": b"#!/bin/sh\n"}


def test_an_intact_package_passes_and_is_recorded_once(tmp_path):
    folder = package(tmp_path, FILES)
    assert not pkgcheck.record_path(folder).exists()
    assert pkgcheck.damaged(folder) is None
    assert set(json.loads(pkgcheck.record_path(folder).read_text())) == set(FILES)
    assert pkgcheck.damaged(folder) is None


def test_a_truncated_file_is_named(tmp_path):
    folder = package(tmp_path, FILES)
    pkgcheck.record(folder)
    init = folder / "lib/python3.11/site-packages/numpy/__init__.py"
    with open(init, "r+b") as fh:
        fh.truncate(10)
    assert pkgcheck.damaged(folder) == "lib/python3.11/site-packages/numpy/__init__.py: 10 bytes, not 600"


def test_same_size_other_bytes_are_caught_by_sha256_when_the_time_moved(tmp_path):
    folder = package(tmp_path, FILES)
    pkgcheck.record(folder)
    init = folder / "lib/python3.11/site-packages/numpy/__init__.py"
    init.write_bytes(b"y = 2\n" * 100)  # same size, other bytes, a new mtime
    assert pkgcheck.damaged(folder) == "lib/python3.11/site-packages/numpy/__init__.py: its sha256 differs"


def test_a_touched_but_intact_file_passes(tmp_path):
    folder = package(tmp_path, FILES)
    pkgcheck.record(folder)
    os.utime(folder / "bin/f2py", ns=(1, 1))
    assert pkgcheck.damaged(folder) is None


def test_a_missing_file_or_paths_json_is_damage(tmp_path):
    folder = package(tmp_path, FILES, with_sha=False)
    (folder / "bin/f2py").unlink()
    assert pkgcheck.damaged(folder) == "bin/f2py: missing"
    (folder / "info" / "paths.json").unlink()
    assert pkgcheck.damaged(folder) == "info/paths.json: unreadable"
