"""The one entry by which pack reads the sender's environment file, whatever its format.

pack/formats.py knows the formats and sends each file to its own reader: environment.yml
(pack/envyml.py), requirements files (pack/reqfile.py), pyproject.toml (pack/pyproject.py),
uv.lock (pack/uvlock.py), pixi.lock, conda-lock.yml and pixi.toml (pack/pixilock.py). No
reader imports this module or formats, so the readers stay a tree."""

from __future__ import annotations

from pathlib import Path

from kbundle.pack import formats
from kbundle.pack.records import RawEnv


def read_env_file(path: Path, python: str | None = None, hints=None) -> RawEnv:
    """Any environment file: pack/formats.py sends it to its reader."""
    return formats.read_any(path, python, hints)


def read_requirements(path: Path, python: str | None, hints=None) -> RawEnv:
    """A requirements file, by pip's rules (pack/reqfile.py)."""
    return formats.read_requirements(path, python, hints)
