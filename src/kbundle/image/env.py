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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import contract, net
from kbundle.cache import cache_root
from kbundle.display import safe
from kbundle.errors import KbundleError, first_line
from kbundle.image import provenance

FETCH_WORKERS = 8  # parallel package downloads


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

    try:
        raw = yaml.safe_load(text)
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


def install(
    env: ResolvedEnv, target: Path, on_progress=None, meter=None, final_prefix: Optional[str] = contract.PREFIX
) -> InstallStats:
    """Install the records into `target`, with `final_prefix` patched in as the final prefix: the
    image's by default; None for a prefix that stays where it is installed (`run --native`).

    `meter` (a progress.Meter) counts the packages fetched and their bytes; `on_progress(done,
    total)` follows rattler's linking.

    Every package's file list is checked before rattler links it (vet_packages), and the
    installed prefix is checked for symlinks that leave it (check_prefix). Link scripts
    stay off: they would run someone else's code on the host."""
    import rattler

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    reporter = _reporter(on_progress) if on_progress else None
    origins = {_stem(r): (str(r.url), str(r.channel) if r.channel else None) for r in env.records}
    with tempfile.TemporaryDirectory(prefix="kbundle-archives-", dir=package_cache_dir().parent) as staging:
        records = vet_packages(env.records, Path(staging), meter)

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
        finally:
            for record in env.records:  # the records are the caller's: give them their URLs back
                record.url = origins[_stem(record)][0]
    _restore_urls(target, origins)
    check_prefix(target, final_prefix or str(target))
    return InstallStats(env.count, time.perf_counter() - t0)


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


def vet_packages(records, staging: Path, meter=None) -> list:
    """The records, each package's paths.json checked; fetched packages point at verified local copies.

    A package already in rattler's cache under the same sha256 is read there. Any other is
    downloaded here and checked against the lock's sha256, and rattler then installs that
    very file (a file:// URL): what rattler links is what was checked."""
    from concurrent.futures import ThreadPoolExecutor

    todo = []
    for record in records:
        cached = _cached_paths(record)
        if cached is None:
            todo.append(record)
        else:
            _check_paths(record, cached)
    if meter is not None:
        meter.plan_bytes(sum(r.size or 0 for r in todo))
        meter.items(len(records) - len(todo), len(records))
    with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
        # Each worker fetches and reads the file list (a .tar.bz2 is decompressed to its end for
        # it): the reading of one package overlaps the download of the next.
        fetched = dict(
            zip([id(r) for r in todo], pool.map(lambda r: _fetch_and_list(r, staging, meter), todo), strict=True)
        )
    vetted = []
    for record in records:
        found = fetched.get(id(record))
        if found is not None:
            archive, paths = found
            _check_paths(record, paths)
            record = _relocated(record, archive)
        vetted.append(record)
    return vetted


def _fetch_and_list(record, staging: Path, meter=None) -> tuple[Path, list[str]]:
    archive = _fetch_verified(record, staging, meter)
    return archive, _archive_paths(record, archive)


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


def _archive_paths(record, archive: Path) -> list[str]:
    import rattler

    try:
        return [str(e.relative_path) for e in rattler.PathsJson.from_package_archive(archive).paths]
    except Exception as exc:
        raise KbundleError(f"cannot read the file list of {safe(record.file_name)}: {first_line(exc)}") from None


def _check_paths(record, paths: list[str]) -> None:
    from kbundle.bundle import BundleError

    problem = provenance.paths_problem(str(record.file_name), paths)
    if problem:
        raise BundleError(problem)


def _fetch_verified(record, staging: Path, meter=None) -> Path:
    """Download one package archive and check it against the lock's sha256 (or md5)."""
    import urllib.request

    url = str(record.url)
    target = staging / str(record.file_name)
    digest = hashlib.sha256() if record.sha256 else hashlib.md5()
    expected = bytes(record.sha256 or record.md5 or b"")
    if not expected:
        raise KbundleError(f"package {safe(record.file_name)} has no checksum to verify it against")
    try:
        out = open(target, "wb")
    except OSError as exc:
        raise _disk_error(exc, target) from None
    with out:
        try:
            response = urllib.request.urlopen(url, timeout=60, context=_ssl_context())
        except OSError as exc:
            raise KbundleError(f"cannot download {safe(url)}: {first_line(exc)}") from None
        with response:
            _copy(response, out, digest, url, target, meter)
    if meter is not None:
        meter.item_done()
    if digest.digest() != expected:
        raise KbundleError(f"{safe(url)} does not match the checksum the bundle records")
    return target


def _copy(response, out, digest, url: str, target: Path, meter) -> None:
    """The response body into `out`: a network failure names the URL, a disk failure the file."""
    while True:
        try:
            chunk = response.read(1 << 20)
        except OSError as exc:
            raise KbundleError(f"cannot download {safe(url)}: {first_line(exc)}") from None
        if not chunk:
            return
        digest.update(chunk)
        try:
            out.write(chunk)
        except OSError as exc:
            raise _disk_error(exc, target) from None
        if meter is not None:
            meter.add_bytes(len(chunk))


def _disk_error(exc: OSError, path: Path) -> KbundleError:
    """An OSError writing a file, with its errno's name and the path (ENOSPC, EROFS, EACCES, ...)."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return KbundleError(f"{os.strerror(exc.errno).lower() if exc.errno else exc} ({name}): {path}")


def _ssl_context():
    import ssl

    return ssl.create_default_context(cafile=net.host_ca_bundle())


def _relocated(record, archive: Path):
    """The record, pointing at the verified local archive (its checksums stay as they are)."""
    record.url = archive.as_uri()
    return record


def _restore_urls(target: Path, urls: dict) -> None:
    """conda-meta names where each package came from, not the temporary local copy."""
    for meta in (target / "conda-meta").glob("*.json"):
        original = urls.get(meta.stem)
        if original is None:
            continue
        data = json.loads(meta.read_text(encoding="utf-8"))
        if str(data.get("url", "")).startswith("file:"):
            data["url"], data["channel"] = original
            meta.write_text(json.dumps(data, indent=2), encoding="utf-8")


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
