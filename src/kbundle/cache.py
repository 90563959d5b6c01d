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
