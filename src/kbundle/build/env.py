"""The conda environment of the image, installed on the host with py-rattler.

Downloads happen here, on the host, where the user's proxy variables and CA trust live;
the image build then only COPYs the finished prefix. Packages go through one shared cache
(platformdirs' user cache dir), so a second bundle that shares packages only links them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from kbundle.cache import cache_root
from kbundle.errors import KbundleError, first_line

FINAL_PREFIX = "/opt/kbundle/env"
PLATFORM = "linux-64"


@dataclass(frozen=True)
class EnvSpec:
    """What the bundle says about its conda environment."""

    channels: tuple[str, ...]
    dependencies: tuple[str, ...]
    lock_text: Optional[str] = None  # the bundle's rattler lock, when it was locked
    cuda: Optional[str] = None


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
        lines = sorted(f"{r.url} {r.sha256.hex() if r.sha256 else ''} {r.md5.hex() if r.md5 else ''}"
                       for r in self.records)
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


# ----------------------------------------------------------------- networking


def _host_ca_bundle() -> Optional[str]:
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return value
    return None


def rattler_config():
    """rattler's networking from the host: system CA store and the proxy variables."""
    import rattler

    config = rattler.Config()
    # rustls' native roots read the OS store, and SSL_CERT_FILE when set.
    config.set("tls-root-certs", "system")
    env = {k.lower(): v for k, v in os.environ.items() if k.lower() in ("https_proxy", "http_proxy", "no_proxy")}
    if env.get("https_proxy"):
        config.set("proxy-config.https", env["https_proxy"])
    if env.get("http_proxy"):
        config.set("proxy-config.http", env["http_proxy"])
    if env.get("no_proxy"):
        hosts = [h.strip() for h in env["no_proxy"].split(",") if h.strip()]
        config.set("proxy-config.non-proxy-hosts", _json_list(hosts))
    return config


def _json_list(items: Sequence[str]) -> str:
    import json

    return json.dumps(list(items))


def rattler_client():
    import rattler

    ca = _host_ca_bundle()
    if ca and not os.environ.get("SSL_CERT_FILE"):
        os.environ["SSL_CERT_FILE"] = ca  # the rustls native-certs loader honours it
    return rattler.Client.from_config(rattler_config())


# ----------------------------------------------------------------- resolve


def _linux_virtual_packages():
    """The virtual packages of this host's driver and libc, as seen for linux-64."""
    import rattler
    from rattler import BuildString, GenericVirtualPackage, PackageName, Version

    found: dict[str, object] = {}
    try:
        # CONDA_OVERRIDE_CUDA & co. work as with conda, e.g. to build a CUDA env on a CPU-only host.
        for vp in rattler.VirtualPackage.detect(rattler.VirtualPackageOverrides.from_env()):
            generic = vp.into_generic()
            found[str(generic.name.normalized)] = generic
    except Exception:
        pass  # detection is a hint; the defaults below keep the solve going
    defaults = {"__unix": "0", "__linux": "5.10", "__glibc": "2.28"}
    for name, version in defaults.items():
        found.setdefault(name, GenericVirtualPackage(PackageName(name), Version(version), BuildString("0")))
    found.pop("__osx", None)
    found.pop("__win", None)
    return list(found.values())


def _records_from_lock(text: str) -> list:
    import rattler

    with tempfile.TemporaryDirectory(prefix="kbundle-lock-") as tmp:
        path = Path(tmp) / "rattler.lock"
        path.write_text(text, encoding="utf-8")
        try:
            lock = rattler.LockFile.from_path(path)
        except Exception as exc:
            raise KbundleError(f"the bundle's lock cannot be read: {first_line(exc)}") from None
    env = lock.default_environment()
    if env is None:
        raise KbundleError("the bundle's lock has no default environment")
    for lock_platform in env.platforms():  # the lock's own platform objects
        if lock_platform.name == PLATFORM:
            records = env.conda_repodata_records_for_platform(lock_platform)
            if records:
                return list(records)
    raise KbundleError(f"the bundle's lock has no {PLATFORM} packages")


async def _solve(spec: EnvSpec) -> list:
    import rattler

    specs = [rattler.MatchSpec(s, strict=False) for s in spec.dependencies]
    gateway = rattler.Gateway(cache_dir=cache_root() / "repodata", client=rattler_client())
    return await rattler.solve([rattler.Channel(c) for c in spec.channels], specs, gateway=gateway,
                               platforms=[PLATFORM, "noarch"],
                               virtual_packages=_linux_virtual_packages())


def resolve(spec: EnvSpec) -> ResolvedEnv:
    """The bundle's lock exactly when it has one; otherwise a linux-64 solve on this host."""
    if spec.lock_text:
        records = _records_from_lock(spec.lock_text)
        return ResolvedEnv(tuple(sorted(records, key=lambda r: str(r.name.normalized))), locked=True)
    if not spec.channels:
        raise KbundleError("the bundle is not locked and names no channels to solve from")
    try:
        records = asyncio.run(_solve(spec))
    except Exception as exc:
        raise KbundleError(f"cannot solve the bundle's environment for {PLATFORM}: {first_line(exc)}") from None
    return ResolvedEnv(tuple(sorted(records, key=lambda r: str(r.name.normalized))), locked=False)


# ----------------------------------------------------------------- install


@dataclass(frozen=True)
class InstallStats:
    packages: int
    seconds: float


def install(env: ResolvedEnv, target: Path, on_progress=None) -> InstallStats:
    """Install the records into `target`, with `/opt/kbundle/env` patched in as the prefix.

    Link scripts stay off: they would run someone else's code on the host."""
    import rattler

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    reporter = _reporter(on_progress) if on_progress else None

    async def go():
        await rattler.install(list(env.records), target_prefix=str(target), alternative_target_prefix=FINAL_PREFIX,
                              cache_dir=package_cache_dir(), platform=rattler.Subdir(PLATFORM),
                              execute_link_scripts=False, show_progress=False, client=rattler_client(),
                              reporter=reporter)

    try:
        asyncio.run(go())
    except Exception as exc:
        raise KbundleError(f"installing the environment failed: {first_line(exc)}") from None
    return InstallStats(env.count, time.perf_counter() - t0)


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

