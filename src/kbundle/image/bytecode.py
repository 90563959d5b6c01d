"""Byte-compile the installed environment on the host, through a shared .pyc cache.

Why: the kernel runs as the invoking user over a root-owned env, so Python could never
cache bytecode there, and every kernel start would recompile ipykernel and its friends
(about a second). conda compiles noarch packages at install time; rattler does not.

The env's own interpreter compiles (so the magic number is right), recording paths as the
in-image prefix, with hash-based validation so the files stay valid whatever timestamps
the image ends up with. A .pyc is then a pure function of (interpreter, path in the env,
source bytes), so it is cached under that key and hard-linked into the next env that
holds the same file: a second bundle sharing packages compiles almost nothing.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import contract

# Above this share of files to compile, one parallel pass over the whole lib/ beats a file list.
WHOLE_DIR_SHARE = 0.5


@dataclass(frozen=True)
class CompileStats:
    linked: int = 0
    compiled: int = 0
    seconds: float = 0.0
    skipped: Optional[str] = None  # why nothing was compiled


def _cache_tag(target: Path) -> Optional[str]:
    """'cpython-311' from lib/python3.11 (CPython's own naming of __pycache__ files)."""
    libs = sorted(p.name for p in (target / "lib").glob("python3.*") if p.is_dir())
    if not libs:
        return None
    major, minor = libs[-1][len("python") :].split(".")[:2]
    return f"cpython-{major}{minor}"


def _pyc_path(source: Path, tag: str) -> Path:
    return source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"


def _key(rel: str, data: bytes) -> str:
    return hashlib.sha256(rel.encode() + b"\0" + hashlib.sha256(data).digest()).hexdigest()[:40]


def _link(src: Path, dest: Path) -> bool:
    try:
        dest.parent.mkdir(exist_ok=True)
        os.link(src, dest)
        return True
    except FileExistsError:
        return True
    except OSError:
        return False


def _store(pyc: Path, cached: Path) -> None:
    """Put a freshly compiled file into the cache without ever exposing a partial one."""
    if cached.exists() or not pyc.exists():
        return
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    try:
        os.link(pyc, tmp)
        os.replace(tmp, cached)
    except OSError:
        tmp.unlink(missing_ok=True)


def _run_compileall(python: Path, target: Path, only: Optional[list[Path]]) -> subprocess.CompletedProcess:
    scrubbed = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    command = [
        str(python),
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "checked-hash",
        "-s",
        str(target),
        "-p",
        contract.PREFIX,
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        if only is None:
            command.append(str(target / "lib"))
        else:
            listing.write("".join(f"{p}\n" for p in only))
            command += ["-i", listing.name]
    try:
        # A non-zero exit only means some file did not compile (test data, Python 2 leftovers), as with conda.
        return subprocess.run(command, capture_output=True, text=True, env=scrubbed)
    finally:
        os.unlink(listing.name)


def compile_env(target: Path, cache: Path, interpreter_id: str) -> CompileStats:
    """Link cached .pyc files into `target`, compile the rest with the env's python, cache them.

    `interpreter_id` names the exact interpreter (e.g. the python package's sha256)."""
    t0 = time.perf_counter()
    python = target / "bin" / "python"
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return CompileStats(
            skipped=f"this host ({sys.platform}/{platform.machine()}) cannot run the linux-64 interpreter"
        )
    tag = _cache_tag(target)
    if not python.exists() or tag is None:
        return CompileStats(skipped="the environment has no CPython")
    store = cache / interpreter_id[:24]
    store.mkdir(parents=True, exist_ok=True)
    sources = [p for p in (target / "lib").rglob("*.py") if p.is_file() and not p.is_symlink()]
    keys: dict[Path, Path] = {}
    linked, misses = 0, []
    for source in sources:
        cached = store / f"{_key(source.relative_to(target).as_posix(), source.read_bytes())}.pyc"
        keys[source] = cached
        if cached.exists() and _link(cached, _pyc_path(source, tag)):
            linked += 1
        else:
            misses.append(source)
    if misses:
        whole = len(misses) > WHOLE_DIR_SHARE * max(len(sources), 1)
        proc = _run_compileall(python, target, None if whole else misses)
        compiled = [s for s in misses if _pyc_path(s, tag).exists()]
        if not compiled and proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            return CompileStats(linked, 0, time.perf_counter() - t0, reason)
        for source in compiled:
            _store(_pyc_path(source, tag), keys[source])
        return CompileStats(linked, len(compiled), time.perf_counter() - t0)
    return CompileStats(linked, 0, time.perf_counter() - t0)
