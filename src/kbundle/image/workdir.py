"""The working directory a bundle unpacks into (default `./<name>/`).

The notebook there names the bundle's kernel in `metadata.kernelspec`, so opening it
selects the kernel. A file the user changed is never overwritten: kbundle remembers the
hash of every file it wrote (`.kbundle/state.json`); a file whose hash differs from that
is the user's, and the fresh copy goes beside it as `<stem>.kbundle-new<suffix>`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kbundle.atomic import write_atomic
from kbundle.bundle.format import WORK_DIR

STATE_DIR = ".kbundle"
STATE_FILE = "state.json"


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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_kernelspec(notebook: bytes, kernel_name: str, display_name: str) -> bytes:
    """The notebook with `metadata.kernelspec` naming the kernel; everything else untouched."""
    data = json.loads(notebook.decode("utf-8"))
    meta = data.setdefault("metadata", {})
    meta["kernelspec"] = {"name": kernel_name, "display_name": display_name, "language": "python"}
    return (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _load_state(workdir: Path) -> dict[str, str]:
    try:
        return dict(json.loads((workdir / STATE_DIR / STATE_FILE).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _fresh_name(path: Path, state: dict[str, str], workdir: Path) -> Path:
    for n in range(1000):
        suffix = ".kbundle-new" if n == 0 else f".kbundle-new{n}"
        candidate = path.with_name(path.stem + suffix + path.suffix)
        rel = candidate.relative_to(workdir).as_posix()
        if not candidate.exists() or rel in state:  # ours from an earlier run: may be refreshed
            return candidate
    raise OSError(f"no free name beside {path}")


def place(bundle, workdir: Path, kernel_name: str, display_name: str) -> Placement:
    """Write the verified bundle's `work/` members into `workdir`, keeping any file the user changed.

    The notebook's copy names the kernel, so that opening it selects the kernel."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    state = _load_state(workdir)
    placement = Placement(workdir, workdir / bundle.notebook[len(WORK_DIR) :])
    (workdir / STATE_DIR).mkdir(exist_ok=True)
    for member in bundle.members_under(WORK_DIR):
        data = bundle.read(member)
        if member == bundle.notebook:
            data = with_kernelspec(data, kernel_name, display_name)
        _place_one(workdir, member[len(WORK_DIR) :], data, state, placement)
    write_atomic(
        workdir / STATE_DIR / STATE_FILE, (json.dumps({"files": state}, indent=1, sort_keys=True) + "\n").encode()
    )
    return placement


def _place_one(workdir: Path, rel: str, data: bytes, state: dict[str, str], placement: Placement) -> None:
    dest = workdir / rel
    fresh = _sha(data)
    if dest.is_symlink() or (dest.exists() and not dest.is_file()):
        current = None  # something the user put there; never replace it
    else:
        current = _sha(dest.read_bytes()) if dest.exists() else ""
    if current == fresh:
        state[rel] = fresh
        return
    if current == "" or (current is not None and state.get(rel) == current):
        write_atomic(dest, data)  # new, or still exactly what kbundle wrote last time
        state[rel] = fresh
        placement.written.append(dest)
        return
    other = _fresh_name(dest, state, workdir)
    write_atomic(other, data)
    state[other.relative_to(workdir).as_posix()] = fresh
    placement.kept.append(KeptFile(dest, other))


def review_dockerfile(workdir: Path, text: str) -> Path:
    """Where the user can read the Dockerfile before agreeing to build it."""
    path = workdir / STATE_DIR / "Dockerfile"
    write_atomic(path, text.encode("utf-8"))
    return path


def safe_dirname(name: str) -> str:
    """One harmless path component from the bundle's (untrusted) name: no separators, no `..`."""
    text = re.sub(r"[^\w .+-]+", "-", name, flags=re.UNICODE).strip(" .-")
    return text[:80] or "bundle"


def default_workdir(name: str, cwd: Optional[Path] = None) -> Path:
    return (cwd or Path.cwd()) / safe_dirname(name)
