"""Installing only the groups the engine lacks.

Why: when the chain's bottom steps (image/chain.py) are on the engine already, built for another
bundle, their files are in those step images. A second PyTorch bundle that adds one small package
used to install its 3 GB of CUDA and framework wheels again, only to build the one small step on
top of them. Now the wheels of the groups the engine has are not installed: only their metadata
(each wheel's own `*.dist-info/`, read from kbundle's wheel cache) is placed in the environment,
so that `pip check` still judges the whole resolution, and only the missing steps are built.

The decision is pure (`decide`); it says no, and the whole environment is installed as before,
when nothing would be saved, when a skipped wheel replaces a conda package's files (pip's install
of it would change a group that is built), or when a skipped wheel is not in the cache.

The final image's file list (image/integrity.py) is then the top present step's prefix, as the
engine lists it, overlaid by the missing groups' folders.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from kbundle.errors import KbundleError


@dataclass(frozen=True)
class Partial:
    """What a run installs when the engine has the chain's bottom steps."""

    present: tuple[str, ...]  # the tags of the bottom steps the engine has
    install: tuple[str, ...]  # the resolution's lines whose group is built: fetched and installed
    skipped: tuple[str, ...]  # the lines whose group is on the engine: only their metadata is placed
    lines: tuple[str, ...]  # the whole resolution, as pip check judges it and the record keeps it
    metadata: tuple = ()  # each skipped wheel's read_metadata, read before anything is installed


def decide(
    steps: Sequence,
    on_engine: Callable[[str], bool],
    lines: Sequence[str],
    group_of_wheel: Callable[[str], str],
    shadowed: Iterable[str],
) -> Optional[Partial]:
    """`steps` (chain.Step, bottom first), `lines` the known resolution. None: install it all."""
    from kbundle.image.chain import wheels_in_order

    present = []
    for step in steps:
        if not on_engine(step.tag):
            break
        present.append(step)
    if len(present) == len(steps):
        return None  # nothing to build: the caller builds only the final image
    wheels = wheels_in_order(lines)
    if wheels is None:
        return None
    have = {s.name for s in present}
    skip = [group_of_wheel(w.name) in have for w in wheels]
    if not any(skip):
        return None
    if {w.name for w, s in zip(wheels, skip, strict=True) if s} & set(shadowed):
        return None
    return Partial(
        present=tuple(s.tag for s in present),
        install=tuple(line for line, s in zip(lines, skip, strict=True) if not s),
        skipped=tuple(line for line, s in zip(lines, skip, strict=True) if s),
        lines=tuple(lines),
    )


# ----------------------------------------------------------------- the metadata of skipped wheels


def place_metadata(wheel: Path, site_packages: Path) -> str:
    """The wheel's `<name>-<version>.dist-info/` into `site_packages`, nothing else; its folder name."""
    return write_metadata(read_metadata(wheel), site_packages)


def read_metadata(wheel: Path) -> dict[PurePosixPath, bytes]:
    """The wheel's `<name>-<version>.dist-info/` files, by path. Read through zipfile, whose CRC
    check catches a damaged cache entry (KbundleError); the wheel's RECORD lists every one of them,
    so they belong to the wheel's own group."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            folder = _dist_info_folder(members, wheel.name)
            found = {}
            for member in members:
                path = PurePosixPath(member.filename)
                if path.parts[0] == folder:
                    _check_member(path, member, wheel.name)
                    found[path] = archive.read(member)
            return found
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise KbundleError(f"cannot read the metadata of {wheel.name} in kbundle's cache: {exc}") from None


def write_metadata(files: dict[PurePosixPath, bytes], site_packages: Path) -> str:
    """`read_metadata`'s files into `site_packages`; their folder's name."""
    for path, data in files.items():
        dest = site_packages.joinpath(*path.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        os.chmod(dest, 0o644)
    return next(iter(files)).parts[0]


def _dist_info_folder(members, name: str) -> str:
    found = {
        PurePosixPath(m.filename).parts[0]
        for m in members
        if len(PurePosixPath(m.filename).parts) == 2 and m.filename.endswith(".dist-info/METADATA")
    }
    if len(found) != 1:
        raise ValueError(f"{name} has {len(found)} .dist-info/METADATA files, not one")
    return found.pop()


def _check_member(path: PurePosixPath, member, name: str) -> None:
    if path.is_absolute() or ".." in path.parts or "\\" in member.filename:
        raise ValueError(f"{name} has an unsafe member {member.filename!r}")
    mode = member.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        raise ValueError(f"{name} has a link in its metadata: {member.filename!r}")


# ----------------------------------------------------------------- the final image's file list


def overlaid(lower: Iterable[str], upper: Iterable[str]) -> list[str]:
    """File-list lines (`<kind> <size> <path>`, image/integrity.py) of `upper` laid over `lower`:
    a path in both is the upper one's, as a later COPY's file replaces an earlier one's."""
    found = {}
    for line in (*lower, *upper):
        found[line.split(" ", 2)[2]] = line
    return list(found.values())
