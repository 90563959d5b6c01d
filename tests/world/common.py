"""What every part of the world shares: where it is cached, its Pythons, its log, the Docker client."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The CPythons the channel carries besides the running one: TensorFlow 2.3.1's tests need 3.7.
PYTHONS_VARIABLE = "KBUNDLE_WORLD_PYTHONS"
DEFAULT_EXTRA_PYTHONS = "3.7"


def log(message: str) -> None:
    print(f"[world] {message}", file=sys.stderr, flush=True)


def world_dir() -> Path:
    base = os.environ.get("KBUNDLE_WORLD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kbundle-world"
    )
    return Path(base)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def platform_full() -> str:
    return ".".join(str(x) for x in sys.version_info[:3])


def docker_client():
    import docker

    return docker.from_env(timeout=600)


# --------------------------------------------------------------------------- the world's Pythons


class WorldPythonsError(Exception):
    """KBUNDLE_WORLD_PYTHONS names a Python this machine lacks, or is not understood (``up`` exits 2)."""


@dataclass(frozen=True)
class WorldPython:
    """A CPython of this machine that the channel repackages as a conda ``python``."""

    full: str  # "3.7.16"
    prefix: Path  # its sys.base_prefix: bin/, lib/pythonX.Y, lib/libpython*
    executable: Path

    @property
    def version(self) -> str:
        return ".".join(self.full.split(".")[:2])

    @property
    def tag(self) -> str:
        """``py37``: what build strings of packages made for this Python carry."""
        return "py" + self.version.replace(".", "")

    @property
    def pin(self) -> str:
        """The conda dependency of a package built for this Python alone."""
        major, minor = (int(x) for x in self.version.split("."))
        return f"python >={major}.{minor},<{major}.{minor + 1}.0a0"


def running_python() -> WorldPython:
    """The Python running the world: always in the channel, and the world's ``python``."""
    return WorldPython(platform_full(), Path(sys.base_prefix), Path(sys.executable))


def requested_pythons(value: str | None) -> list[str]:
    """The entries of KBUNDLE_WORLD_PYTHONS (``3.7,3.11`` or absolute paths); the default when unset."""
    raw = DEFAULT_EXTRA_PYTHONS if value is None else value
    entries = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry or entry in entries:
            continue
        if not (re.fullmatch(r"3\.\d+", entry) or os.path.isabs(entry)):
            raise WorldPythonsError(f"{PYTHONS_VARIABLE}: {entry!r} is neither a version like 3.7 nor an absolute path")
        entries.append(entry)
    return entries


def python_candidates(version: str, pyenv_root: Path) -> tuple[list[Path], list[str]]:
    """Interpreters that may be CPython ``version``, best first (pyenv's highest patch, then
    /usr/bin), and the places looked in, for the error."""
    patches = []
    for folder in pyenv_root.glob(f"versions/{version}.*"):
        match = re.fullmatch(re.escape(version) + r"\.(\d+)", folder.name)
        if match:
            patches.append((int(match.group(1)), folder / "bin" / f"python{version}"))
    found = [path for _, path in sorted(patches, reverse=True)] + [Path(f"/usr/bin/python{version}")]
    return found, [f"{pyenv_root}/versions/{version}.*", f"/usr/bin/python{version}"]


def _probe(executable: Path) -> WorldPython | None:
    """What the interpreter says of itself; None when it does not run or is not CPython 3."""
    code = "import json, sys; print(json.dumps([sys.implementation.name, list(sys.version_info[:3]), sys.base_prefix]))"
    try:
        out = subprocess.run([str(executable), "-I", "-c", code], capture_output=True, text=True, timeout=30)
        name, version, prefix = json.loads(out.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if name != "cpython" or version[0] != 3:
        return None
    return WorldPython(".".join(map(str, version)), Path(prefix), executable)


def find_python(entry: str, pyenv_root: Path) -> WorldPython:
    """The interpreter an entry of KBUNDLE_WORLD_PYTHONS means, or WorldPythonsError."""
    if os.path.isabs(entry):
        candidates, looked = [Path(entry)], [entry]
    else:
        candidates, looked = python_candidates(entry, pyenv_root)
    for path in candidates:
        found = _probe(path) if path.is_file() else None
        if found and (os.path.isabs(entry) or found.version == entry):
            return found
    raise WorldPythonsError(
        f"{PYTHONS_VARIABLE} asks for {entry}, which is not on this machine (looked in {', '.join(looked)})"
    )


def world_pythons() -> list[WorldPython]:
    """The running Python and every one KBUNDLE_WORLD_PYTHONS asks for, one per X.Y, oldest first.

    The running one wins its X.Y, so that the world's ``python`` stays the tests' own."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv"))
    chosen = {sys.version_info[:2]: running_python()}
    for entry in requested_pythons(os.environ.get(PYTHONS_VARIABLE)):
        if not os.path.isabs(entry) and tuple(int(x) for x in entry.split(".")) in chosen:
            continue
        found = find_python(entry, pyenv_root)
        key = tuple(int(x) for x in found.version.split("."))
        if key in chosen and chosen[key].prefix != found.prefix:
            raise WorldPythonsError(
                f"{PYTHONS_VARIABLE} asks for {entry}, a CPython {found.version}, and the world has "
                f"{chosen[key].executable} for {found.version} already"
            )
        chosen.setdefault(key, found)
    return [chosen[key] for key in sorted(chosen)]


def world_python_versions() -> list[str]:
    """``["3.7", "3.11"]``: what ``up`` lists as ``pythons``."""
    return [p.version for p in world_pythons()]
