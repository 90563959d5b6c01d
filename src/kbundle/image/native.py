"""`run --native`: the bundle's environment installed on this host, in a prefix kbundle owns.

No container and no image: the conda side is installed by rattler with the prefix as its own
final prefix (image/env.py), the pip: side by the environment's own pip from exactly the wheels
and hashes the image would get (image/wheels.py, image/pipinstall.py `install_on_host`), then
checked as the image is (image/envcheck.py).

- Where: `<kbundle cache>/native/<first 16 hex of the bundle's identity>`, or under
  `--prefix-root PATH` (a shared file system). One prefix per bundle, as one image per bundle.
- Complete: a stamp file (`STAMP`, JSON) is written last; a prefix without it is a run that
  died half-way, removed and installed again. A complete prefix is reused as it is.
- Concurrent runs of one bundle: an `flock` on `<root>/<key>.lock` beside the prefix; the first
  installs, the others wait and reuse.
- Activation: what `templates/kbundle-activate.sh` does in an image, as a kernelspec's `env`
  (`activation`): PATH, CONDA_PREFIX, and the env's own CUDA libraries on LD_LIBRARY_PATH.

This module does the work; flows/native.py decides when (after consent) and registers the kernel.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from kbundle.atomic import write_atomic
from kbundle.cache import cache_root
from kbundle.errors import KbundleError, UsageError

STAMP = ".kbundle-native.json"  # written last: its presence means the prefix is complete
NATIVE_DIR = "native"
KEY_LENGTH = 16


def native_root(given: Optional[Path] = None) -> Path:
    """Where native prefixes live: `--prefix-root`, else kbundle's cache."""
    if given is None:
        return cache_root() / NATIVE_DIR
    path = Path(given).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.exists() and not path.is_dir():
        raise UsageError(f"--prefix-root {given}: not a directory")
    return path


def key_of(bundle_hash: str) -> str:
    """The prefix's folder name: the bundle identity's first hex digits, as image tags use them."""
    digest = bundle_hash.split(":", 1)[-1].lower()
    if len(digest) < KEY_LENGTH or any(c not in "0123456789abcdef" for c in digest):
        raise KbundleError(f"the bundle's identity {bundle_hash[:80]!r} is not a hex digest")
    return digest[:KEY_LENGTH]


def prefix_for(bundle_hash: str, root: Path) -> Path:
    return root / key_of(bundle_hash)


def stamp_of(prefix: Path) -> Optional[dict]:
    """The completion stamp of `prefix`, or None when the prefix is absent or incomplete."""
    try:
        data = json.loads((prefix / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(prefix: Path) -> bool:
    return stamp_of(prefix) is not None and (prefix / "conda-meta").is_dir()


def write_stamp(prefix: Path, **facts) -> None:
    """The last file written: from here on the prefix is complete."""
    from kbundle import __version__

    data = dict(facts, kbundle_version=__version__, installed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_atomic(prefix / STAMP, json.dumps(data, indent=1) + "\n")


def is_ours(prefix: Path) -> bool:
    """Whether `prefix` is a native prefix kbundle may remove: complete (stamped), or half-made
    in a native root (a folder named by a bundle identity's first hex digits)."""
    if (prefix / STAMP).is_file():
        return True
    name = prefix.name
    return len(name) == KEY_LENGTH and all(c in "0123456789abcdef" for c in name) and prefix.parent.name == NATIVE_DIR


def lock_path(prefix: Path) -> Path:
    return prefix.parent / f"{prefix.name}.lock"


@contextmanager
def locked(prefix: Path, on_wait=None) -> Iterator[None]:
    """An exclusive `flock` on the prefix's lock file for the block; `on_wait()` when another holds it.
    The kernel drops it however the holder ends, so a killed run never leaves the others waiting."""
    path = lock_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def busy(prefix: Path) -> bool:
    """Whether a run holds the prefix's lock now (installing it): gc and remove leave it alone."""
    path = lock_path(prefix)
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def remove(prefix: Path) -> None:
    """Remove a prefix: the stamp first, so a half-removed prefix is never taken as complete."""
    (prefix / STAMP).unlink(missing_ok=True)
    shutil.rmtree(prefix, ignore_errors=True)
    if prefix.exists():
        shutil.rmtree(prefix)  # say why (permissions) when it cannot go


def size_of(prefix: Path) -> int:
    """Bytes under `prefix`, each inode once (hard links into rattler's cache count once)."""
    seen, total = set(), 0
    for folder, _dirs, files in os.walk(prefix):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


# ----------------------------------------------------------------- this host


def host_virtual_packages() -> tuple[str, ...]:
    """This machine's virtual packages as rattler detects them (its glibc, its driver's CUDA, its
    CPU), `name=version=build`, with conda's CONDA_OVERRIDE_* variables honoured: what an
    unlocked bundle is solved against for `run --native`."""
    from rattler.virtual_package import VirtualPackage, VirtualPackageOverrides

    try:
        detected = VirtualPackage.detect(VirtualPackageOverrides.from_env())
    except Exception as exc:  # a detector that fails is named, never a traceback
        from kbundle.errors import first_line

        raise KbundleError(f"cannot read this machine's virtual packages (glibc, CUDA): {first_line(exc)}") from None
    found = []
    for package in detected:
        generic = package.into_generic()
        found.append(f"{generic.name.normalized}={generic.version}={generic.build_string or '0'}")
    return tuple(found)


def check_platform() -> None:
    """Native prefixes hold linux-64 packages: refuse any other machine before any work."""
    import platform
    import sys

    from kbundle import contract

    machine = platform.machine().lower()
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "amd64"):
        raise UsageError(
            f"--native installs the bundle's {contract.PLATFORM} packages, and this machine is "
            f"{sys.platform}/{machine}: run it in Docker or Podman instead"
        )


def described(virtual_packages: Sequence[str]) -> str:
    """`glibc 2.36, CUDA 12.2` (or `CUDA none`) from virtual packages, for the review (pure)."""
    found = {v.split("=")[0]: v.split("=")[1] if "=" in v else "" for v in virtual_packages}
    return f"glibc {found.get('__glibc', 'unknown')}, CUDA {found.get('__cuda', 'none')}"


# ----------------------------------------------------------------- activation


def nvidia_lib_dirs(prefix: Path) -> list[Path]:
    """The lib folders of pip's nvidia-* wheels in the env (nvidia/<part>/lib), as the image's activation finds them."""
    return sorted(p for p in prefix.glob("lib/python3*/site-packages/nvidia/*/lib") if p.is_dir())


def activation(prefix: Path, env_libs: bool, nvidia_libs: Sequence[Path] = ()) -> dict[str, str]:
    """The kernelspec `env` that activates `prefix` as templates/kbundle-activate.sh does in an image
    (pure): PATH with the env's bin/ first (`${PATH}` is filled in by Jupyter when the kernel
    starts), CONDA_PREFIX, and LD_LIBRARY_PATH with the env's own CUDA libraries: the pip
    nvidia-* wheels' lib folders, and the env's lib/ when the bundle says it holds a conda CUDA
    runtime (`cuda_env_libs`, KBUNDLE_ENV_LIBS=1 in the image); where there are any, they replace
    the user's own LD_LIBRARY_PATH: the kernel sees the libraries its environment brings.

    The interpreter sees the locked environment only, as in an image: the PYTHONPATH and
    PYTHONHOME of the process that starts the kernel (a Jupyter started under an HPC module, a
    shell with another env activated) are emptied (CPython reads an empty one as unset), and the
    user's own site-packages (`pip install --user`, which Python puts before the env's) are off."""
    libs = [str(p) for p in nvidia_libs]
    if env_libs:
        libs.insert(0, str(prefix / "lib"))
    env = {
        "PATH": f"{prefix / 'bin'}{os.pathsep}${{PATH}}",
        "CONDA_PREFIX": str(prefix),
        "CONDA_DEFAULT_ENV": str(prefix),
        "PYTHONPATH": "",
        "PYTHONHOME": "",
        "PYTHONNOUSERSITE": "1",
    }
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    return env


def activate_scripts(prefix: Path) -> list[str]:
    """The env's `etc/conda/activate.d` scripts: an image's entrypoint sources them; a native
    kernel's spec cannot, so run says which."""
    folder = prefix / "etc" / "conda" / "activate.d"
    return sorted(p.name for p in folder.glob("*.sh")) if folder.is_dir() else []
