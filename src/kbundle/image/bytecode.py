"""Byte-compile the installed environment in a throwaway container, through a shared .pyc cache.

Why: the kernel runs as the invoking user over a root-owned env, so Python could never
cache bytecode there, and every kernel start would recompile ipykernel and its friends
(about a second). conda compiles noarch packages at install time; rattler does not.

Nothing from the bundle runs on the host: the env's own interpreter (so the magic number
is right) runs in a throwaway container of the base image (image/sandbox.py), with the env
mounted read-only at its final prefix, no network, no capabilities, no new privileges, not
as root, and one empty writable folder where `-X pycache_prefix` sends the .pyc files. It runs `-I -S`:
no site module, so no `.pth` file and no sitecustomize is read. The host then copies
back only regular files, for the sources it asked for.

A .pyc is a pure function of (compiler, path in the env, source bytes), so it is cached
under that key and hard-linked into the next env that holds the same file: a second
bundle sharing packages compiles almost nothing, and its .pyc files are the same bytes, so
the image layers that hold them are the same layers (image/layers.py). A .pyc a conda
package shipped is replaced by kbundle's: every env gets the same file for the same source,
and a hash-checked one, which the fixed file times of the build context cannot make stale. The compiler is the base image plus
every package that can change what the interpreter runs with `-I -S` (anything outside
site-packages, bin/ scripts and data): a bundle that ships a doctored stdlib or libc
gets a cache of its own and cannot poison another bundle's bytecode.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import contract

# Above this share of files to compile, one parallel pass over the whole lib/ beats a file list.
WHOLE_DIR_SHARE = 0.5
OUT_IN_CONTAINER = "/kbundle-pyc"  # the one writable mount: where the .pyc files go
# Package files that the interpreter never reads when it runs `-I -S -m compileall`.
INERT_PREFIXES = (
    "site-packages/",
    "python-scripts/",
    "share/",
    "include/",
    "man/",
    "info/",
    "conda-meta/",
    "etc/conda/",
)


@dataclass(frozen=True)
class CompileStats:
    linked: int = 0
    compiled: int = 0
    seconds: float = 0.0
    skipped: Optional[str] = None  # why nothing was compiled
    damaged: tuple[str, ...] = ()  # cached .pyc files that failed their digest: removed and compiled again


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


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _cached_files(store: Path) -> dict[str, Path]:
    """The store's .pyc files by key. Each is named `<key>.<digest of its own bytes>.pyc`, so that
    a damaged one (a truncated or altered body, which Python would only meet as a crash at
    import) is recognised before it is linked into an env."""
    found = {}
    for name in os.listdir(store):
        key, _, rest = name.partition(".")
        if rest.endswith(".pyc") and len(rest) == len(".pyc") + 32:
            found[key] = store / name
    return found


def _intact(cached: Path) -> bool:
    try:
        data = cached.read_bytes()
    except OSError:
        return False
    return cached.name.split(".")[1] == _digest(data)


def _link(src: Path, dest: Path) -> bool:
    """The cached .pyc at `dest`, in place of whatever was there (a .pyc the package shipped)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    try:
        dest.parent.mkdir(exist_ok=True)
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dest)  # a rename: the old file's other links (rattler's cache) keep their bytes
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _store(pyc: Path, store: Path, key: str) -> None:
    """Put a freshly compiled file into the cache, named by its digest, never exposing a partial one."""
    try:
        cached = store / f"{key}.{_digest(pyc.read_bytes())}.pyc"
    except OSError:
        return
    if cached.exists():
        return
    tmp = store / f".{cached.name}.{os.getpid()}"
    try:
        os.link(pyc, tmp)
        os.replace(tmp, cached)
    except OSError:
        tmp.unlink(missing_ok=True)


def inert(path: str, site_packages: str) -> bool:
    """Whether an installed file cannot change what `python -I -S -m compileall` runs."""
    if path.startswith(site_packages + "/"):
        return True
    if path.startswith("bin/"):
        name = path[4:]
        return not name.startswith(("python", "pyvenv")) and "/" not in name
    return path.startswith(INERT_PREFIXES)


def compiler_id(target: Path, interpreter_id: str, image_id: str) -> str:
    """The compiler: base image, python package, and every package that reaches its startup."""
    libs = sorted(p.name for p in (target / "lib").glob("python3.*") if p.is_dir())
    site = f"lib/{libs[-1]}/site-packages" if libs else "site-packages"
    parts = [interpreter_id, image_id]
    for meta in sorted((target / "conda-meta").glob("*.json")):
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            parts.append(meta.name + ":unreadable")
            continue
        if not all(inert(str(f), site) for f in record.get("files") or []):
            parts.append(f"{record.get('sha256') or record.get('md5') or meta.name}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def compile_env(target: Path, cache: Path, interpreter_id: str, *, client=None, image: str = "") -> CompileStats:
    """Link cached .pyc files into `target`, compile the rest in a container of `image`, cache them.

    `interpreter_id` names the exact interpreter (e.g. the python package's sha256)."""
    t0 = time.perf_counter()
    tag = _cache_tag(target)
    if not (target / "bin" / "python").exists() or tag is None:
        return CompileStats(skipped="the environment has no CPython")
    if client is None or not image:
        return CompileStats(skipped="no container engine to compile in")
    try:
        image_id = client.images.get(image).id
    except Exception as exc:
        return CompileStats(skipped=f"base image {image} is not available: {exc}")
    store = cache / compiler_id(target, interpreter_id, image_id)
    store.mkdir(parents=True, exist_ok=True)
    sources = [p for p in (target / "lib").rglob("*.py") if p.is_file() and not p.is_symlink()]
    cached_files = _cached_files(store)
    keys: dict[Path, str] = {}
    linked, misses, damaged = 0, [], []
    for source in sources:
        rel = source.relative_to(target).as_posix()
        keys[source] = key = _key(rel, source.read_bytes())
        cached = cached_files.get(key)
        if cached is not None and not _intact(cached):
            damaged.append(rel)
            cached.unlink(missing_ok=True)
            cached = None
        if cached is not None and _link(cached, _pyc_path(source, tag)):
            linked += 1
        else:
            misses.append(source)
    if not misses:
        return CompileStats(linked, 0, time.perf_counter() - t0)
    whole = len(misses) > WHOLE_DIR_SHARE * max(len(sources), 1)
    with tempfile.TemporaryDirectory(prefix=".kbundle-pyc-", dir=target.parent) as out:
        error = _compile_in_container(client, image, target, Path(out), None if whole else misses)
        compiled = [s for s in misses if _take(Path(out), target, s, tag)]
    if not compiled and error:
        return CompileStats(linked, 0, time.perf_counter() - t0, error, tuple(damaged))
    for source in compiled:
        _store(_pyc_path(source, tag), store, keys[source])
    return CompileStats(linked, len(compiled), time.perf_counter() - t0, damaged=tuple(damaged))


def _in_image(target: Path, path: Path) -> str:
    return f"{contract.PREFIX}/{path.relative_to(target).as_posix()}"


def _take(out: Path, target: Path, source: Path, tag: str) -> bool:
    """Copy the container's .pyc for `source` into the env: a regular file only, never a link."""
    produced = out / _in_image(target, source).lstrip("/")
    produced = produced.parent / f"{source.stem}.{tag}.pyc"
    try:
        fd = os.open(produced, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return False
            data = fh.read()
    except OSError:
        return False
    dest = _pyc_path(source, tag)
    dest.parent.mkdir(exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    tmp.write_bytes(data)  # written by kbundle, owned by the invoker: not the container's file
    os.replace(tmp, dest)
    return True


# Python 3.7 has checked-hash .pyc files (PEP 552) but no pycache_prefix: this writes each one
# where pycache_prefix would have (OUT/<source's folder>/<stem>.<tag>.pyc), in parallel.
LEGACY_COMPILER = """
import os, py_compile, sys
from concurrent.futures import ProcessPoolExecutor
def one(src):
    tag = sys.implementation.cache_tag
    name = os.path.splitext(os.path.basename(src))[0] + '.' + tag + '.pyc'
    cfile = os.path.join(sys.argv[2], os.path.dirname(src).lstrip('/'), name)
    try:
        py_compile.compile(src, cfile=cfile, dfile=src, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        return 0
    except Exception:
        return 1
with open(sys.argv[1]) as fh:
    sources = [line.strip() for line in fh if line.strip()]
with ProcessPoolExecutor() as pool:
    failed = sum(pool.map(one, sources, chunksize=64))
sys.exit(1 if failed else 0)
"""


def _python_of(target: Path) -> tuple[int, int]:
    """The env's Python as (major, minor), from its lib/pythonX.Y folder; (3, 99) when unknown."""
    for folder in sorted((target / "lib").glob("python3.*")):
        minor = folder.name.removeprefix("python3.")
        if minor.isdigit() and (folder / "os.py").exists():
            return (3, int(minor))
    return (3, 99)


def _compile_in_container(client, image: str, target: Path, out: Path, only: Optional[list[Path]]) -> Optional[str]:
    """Run compileall in a locked-down throwaway container; the error's last line, or None."""
    import docker

    from kbundle.image import sandbox

    user = sandbox.user()
    if _python_of(target) < (3, 8):  # no pycache_prefix before 3.8: name each .pyc's place ourselves
        only = only if only is not None else [p for p in (target / "lib").rglob("*.py") if p.is_file()]
        (out / ".sources").write_text("".join(f"{_in_image(target, p)}\n" for p in only), encoding="utf-8")
        args = ["-I", "-S", "-c", LEGACY_COMPILER, f"{OUT_IN_CONTAINER}/.sources", OUT_IN_CONTAINER]
    else:
        args = ["-I", "-S", "-X", f"pycache_prefix={OUT_IN_CONTAINER}", "-m", "compileall", "-q", "-j", "0"]
        args += ["--invalidation-mode", "checked-hash"]
        if only is None:
            args.append(f"{contract.PREFIX}/lib")
        else:
            (out / ".sources").write_text("".join(f"{_in_image(target, p)}\n" for p in only), encoding="utf-8")
            args += ["-i", f"{OUT_IN_CONTAINER}/.sources"]
    if user == sandbox.NOBODY:
        os.chown(out, 65534, 65534)
    try:
        outcome = sandbox.run(
            client,
            image,
            args,
            entrypoint=[f"{contract.PREFIX}/bin/python"],
            mounts={str(target): (contract.PREFIX, "ro"), str(out): (OUT_IN_CONTAINER, "rw")},
            environment={},
            label=contract.LABEL_BYTECODE,
            run_as=user,
        )
    except docker.errors.DockerException as exc:
        return str(getattr(exc, "explanation", None) or exc).splitlines()[0]
    if outcome.status == 0:
        return None
    # A non-zero exit only means some file did not compile (test data, Python 2 leftovers), as with conda.
    return (outcome.stderr.strip().splitlines() or [f"exit {outcome.status}"])[-1]
