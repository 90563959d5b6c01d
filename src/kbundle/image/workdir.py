"""The working directory a bundle unpacks into (default `./<name>/`).

The notebook there names the bundle's kernel in `metadata.kernelspec`, so opening it
selects the kernel. A file the user changed is never overwritten: kbundle remembers the
hash of every file it wrote (`.kbundle/state.json`); a file whose hash differs from that
is the user's, and the fresh copy goes beside it as `<stem>.kbundle-new<suffix>`.
Every path is opened relative to the workdir without following links (bundle/safefs.py):
a link planted in the workdir is refused, never written through.

Several runs may place one bundle in one folder at once: the folder, its notebook and its
`.kbundle/` scratch are then shared. Each run claims the folder (`claim`) under a lock on it
and stays present there while it works (image/locks.py `Presence`); the run that found no
folder made it, and when it fails it removes the folder only if no other run is present, none
registered a kernel from it (`RELIED_ON`), under that same lock (`release`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kbundle.bundle import safefs
from kbundle.bundle.format import WORK_DIR
from kbundle.errors import KbundleError

STATE_DIR = ".kbundle"
STATE_FILE = "state.json"
RELIED_ON = "kernel"  # in STATE_DIR: a run registered a kernel from this folder; no failed run removes it


@dataclass(frozen=True)
class KeptFile:
    path: Path  # the user's file, left alone
    fresh: Path  # where the bundle's copy went instead


@dataclass
class Placement:
    workdir: Path
    notebook: Path
    written: list[Path] = field(default_factory=list)
    kept: list[KeptFile] = field(default_factory=list)


@dataclass
class Claim:
    """A run's hold on its workdir: whether this run made the folder, and its presence there."""

    path: Path  # the folder, absolute, as the user named it
    created: bool
    presence: Optional[object]  # image/locks.py's Presence; None where the cache cannot be written


def _lock_name(path: Path) -> str:
    """One lock per folder, whatever path names it (relative, through a link)."""
    return "workdir-" + hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]


@contextmanager
def claim(target: Path) -> Iterator[Claim]:
    """Claim `target` for this run and hold its placement lock for the block (placing happens
    inside it). Whether this run makes the folder is decided under the lock, so that of runs
    started together exactly one is its maker."""
    from kbundle.image.locks import Presence, held

    path = Path(os.path.abspath(target))
    name = _lock_name(path)
    with ExitStack() as stack:
        try:
            stack.enter_context(held(name, None))
            presence = Presence(name)
        except OSError:  # kbundle's cache cannot be written: the run is refused before any download (flows/checks.py)
            presence = None
        yield Claim(path, not os.path.lexists(path), presence)


def release(claim: Claim, failed: bool) -> None:
    """This run leaves the folder. A failed run that made it removes it, unless another run is
    still present or a kernel was registered from it (the check and the removal are one step
    under the placement lock, so no run places files in a folder being removed)."""
    from kbundle.image.locks import held, others_present

    name = _lock_name(claim.path)
    with ExitStack() as stack:
        if claim.presence is not None:
            stack.enter_context(held(name, None))
            claim.presence.leave()
            if others_present(name):
                return
        if failed and claim.created and not relied_on(claim.path):
            shutil.rmtree(claim.path, ignore_errors=True)


def relied_on(workdir: Path) -> bool:
    return os.path.lexists(Path(workdir) / STATE_DIR / RELIED_ON)


def mark_relied_on(workdir: Path, kernel_name: str) -> None:
    """A kernel is registered from `workdir` now: it stays, whichever run fails later.
    Missing, it is refused: a kernel whose workdir is gone cannot start."""
    if not Path(workdir).is_dir():
        raise KbundleError(f"the working directory {workdir} is gone (removed while this run worked): run again")
    with safefs.root(Path(workdir)) as root:
        safefs.write_bytes(root, f"{STATE_DIR}/{RELIED_ON}", f"{kernel_name}\n".encode())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_kernelspec(notebook: bytes, kernel_name: str, display_name: str) -> bytes:
    """The notebook with `metadata.kernelspec` naming the kernel; everything else untouched."""
    data = json.loads(notebook.decode("utf-8-sig"))  # pack accepts notebooks saved with a BOM
    meta = data.setdefault("metadata", {})
    meta["kernelspec"] = {"name": kernel_name, "display_name": display_name, "language": "python"}
    return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


_STATE = f"{STATE_DIR}/{STATE_FILE}"
_STATE_LIMIT = 64 * 1024 * 1024


def _load_state(root: int) -> dict[str, str]:
    try:
        with safefs.parent_of(root, _STATE, create=False) as folder:
            raw = safefs.read_file(folder, STATE_FILE, _STATE_LIMIT)
        return dict(json.loads(raw)["files"]) if raw else {}
    except (OSError, ValueError, KeyError, TypeError, KbundleError):
        return {}


def _fresh_name(folder: int, rel: str, state: dict[str, str]) -> str:
    """`<stem>.kbundle-new<suffix>` beside `rel` (relative to the workdir): free, or ours from before."""
    head, _, name = rel.rpartition("/")
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in range(1000):
        candidate = stem + (".kbundle-new" if n == 0 else f".kbundle-new{n}") + suffix
        candidate_rel = f"{head}/{candidate}" if head else candidate
        if safefs.kind(folder, candidate) == "absent" or candidate_rel in state:  # ours: may be refreshed
            return candidate_rel
    raise OSError(f"no free name beside {rel}")


def place(bundle, workdir: Path, kernel_name: str, display_name: str) -> Placement:
    """Write the verified bundle's `work/` members into `workdir`, keeping any file the user changed.

    The notebook's copy names the kernel, so that opening it selects the kernel. Nothing is
    written through a symbolic link already in `workdir` (it is refused), and the members'
    sizes must fit the bundle's extraction limit before anything is written."""
    members = bundle.members_under(WORK_DIR)
    _check_limit(bundle, members)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    placement = Placement(workdir, workdir / bundle.notebook[len(WORK_DIR) :])
    with safefs.root(workdir) as root, bundle.reading() as source:
        state = _load_state(root)
        for member in members:
            _place_one(root, bundle, source, member, (kernel_name, display_name), state, placement)
        state_json = json.dumps({"files": state}, indent=1, sort_keys=True) + "\n"
        safefs.write_bytes(root, _STATE, state_json.encode())
    return placement


def _check_limit(bundle, members: list[str]) -> None:
    from kbundle.bundle.reader import BundleError

    total = sum(bundle.members[m].size for m in members)
    if total > bundle.max_extract:
        raise BundleError(f"the bundle's work files are {total} bytes, more than the {bundle.max_extract} limit")


def _place_one(root: int, bundle, source, member: str, kernel: tuple[str, str], state, placement) -> None:
    rel = member[len(WORK_DIR) :]
    if member == bundle.notebook:
        data = with_kernelspec(bundle.read(member), *kernel)
        fresh, fill = _sha(data), lambda out: out.write(data)
    else:  # streamed from the zip (it may be large), checked against its sha256 before it appears
        fresh, fill = bundle.members[member].sha256, lambda out: source.copy(member, out)
    with safefs.parent_of(root, rel) as folder:
        name = rel.rpartition("/")[2]
        current = safefs.file_sha256(folder, name)  # None: a link or a folder the user put there
        if current == fresh:
            state[rel] = fresh
            return
        if current == "" or (current is not None and state.get(rel) == current):
            safefs.write_file(folder, name, fill, replace=True)  # new, or still exactly what kbundle wrote
            state[rel] = fresh
            placement.written.append(placement.workdir / rel)
            return
        other = _fresh_name(folder, rel, state)
        safefs.write_file(folder, other.rpartition("/")[2], fill, replace=True)
    state[other] = fresh
    placement.kept.append(KeptFile(placement.workdir / rel, placement.workdir / other))


def review_dockerfile(workdir: Path, text: str) -> Path:
    """Where the user can read the Dockerfile before agreeing to build it."""
    with safefs.root(workdir) as root:
        safefs.write_bytes(root, f"{STATE_DIR}/Dockerfile", text.encode("utf-8"))
    return workdir / STATE_DIR / "Dockerfile"


def safe_dirname(name: str) -> str:
    """One harmless path component from the bundle's (untrusted) name: no separators, no `..`."""
    text = re.sub(r"[^\w .+-]+", "-", name, flags=re.UNICODE).strip(" .-")
    return text[:80] or "bundle"


def default_workdir(name: str, cwd: Optional[Path] = None) -> Path:
    return (cwd or Path.cwd()) / safe_dirname(name)
