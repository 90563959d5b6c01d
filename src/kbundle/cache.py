"""kbundle's cache directory, shared by every stage: packages, wheels, bytecode, build contexts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional


def cache_root(environ: Optional[Mapping[str, str]] = None) -> Path:
    """The user's kbundle cache; `KBUNDLE_CACHE_DIR` moves it (tests and benchmarks use a fresh one)."""
    env = os.environ if environ is None else environ
    override = env.get("KBUNDLE_CACHE_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir  # imported late: the kernel launcher starts on every kernel start

    return Path(user_cache_dir("kbundle"))


def contexts_dir() -> Path:
    """Where `kbundle run` assembles build contexts; `kbundle gc` sweeps what an interrupted run left."""
    return cache_root() / "contexts"


def pycache_root(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Per-image bytecode caches of kernels whose env has no .pyc; `kbundle gc` sweeps unused ones."""
    return cache_root(environ) / "pycache"


# What `kbundle gc --cache` empties: all of it is fetched or computed again when a build
# needs it. Left out: build contexts (a build may be writing one; gc sweeps stale ones),
# kernels' bytecode (running kernels mount it; gc sweeps unused ones) and the recorded pip
# resolutions (a few bytes that the kernelspec's metadata is made from).
DOWNLOAD_CACHES = {
    "pkgs": "conda packages",
    "repodata": "channel metadata",
    "wheels": "pip wheels",
    "built": "wheels built from git requirements",
    "pyc": "byte-compiled environments",
}


def download_caches(environ: Optional[Mapping[str, str]] = None) -> list[tuple[Path, str]]:
    """(directory, what it holds) for each of DOWNLOAD_CACHES that exists."""
    root = cache_root(environ)
    return [(root / name, what) for name, what in DOWNLOAD_CACHES.items() if (root / name).is_dir()]
