"""What every part of the world shares: where it is cached, its Python, its log, the Docker client."""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
