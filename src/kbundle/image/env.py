"""The conda environment of the image, installed on the host with py-rattler.

Downloads happen here, on the host, where the user's proxy variables and CA trust live;
the image build then only COPYs the finished prefix. Packages go through one shared cache
(platformdirs' user cache dir), so a second bundle that shares packages only links them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle import contract, net
from kbundle.cache import cache_root
from kbundle.errors import KbundleError, first_line


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
        return ResolvedEnv(tuple(solve.records_from_lock(spec.lock_text)), locked=True)
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
    return ResolvedEnv(tuple(records), locked=False)


# ----------------------------------------------------------------- install


@dataclass(frozen=True)
class InstallStats:
    packages: int
    seconds: float


def install(env: ResolvedEnv, target: Path, on_progress=None) -> InstallStats:
    """Install the records into `target`, with the image's prefix patched in as the final prefix.

    Link scripts stay off: they would run someone else's code on the host."""
    import rattler

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    reporter = _reporter(on_progress) if on_progress else None

    async def go():
        await rattler.install(
            list(env.records),
            target_prefix=str(target),
            alternative_target_prefix=contract.PREFIX,
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
