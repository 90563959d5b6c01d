"""Split the installed environment into the image's layers, by the package that owns each file.

Why: Docker stores a layer once however many images hold it, but only when it and every
layer under it are identical. One layer for a 7 GB environment shares nothing between two
bundles that differ by one small package; a layer per group of packages (data/layers.yaml:
the CUDA libraries, the framework, the rest of conda, the rest of pip, in that order)
shares all but the last.

Who owns a file: conda packages list theirs in `conda-meta/<package>.json` ("files"), pip
distributions in `<name>.dist-info/RECORD`; pip wins where both claim a path (pip installed
over conda). A `__pycache__/x.<tag>.pyc` belongs to the owner of `x.py`, conda's records
(`conda-meta/`) to conda's rest group, and anything else to the last group.

Staging moves (renames) every entry of `<context>/env` into `<context>/env-layers/NN-group/`:
no byte is copied, and the context holds each file once. The groups are fixed, so an empty
group is an empty folder: the Dockerfile, rendered at pack time, COPYs every one.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import contract
from kbundle.facts import LayerGroups

_PYC = re.compile(r"^(?P<dir>(?:.*/)?)__pycache__/(?P<stem>[^/.]+)\.[^/]*\.pyc$")
_SITE_PACKAGES = "lib/python*/site-packages"


@dataclass(frozen=True)
class Owner:
    source: str  # "conda" or "pip"
    name: str  # the package's normalised name


@dataclass(frozen=True)
class Layer:
    """One staged layer: its group, its folder in the context, what it holds."""

    group: str
    folder: str  # relative to the context: env-layers/01-cuda
    files: int
    bytes: int

    def describe(self) -> str:
        from kbundle.display import size

        return f"{self.group} {size(self.bytes)} ({self.files} files)"


# ----------------------------------------------------------------- deciding (pure)


def normalised(name: str) -> str:
    from kbundle.specs import canonical

    return canonical(name)


def owner_of(path: str, owners: Mapping[str, Owner]) -> Optional[Owner]:
    """The package that owns `path` (relative to the env): listed, or the owner of a .pyc's source."""
    found = owners.get(path)
    if found is not None:
        return found
    pyc = _PYC.match(path)
    if pyc:
        return owners.get(f"{pyc.group('dir')}{pyc.group('stem')}.py")
    return None


def group_for(path: str, owners: Mapping[str, Owner], groups: LayerGroups) -> str:
    """The layer group of one installed path."""
    if path.startswith("conda-meta/"):
        return groups.rest_of("conda")  # conda's records of every package: they name the whole env
    owner = owner_of(path, owners)
    if owner is None:
        return groups.last
    return groups.group_of(owner.source, owner.name)


def assign(paths: Iterable[str], owners: Mapping[str, Owner], groups: LayerGroups) -> dict[str, str]:
    """path -> group, for every path; the same paths and owners give the same answer in any order."""
    return {path: group_for(path, owners, groups) for path in sorted(paths)}


def merged(conda: Mapping[str, Owner], pip: Mapping[str, Owner]) -> dict[str, Owner]:
    """Both sides' claims; pip's win, since pip installs after conda and over it."""
    return {**conda, **pip}


# ----------------------------------------------------------------- reading owners


def conda_owners(env: Path) -> dict[str, Owner]:
    """path -> owner, from every `conda-meta/*.json` record's "files"."""
    found: dict[str, Owner] = {}
    for meta in sorted((env / "conda-meta").glob("*.json")):
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable record owns nothing: its files go to the last group
        name = normalised(str(record.get("name") or ""))
        if not name:
            continue
        for path in record.get("files") or ():
            found[str(path)] = Owner("conda", name)
    return found


def pip_owners(env: Path, conda: Mapping[str, Owner]) -> dict[str, Owner]:
    """path -> owner, from the RECORD of every dist-info that no conda package installed."""
    found: dict[str, Owner] = {}
    for record in sorted(env.glob(f"{_SITE_PACKAGES}/*.dist-info/RECORD")):
        rel = record.relative_to(env).as_posix()
        if rel in conda:
            continue  # conda's own copy of a distribution: conda-meta says it already
        site = posixpath.dirname(posixpath.dirname(rel))
        owner = Owner("pip", normalised(record.parent.name.split("-", 1)[0]))
        for path in _record_paths(record):
            target = posixpath.normpath(posixpath.join(site, path))
            if not target.startswith("../"):
                found[target] = owner
    return found


def _record_paths(record: Path) -> list[str]:
    try:
        with open(record, encoding="utf-8", newline="") as fh:
            return [row[0] for row in csv.reader(fh) if row and row[0]]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


# ----------------------------------------------------------------- staging


def stage(context: Path, groups: LayerGroups) -> tuple[Layer, ...]:
    """Move `<context>/env` into one folder per group (`env-layers/NN-group/`), in the groups' order."""
    env = context / contract.CONTEXT_ENV
    entries, dirs = _walk(env) if env.is_dir() else ({}, {})
    conda = conda_owners(env)
    plan = assign(entries, merged(conda, pip_owners(env, conda)), groups)
    folders = {g.name: contract.layer_dir(i, g.name) for i, g in enumerate(groups.groups)}
    counts = {name: [0, 0] for name in folders}
    made: dict[Path, int] = {}
    root_mode = stat.S_IMODE(env.stat().st_mode) if env.is_dir() else 0o755
    for folder in folders.values():
        (context / folder).mkdir(parents=True, exist_ok=True)
        made[context / folder] = root_mode
    for path, group in plan.items():
        dest = context / folders[group] / path
        _make_parents(context / folders[group], path, dirs, made)
        os.rename(env / path, dest)
        info = os.lstat(dest)
        counts[group][0] += 1
        counts[group][1] += info.st_size if stat.S_ISREG(info.st_mode) else 0
    for path in _empty_dirs(dirs, plan):  # a folder no file is under still exists in the image
        _make_parents(context / folders[groups.last], path + "/.", dirs, made)
    for folder, mode in sorted(made.items(), key=lambda item: -len(item[0].parts)):
        os.chmod(folder, mode)  # deepest first: a read-only folder is closed only once it is filled
    shutil.rmtree(env, ignore_errors=True)  # only empty folders are left
    return tuple(Layer(name, folders[name], *counts[name]) for name in folders)


def _walk(env: Path) -> tuple[dict[str, None], dict[str, int]]:
    """(every non-directory entry, every directory with its mode), relative to `env`, links never followed."""
    entries: dict[str, None] = {}
    dirs: dict[str, int] = {}
    for top, dirnames, filenames in os.walk(env):
        rel_top = os.path.relpath(top, env)
        prefix = "" if rel_top == "." else rel_top.replace(os.sep, "/") + "/"
        for name in list(dirnames):
            if os.path.islink(os.path.join(top, name)):  # a link to a folder moves as a link
                dirnames.remove(name)
                entries[prefix + name] = None
            else:
                dirs[prefix + name] = stat.S_IMODE(os.lstat(os.path.join(top, name)).st_mode)
        for name in filenames:
            entries[prefix + name] = None
    return entries, dirs


def _make_parents(root: Path, path: str, dirs: Mapping[str, int], made: dict[Path, int]) -> None:
    """The folders above `path` under `root`, each remembered with the env's mode for it."""
    parts = path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        rel = "/".join(parts[:depth])
        folder = root / rel
        if folder not in made:
            folder.mkdir(exist_ok=True)
            made[folder] = dirs.get(rel, 0o755)


def _empty_dirs(dirs: Mapping[str, int], plan: Mapping[str, str]) -> list[str]:
    """Folders of the env that hold no entry at any depth."""
    holding = set()
    for path in plan:
        parts = path.split("/")[:-1]
        holding.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(d for d in dirs if d not in holding)
