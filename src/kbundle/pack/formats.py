"""Every environment format pack reads, and which file beside a notebook describes its environment.

`-e FILE` goes to its reader by name (and, for YAML, by content): requirements files, pyproject.toml,
uv.lock, pixi.lock, conda-lock.yml, pixi.toml, or a conda environment.yml.

Beside the notebook (its folder, else a folder above it up to its git repository's root), a
lock beats its manifest, and an exact environment a loose one: pixi.lock, uv.lock,
conda-lock.yml, environment.yml, requirements.txt, pyproject.toml (one that lists dependencies
or is pixi's manifest), pixi.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.pipenv import Hints
from kbundle.pack.records import RawEnv
from kbundle.pack.textfiles import read_text

BESIDE = (
    "pixi.lock",
    "uv.lock",
    "conda-lock.yml",
    "environment.yml",
    "environment.yaml",
    "requirements.txt",
    "pyproject.toml",
    "pixi.toml",
)
_LEVELS = 4  # folders above the notebook's that may hold its project's files


def read_any(path: Path, python: str | None = None, hints: Hints | None = None) -> RawEnv:
    if not path.exists():
        raise UsageError(f"environment file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"environment file {path} is not a file")
    hints = hints or Hints(python=python)
    reader = reader_for(path)
    if hints.extras and reader not in ("pyproject", "uv.lock"):
        raise UsageError(f"--extra applies to a pyproject.toml or uv.lock, not {path.name}")
    if reader == "environment.yml":
        from kbundle.pack.envyml import read_environment_yml

        return read_environment_yml(path)
    try:
        return _read(path, reader, hints)
    except (AttributeError, TypeError, KeyError, IndexError) as exc:  # a table of an unexpected shape
        if os.environ.get("KBUNDLE_DEBUG"):
            raise
        raise UsageError(
            f"{path.name}: kbundle cannot read it ({type(exc).__name__}: {exc}); is it as its tool wrote it?"
        ) from None


def _read(path: Path, reader: str, hints: Hints) -> RawEnv:
    if reader == "requirements":
        return read_requirements(path, hints.python, hints)
    if reader == "uv.lock":
        from kbundle.pack.uvlock import read_uv_lock

        return read_uv_lock(path, hints)
    if reader == "lock":
        from kbundle.pack.pixilock import read_lock

        return read_lock(path, hints)
    if reader == "pixi.toml":
        from kbundle.pack.pixilock import read_pixi_manifest

        return read_pixi_manifest(path, hints)
    from kbundle.pack.pyproject import load_toml, read_pyproject

    if "pixi" in (load_toml(path).get("tool") or {}):  # a pyproject.toml with [tool.pixi] is pixi's manifest
        from kbundle.pack.pixilock import read_pixi_manifest

        return read_pixi_manifest(path, hints)
    return read_pyproject(path, hints)


def reader_for(path: Path) -> str:
    """requirements, uv.lock, lock (pixi.lock, conda-lock.yml), pixi.toml, pyproject, or environment.yml."""
    name = path.name.lower()
    if name.endswith((".txt", ".in")) or name.startswith("requirements"):
        return "requirements"
    if name.endswith("uv.lock"):
        return "uv.lock"
    if name.endswith(("pixi.lock", "conda-lock.yml", "conda-lock.yaml")):
        return "lock"
    if name == "pixi.toml":
        return "pixi.toml"
    if name.endswith(".toml"):
        return "pyproject"
    if name.endswith((".yml", ".yaml", ".lock")):
        from kbundle.pack.pixilock import is_lock_yaml

        if is_lock_yaml(read_text(path)):
            return "lock"
    return "environment.yml"


def read_requirements(path: Path, python: str | None, hints: Hints | None = None) -> RawEnv:
    """A requirements file, by pip's rules, for the Python --python or the notebook names."""
    from kbundle.pack.pipenv import choose_python, pip_env
    from kbundle.pack.reqfile import read_requirements_file

    hints = hints or Hints(python=python)
    version, where = choose_python(hints, f"{path.name} (a requirements file)")
    reading = read_requirements_file(path, version)
    reading.notes.insert(0, f"python {version}: from {where}")
    header = f"read by kbundle from {path.name} (Python {version})"
    return pip_env(version, reading, name=None, source_file=path.name, header=header)


def beside(notebook_dir: Path) -> Path | None:
    """The file that describes the notebook's environment: in its folder, else in a folder above it
    within the same git repository (a project's root, with the notebook in a subfolder)."""
    from kbundle.pack.pyproject import has_dependencies

    for folder in _project_folders(notebook_dir):
        for name in BESIDE:
            path = folder / name
            if path.is_file() and (name != "pyproject.toml" or has_dependencies(path)):
                return path
    return None


def _project_folders(notebook_dir: Path) -> list[Path]:
    chain = [notebook_dir, *notebook_dir.parents][: _LEVELS + 1]
    for i, folder in enumerate(chain):
        if (folder / ".git").exists():
            return chain[: i + 1]
        if folder == Path.home():
            break
    return [notebook_dir]
