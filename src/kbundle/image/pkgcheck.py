"""Is a conda package in rattler's cache still what was unpacked from its checked archive?

A package is trusted in the cache by its stamp (the sha256 of the archive it came from), but
its files are what every env links: a file cut short there (a crash, a full disk, a stray
edit) went into every later image. So each package's files are checked when used:

- against its own `info/paths.json`: the size of every file (`size_in_bytes`), and its
  sha256 where the package records one;
- cheaply: when a package is unpacked, kbundle records each file's size and modification
  time (`kbundle-files.json` beside rattler's stamp). A later use only stats the files; a file
  whose size or time moved since is hashed against paths.json. Hard links made by installs
  do not change a file's modification time, so a healthy cache costs one stat per file.

A package without kbundle's record (unpacked by an older kbundle) is checked in full once,
then recorded. `damaged` names the first file that fails, for the caller to remove the
package and fetch it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from kbundle.atomic import write_atomic

RECORD_SUFFIX = ".kbundle-files.json"


def record_path(folder: Path) -> Path:
    return folder.with_name(folder.name + RECORD_SUFFIX)


def _entries(folder: Path) -> list[dict]:
    raw = json.loads((folder / "info" / "paths.json").read_text(encoding="utf-8"))
    return [p for p in raw.get("paths", []) if isinstance(p, dict) and p.get("_path")]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _problem(path: Path, entry: dict) -> Optional[str]:
    """What is wrong with one file against its paths.json entry (None: nothing)."""
    try:
        info = os.lstat(path)
    except OSError:
        return "missing"
    if entry.get("path_type") == "softlink" or os.path.islink(path):
        return None  # a link's target is checked by the env's own check (env.check_prefix)
    size = entry.get("size_in_bytes")
    if isinstance(size, int) and info.st_size != size:
        return f"{info.st_size} bytes, not {size}"
    expected = entry.get("sha256")
    if isinstance(expected, str) and expected and _sha256(path) != expected:
        return "its sha256 differs"
    return None


def record(folder: Path) -> None:
    """Note each file's size and modification time, once the package is known good."""
    files = {}
    try:
        entries = _entries(folder)
    except (OSError, ValueError, AttributeError):
        return  # no file list to record: `damaged` says so at the next use
    for entry in entries:
        try:
            info = os.lstat(folder / entry["_path"])
        except OSError:
            continue
        files[entry["_path"]] = [info.st_size, info.st_mtime_ns]
    write_atomic(record_path(folder), json.dumps(files))


def damaged(folder: Path) -> Optional[str]:
    """`path: what is wrong` for the first damaged file of the package at `folder`, or None."""
    try:
        entries = _entries(folder)
    except (OSError, ValueError, AttributeError):
        return "info/paths.json: unreadable"
    try:
        known = json.loads(record_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = None
    for entry in entries:
        rel = entry["_path"]
        seen = known.get(rel) if isinstance(known, dict) else None
        if seen is not None and _unchanged(folder / rel, seen):
            continue
        problem = _problem(folder / rel, entry)
        if problem:
            return f"{rel}: {problem}"
    if not isinstance(known, dict):
        record(folder)  # checked in full once: later uses only stat
    return None


def _unchanged(path: Path, seen: list) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return [info.st_size, info.st_mtime_ns] == list(seen)
