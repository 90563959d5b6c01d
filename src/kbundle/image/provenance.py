"""Where a bundle's packages may come from, and where their files may land.

A bundle is a stranger's file. Its lock names package URLs and file names; each package
names the paths it installs (info/paths.json); the installed prefix may hold symlinks.
Each of these could point at the recipient's own files. The checks here are pure
decisions over strings (table-tested in tests/image/test_provenance.py), plus one walk of
the installed prefix. They run before rattler sees anything: rattler aborts the whole
process (a Rust panic, exit 134) on an absolute path in paths.json.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from kbundle import contract
from kbundle.display import safe

# Channels a bundle may name: anything else (file://, a bare path) reads the recipient's disk.
REMOTE_SCHEMES = ("http", "https")
MAX_LINK_HOPS = 40  # as the kernel's own limit (ELOOP)


def unsafe_path(path: str) -> bool:
    """An absolute path, a drive or a `..` component: it could land outside the prefix."""
    text = str(path).replace("\\", "/")
    if not text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return True
    return ".." in text.split("/") or "\0" in text


def channel_base(channel: str) -> str:
    """A channel as a URL prefix ending in '/': names become conda.anaconda.org URLs, as conda does."""
    if "://" not in channel:
        channel = f"https://conda.anaconda.org/{channel.strip('/')}"
    return channel.rstrip("/") + "/"


def outside_channels(url: str, channels: Iterable[str]) -> bool:
    """Whether a package URL does not sit under one of the declared (remote) channels."""
    if not remote_url(url):
        return True
    for channel in channels:
        base = channel_base(channel)
        if urlsplit(base).scheme in REMOTE_SCHEMES and url.startswith(base):
            return False
    return True


def lock_problem(raw: object) -> Optional[str]:
    """The first unsafe location in a parsed lock file (YAML), before rattler reads it.

    Package locations must be http(s) URLs (a path or file:// URL reads this host's disk),
    and file names plain names."""
    packages = raw.get("packages") if isinstance(raw, dict) else None
    for entry in packages if isinstance(packages, list) else []:
        if not isinstance(entry, dict):
            continue
        for key in ("conda", "url", "path"):
            value = entry.get(key)
            if isinstance(value, str) and not remote_url(value):
                return f"the lock names a package at {safe(value)}"
        for key in ("fn", "file_name"):
            value = entry.get(key)
            if isinstance(value, str) and (unsafe_path(value) or "/" in value):
                return f"the lock names a package file {safe(value)}"
    return None


def remote_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in REMOTE_SCHEMES and bool(parts.netloc) and ".." not in unquote(parts.path).split("/")


def record_problem(url: str, file_name: str, channels: Iterable[str]) -> Optional[str]:
    """Why one resolved record cannot be installed (None when it can)."""
    if unsafe_path(file_name) or "/" in file_name:
        return f"a package's file name is a path: {safe(file_name)}"
    if outside_channels(url, channels):
        return f"the lock names a package outside the bundle's channels: {safe(url)}"
    return None


def paths_problem(package: str, paths: Iterable[str]) -> Optional[str]:
    """The first path of a package's info/paths.json that would land outside the prefix."""
    for path in paths:
        if unsafe_path(path):
            return f"package {safe(package)} installs a file outside the environment: {safe(path)}"
    return None


def escaping_links(root: Path, prefix: str = contract.PREFIX) -> Iterable[str]:
    """Symlinks under `root` (an env whose final home is `prefix`) that resolve outside it.

    Resolved as the image will see them: absolute targets are read against `prefix`, and
    each hop is followed inside `root`, so a chain cannot walk out either."""
    top = os.fspath(root)
    for entry in entries_below(top):
        if entry.is_symlink():
            rel = os.path.relpath(entry.path, top)
            if _resolve(root, prefix, rel.split("/")) is None:
                yield rel


def entries_below(top: str) -> Iterator[os.DirEntry]:
    """Every file, folder and link below `top`, links not followed. os.scandir's entries carry
    their type, so a walk over an environment's tens of thousands of files costs one call per
    folder rather than one per file."""
    folders = [top]
    while folders:
        with os.scandir(folders.pop()) as listing:
            for entry in listing:
                yield entry
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)


def _resolve(root: Path, prefix: str, parts: list[str], hops: int = 0) -> Optional[list[str]]:
    """The components of `parts` (relative to root) after following links; None if it leaves."""
    done: list[str] = []
    todo = list(parts)
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                return None
            done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if not candidate.is_symlink():
            done.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            return None
        target = os.readlink(candidate)
        if target.startswith("/"):
            norm = posixpath.normpath(target)
            if not (norm == prefix or norm.startswith(prefix.rstrip("/") + "/")):
                return None
            done, todo = [], norm[len(prefix) :].split("/") + todo
        else:
            todo = target.split("/") + todo
    return done
