"""The conda environment of the image, installed on the host with py-rattler.

Downloads happen here, on the host, where the user's proxy variables and CA trust live;
the image build then only COPYs the finished prefix. Packages go through one shared cache
(platformdirs' user cache dir), so a second bundle that shares packages only links them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kbundle import contract, net
from kbundle.cache import cache_root
from kbundle.display import safe
from kbundle.errors import KbundleError, first_line
from kbundle.image import provenance
from kbundle.image.unpackers import Unpackers

FETCH_WORKERS = 8  # parallel package downloads
# Mode bits no file of a package keeps: write for group and others (a package is nobody's to
# change after it is checked; the cache is shared by every bundle, and files are hard-linked from
# it into envs), and setuid/setgid (nothing in an env is meant to run with its owner's rights).
_STRIPPED_BITS = stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class EnvSpec:
    """What the bundle says about its conda environment."""

    channels: tuple[str, ...]
    dependencies: tuple[str, ...]
    lock_text: Optional[str] = None  # the bundle's rattler lock, when it was locked
    target: tuple[str, ...] = ()  # the image's virtual packages, for an unlocked solve


@dataclass(frozen=True)
class ResolvedEnv:
    records: tuple  # rattler RepoDataRecords for linux-64, in a stable order
    locked: bool  # True: taken from the bundle's lock; False: solved on this host

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def content_hash(self) -> str:
        """A hash of exactly what gets installed: every package's URL and checksum."""
        lines = sorted(
            f"{r.url} {r.sha256.hex() if r.sha256 else ''} {r.md5.hex() if r.md5 else ''}" for r in self.records
        )
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def interpreter_id(self) -> str:
        """Names the exact python package, so compiled bytecode can be shared between envs."""
        for r in self.records:
            if str(r.name.normalized) == "python":
                return r.sha256.hex() if r.sha256 else hashlib.sha256(str(r.url).encode()).hexdigest()
        return "no-python"

    def python_version(self) -> Optional[str]:
        for r in self.records:
            if str(r.name.normalized) == "python":
                parts = str(r.version).split(".")
                return ".".join(parts[:2])
        return None


def package_cache_dir() -> Path:
    path = cache_root() / "pkgs"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------- resolve


def resolve(spec: EnvSpec) -> ResolvedEnv:
    """The bundle's lock exactly when it has one; otherwise a solve for the image's platform.

    An unlocked bundle is solved against the image's virtual packages (its glibc and CUDA,
    as the manifest records them), never this host's: the environment runs in the image."""
    from kbundle import solve

    if spec.lock_text:
        check_lock_text(spec.lock_text)
        records = tuple(solve.records_from_lock(spec.lock_text))
        check_records(records, spec.channels)
        return ResolvedEnv(records, locked=True)
    if not spec.channels:
        raise KbundleError("the bundle is not locked and names no channels to solve from")
    try:
        records = asyncio.run(
            solve.solve(spec.channels, spec.dependencies, spec.target, cache_dir=cache_root() / "repodata")
        )
    except KbundleError as exc:
        raise KbundleError(f"cannot solve the bundle's environment for {contract.PLATFORM}: {exc}") from None
    except Exception as exc:
        raise KbundleError(
            f"cannot solve the bundle's environment for {contract.PLATFORM}: {first_line(exc)}"
        ) from None
    check_records(records, spec.channels)
    return ResolvedEnv(tuple(records), locked=False)


def check_lock_text(text: str) -> None:
    """Refuse a lock that names a path or a non-http location, before rattler parses it."""
    import yaml

    from kbundle.bundle import BundleError
    from kbundle.resources import yaml_loader

    try:
        raw = yaml.load(text, Loader=yaml_loader())  # libyaml's: a lock runs to thousands of lines
    except yaml.YAMLError:
        raise BundleError("the bundle's lock is not YAML") from None
    problem = provenance.lock_problem(raw)
    if problem:
        raise BundleError(problem)


def check_records(records, channels) -> None:
    """Every package must come from one of the bundle's declared channels, under a plain file name."""
    from kbundle.bundle import BundleError

    for record in records:
        problem = provenance.record_problem(str(record.url), str(record.file_name), channels)
        if problem:
            raise BundleError(problem)


# ----------------------------------------------------------------- install


@dataclass(frozen=True)
class InstallStats:
    packages: int
    seconds: float
    early: Any = None  # what the EarlyLink's work returned


def dependency_closure(records, roots: Iterable[str]) -> frozenset[str]:
    """The names of `roots` and of every record they depend on, within `records` (pure)."""
    by_name = {str(r.name.normalized): r for r in records}
    seen: set[str] = set()
    todo = [name for name in roots if name in by_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in by_name[name].depends:
            wanted = dep.split()[0].split("[")[0].lower()  # a match spec starts with its package's name
            if wanted in by_name and wanted not in seen:
                todo.append(wanted)
    return frozenset(seen)


class EarlyLink:
    """A part of the environment linked as soon as its packages are unpacked, and work that runs
    while the rest unpack and link. `run --native`: python and pip (and what they need) first, so
    that the pip: section installs beside conda's last packages instead of after them.

    rattler's second install links only what the first left out: it keeps the first one's
    packages, and any file pip wrote meanwhile."""

    def __init__(self, records, names: frozenset[str], then: Callable[[], Any]):
        self.records = [r for r in records if str(r.name.normalized) in names]
        self._waiting = {str(r.name.normalized) for r in self.records}
        self._then = then
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._where: Optional[tuple[Path, Optional[str]]] = None
        self.linked = threading.Event()
        self.error: Optional[BaseException] = None
        self.result: Any = None

    def begin(self, target: Path, final_prefix: Optional[str]) -> None:
        self._where = (target, final_prefix)

    def ready(self, record) -> None:
        """One package is in the cache, vetted or unpacked (from any thread)."""
        with self._lock:
            self._waiting.discard(str(record.name.normalized))
            if self._waiting or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="kbundle-early-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        target, final_prefix = self._where
        try:
            for record in self.records:  # vetted before anything links it, as vet_packages does
                paths = _cached_paths(record)
                if paths is None:
                    raise KbundleError(f"cannot read the file list of {safe(record.file_name)} after unpacking it")
                _check_paths(record, paths)
            _link(self.records, target, final_prefix)
        except BaseException as exc:
            self.error = exc
            return
        finally:
            self.linked.set()
        try:
            self.result = self._then()
        except BaseException as exc:
            self.error = exc

    def wait_linked(self) -> None:
        """Until the first part is linked (raising what stopped it)."""
        if self._thread is None:
            return
        self.linked.wait()
        if self.error is not None:
            self.finish()

    def finish(self) -> Any:
        """Until the work is done; its result, or what it raised."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def install(
    env: ResolvedEnv,
    target: Path,
    on_progress=None,
    meter=None,
    final_prefix: Optional[str] = contract.PREFIX,
    early: Optional[EarlyLink] = None,
) -> InstallStats:
    """Install the records into `target`, with `final_prefix` patched in as the final prefix: the
    image's by default; None for a prefix that stays where it is installed (`run --native`).

    `meter` (a progress.Meter) counts the packages fetched and their bytes; `on_progress(done,
    total)` follows rattler's linking. `early` (an EarlyLink): its packages are linked as soon as
    they are unpacked, and its work runs meanwhile; InstallStats.early is what it returned.

    Every package's file list is checked before rattler links it (vet_packages), and the
    installed prefix is checked for symlinks that leave it (check_prefix). Link scripts
    stay off: they would run someone else's code on the host."""
    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    if early is not None:
        early.begin(target, final_prefix)
    try:
        records = vet_packages(env.records, meter, early)
        if early is not None:
            early.wait_linked()
        _link(records, target, final_prefix, _reporter(on_progress) if on_progress else None)
        check_prefix(target, final_prefix or str(target))
        # Packages unpacked before kbundle closed their modes (or files rattler wrote anew, with a
        # prefix patched in) are closed here; a file linked from the cache is closed there too.
        close_modes(target)
    except BaseException:
        if early is not None:  # its work writes into the prefix: it ends before the caller cleans up
            try:
                early.finish()
            except BaseException:
                pass
        raise
    done = early.finish() if early is not None else None
    return InstallStats(env.count, time.perf_counter() - t0, done)


def _link(records, target: Path, final_prefix: Optional[str], reporter=None) -> None:
    """rattler links `records` from its package cache into `target` (no link scripts)."""
    import rattler

    async def go():
        await rattler.install(
            records,
            target_prefix=str(target),
            alternative_target_prefix=final_prefix if final_prefix != str(target) else None,
            cache_dir=package_cache_dir(),
            platform=rattler.Subdir(contract.PLATFORM),
            execute_link_scripts=False,
            show_progress=False,
            client=net.rattler_client(),
            reporter=reporter,
        )

    try:
        asyncio.run(go())
    except Exception as exc:
        raise KbundleError(_install_failure(exc, target)) from None


def _install_failure(exc: BaseException, target: Path) -> str:
    text = first_line(exc)
    if "No space left" in text or "os error 28" in text:
        return f"no space left on device (ENOSPC) installing the environment into {target}: free some space"
    if "Read-only file system" in text or "os error 30" in text:
        return f"read-only file system (EROFS): cannot install the environment into {target}"
    return f"installing the environment failed: {text}"


def check_prefix(target: Path, final_prefix: str = contract.PREFIX) -> None:
    """Refuse an installed prefix holding a symlink that resolves outside it (to a host file, say);
    absolute targets are read against `final_prefix`, where the prefix will live."""
    from kbundle.bundle import BundleError

    for link in provenance.escaping_links(target, final_prefix):
        raise BundleError(
            f"the environment holds a symlink that leaves it: {safe(link)} -> {safe(os.readlink(target / link))}"
        )


# ----------------------------------------------------------------- vetting packages


def vet_packages(records, meter=None, early: Optional[EarlyLink] = None) -> list:
    """The records, each package's paths.json checked before rattler links anything.

    A package already in rattler's cache under the same sha256 is read there, once its files
    pass their check (image/pkgcheck.py: sizes and sha256 against paths.json; a damaged one is
    removed, noted for a warning, and fetched again). Any other is downloaded by kbundle's
    downloader (`_unpack_all`, checked against the lock's sha256) and unpacked once, by
    rattler, into that cache; its paths.json is then read from the unpacked folder. rattler's
    install finds it there and links what was checked: nothing is unpacked twice. Every
    package in the cache, new or found there, has its modes closed (`close_modes`: no group or
    other write, no setuid/setgid) before anything links it."""
    from kbundle.image import healing, pkgcheck

    todo = []
    for record in records:
        cached = _cached_paths(record)
        folder = package_cache_dir() / _stem(record)
        damage = pkgcheck.damaged(folder) if cached is not None else None
        if damage:
            healing.note(
                f"conda package {safe(record.file_name)} in kbundle's cache was damaged ({safe(damage)}): fetched again"
            )
            _forget(record)
            cached = None
        if cached is None:
            todo.append(record)
        else:
            _check_paths(record, cached)
            close_modes(folder)  # unpacked by an older kbundle, maybe
            if early is not None:
                early.ready(record)
    if meter is not None:
        meter.plan_bytes(sum(r.size or 0 for r in todo))
        meter.items(len(records) - len(todo), len(records))
    if todo:
        asyncio.run(_unpack_all(todo, meter, early))
    for record in todo:
        paths = _cached_paths(record)
        if paths is None:
            raise KbundleError(f"cannot read the file list of {safe(record.file_name)} after unpacking it")
        try:
            _check_paths(record, paths)
        except KbundleError:
            _forget(record)  # a refused package must not wait in the cache for the next run
            raise
    return list(records)


async def _unpack_all(records, meter=None, early: Optional[EarlyLink] = None) -> None:
    """Each package fetched by kbundle's one downloader (image/download.py), then unpacked once
    by rattler from that local archive into its cache (`_unpack`).

    rattler's own `download_and_extract` streams a package in one request: a channel that stops
    sending gave a minute of silence and then failed, without retry or resume. The downloader
    breaks a connection that sends no byte for 20 s, continues its `.part` with Range, names the
    stalled host on the progress line every few seconds, and checks the lock's sha256 and size."""
    await asyncio.to_thread(_fetch_and_unpack, list(records), meter, early)


def archive_dir() -> Path:
    """Where conda archives wait (as `.part` files while they download) until rattler unpacks them."""
    path = cache_root() / "conda-archives"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch_and_unpack(records, meter=None, early: Optional[EarlyLink] = None) -> None:
    from kbundle.image import download

    folder = archive_dir()
    by_dest = {}
    first = {str(r.name.normalized) for r in early.records} if early is not None else set()
    # An early link's packages first, then the largest: unpacking is the long pole (a bz2 python
    # takes seconds on one core), and started first it overlaps the many small ones instead of
    # running alone at the end.
    for record in sorted(records, key=lambda r: (str(r.name.normalized) not in first, -(r.size or 0))):
        item = _archive_wanted(record, folder)
        by_dest[item.dest] = (item, record)
    http = download.session(net.ca_for_channels(), FETCH_WORKERS)
    with Unpackers(len(by_dest)) as unpack:  # rattler's extract holds the GIL: unpack elsewhere
        download.fetch_all(
            [item for item, _ in by_dest.values()],
            meter,
            http=http,
            workers=FETCH_WORKERS,
            plan=False,  # vet_packages planned the bytes from the lock's sizes
            after=lambda item, path: _unpacked(by_dest[item.dest][1], path, unpack, early),
        )


def _unpacked(record, archive: Path, unpack, early: Optional[EarlyLink]) -> None:
    _unpack(record, archive, unpack)
    if early is not None:
        early.ready(record)


def _archive_wanted(record, folder: Path):
    """The download of one package's archive: its URL, the lock's sha256 and size, a place in `folder`."""
    from kbundle.image import download
    from kbundle.specs import safe_filename

    if not record.sha256:
        raise KbundleError(f"package {safe(record.file_name)} has no sha256 to verify it against")
    url, auth = download.split_auth(str(record.url))
    name = safe_filename(str(record.file_name), "a conda package's name")
    size = int(record.size) if record.size else None
    return download.Wanted(url, folder / name, bytes(record.sha256).hex(), auth, folder, size)


def _unpack(record, archive: Path, unpack) -> None:
    """One downloaded (and checked) archive unpacked by rattler into its cache (`unpack`: an
    image/unpackers.Unpackers), its modes closed, then stamped as rattler stamps what it
    unpacked; the archive itself is not kept."""
    from kbundle.image import pkgcheck

    expected = bytes(record.sha256)
    folder = package_cache_dir() / _stem(record)
    _forget(record)
    try:
        sha, md5 = unpack(archive, folder)
    except Exception as exc:
        _forget(record)
        raise KbundleError(_unpack_failure(record, exc, folder)) from None
    if sha != expected or (record.md5 and md5 != bytes(record.md5)):
        _forget(record)  # the downloader checked it; the cache is only stamped for what matched
        archive.unlink(missing_ok=True)
        raise KbundleError(f"{safe(record.url)} does not match the checksum the bundle records")
    close_modes(folder)  # before the stamp: the cache only ever holds closed packages
    pkgcheck.record(folder)  # what a later use compares (image/pkgcheck.py)
    # rattler's own cache stamp: a big-endian revision, then the sha256 it was unpacked from.
    (package_cache_dir() / f"{_stem(record)}.lock").write_bytes((1).to_bytes(8, "big") + sha)
    archive.unlink(missing_ok=True)


def close_modes(root: Path) -> int:
    """Take `_STRIPPED_BITS` off every file and folder below `root` (and `root` itself); return how
    many changed. A package's tarball carries modes, and rattler unpacks them as they are: a 0666
    file in the shared cache would let any local user change what the next env links, and
    the image would carry it world-writable. Links are skipped (their own mode means nothing, and
    chmod would follow them)."""
    changed = 0
    try:
        for entry in provenance.entries_below(os.fspath(root)):
            changed += _close_mode(entry.path, entry.stat(follow_symlinks=False).st_mode)
        changed += _close_mode(os.fspath(root), os.lstat(root).st_mode)
    except OSError as exc:
        raise _disk_error(exc, Path(exc.filename or root)) from None
    return changed


def _close_mode(path: str, mode: int) -> int:
    if stat.S_ISLNK(mode) or not mode & _STRIPPED_BITS:
        return 0
    os.chmod(path, stat.S_IMODE(mode) & ~_STRIPPED_BITS)
    return 1


def _unpack_failure(record, exc: BaseException, folder: Path) -> str:
    text = first_line(exc)
    if "No space left" in text or "os error 28" in text:
        return f"no space left on device (ENOSPC) unpacking {safe(record.file_name)} into {folder}: free some space"
    if "sha" in text.lower() and "mismatch" in text.lower():
        return f"{safe(record.url)} does not match the checksum the bundle records"
    return f"cannot download {safe(record.url)}: {text}"


def _forget(record) -> None:
    """Remove a package's cache entry (its folder, stamp and file record), so that only checked packages stay."""
    from kbundle.image import pkgcheck

    cache = package_cache_dir()
    (cache / f"{_stem(record)}.lock").unlink(missing_ok=True)
    pkgcheck.record_path(cache / _stem(record)).unlink(missing_ok=True)
    shutil.rmtree(cache / _stem(record), ignore_errors=True)


def _stem(record) -> str:
    name = str(record.file_name)
    for suffix in (".tar.bz2", ".conda"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cached_paths(record) -> Optional[list[str]]:
    """paths.json of rattler's cached copy, when its lock file records this record's sha256."""
    if not record.sha256:
        return None
    cache = package_cache_dir()
    try:
        stamp = (cache / f"{_stem(record)}.lock").read_bytes()
        if stamp[8:40] != bytes(record.sha256):
            return None
        raw = json.loads((cache / _stem(record) / "info" / "paths.json").read_text(encoding="utf-8"))
        return [str(p.get("_path", "")) for p in raw.get("paths", [])]
    except (OSError, ValueError, AttributeError):
        return None


def _check_paths(record, paths: list[str]) -> None:
    from kbundle.bundle import BundleError

    problem = provenance.paths_problem(str(record.file_name), paths)
    if problem:
        raise BundleError(problem)


def _disk_error(exc: OSError, path: Path) -> KbundleError:
    """An OSError writing a file, with its errno's name and the path (ENOSPC, EROFS, EACCES, ...)."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return KbundleError(f"{os.strerror(exc.errno).lower() if exc.errno else exc} ({name}): {path}")


def _reporter(on_progress):
    """Adapts rattler's installer callbacks to `on_progress(done, total)`."""
    import rattler

    class Reporter(rattler.InstallerReporter):
        def __init__(self):
            super().__init__()
            self.total = 0
            self.done = 0

        def on_transaction_start(self, total_operations, *args):
            self.total = total_operations
            on_progress(0, total_operations)

        def on_transaction_operation_complete(self, *args):
            self.done += 1
            on_progress(self.done, self.total)

    return Reporter()
