"""Solving and reading locks for the image's platform with py-rattler: the one place both stages use.

pack locks the sender's environment here; run reads that lock back, or, for an unlocked
bundle, solves here too. Both solve against the *target's* virtual packages (the image's
glibc and CUDA, recorded in the manifest), never the machine that happens to solve.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Optional

from kbundle import contract
from kbundle.errors import KbundleError, first_line

_OTHER_PLATFORMS = ("win-64", "osx-64", "osx-arm64")
SOLVE_TIMEOUT = timedelta(minutes=5)


class ChannelsDown(KbundleError):
    """A channel could not be fetched."""


class Unsolvable(KbundleError):
    """The specs have no solution; the message is plain words."""


def virtual_packages(strings: Sequence[str]) -> list:
    """rattler's records for `name=version[=build]` strings such as the manifest carries."""
    from rattler import BuildString, GenericVirtualPackage, PackageName, Version

    found = []
    for text in strings:
        name, _, rest = text.partition("=")
        version, _, build = rest.partition("=")
        found.append(GenericVirtualPackage(PackageName(name), Version(version or "0"), BuildString(build or "0")))
    return found


def _gateway(cache_dir: Optional[Path]):
    from rattler import Gateway

    from kbundle.net import rattler_client

    # A fresh Gateway per solve: it caches repodata in memory, and a channel may change between calls.
    if cache_dir is None:
        return Gateway(show_progress=False, client=rattler_client())
    return Gateway(cache_dir=cache_dir, show_progress=False, client=rattler_client())


async def solve(
    channels: Sequence[str], specs: Sequence[str], target: Sequence[str], cache_dir: Optional[Path] = None
) -> list:
    """RepoDataRecords for `specs` on the target platform, sorted by name.

    `target` is the image's virtual packages (`contract.target_virtual_packages`)."""
    import rattler
    from rattler import MatchSpec
    from rattler.exceptions import GatewayError, SolverError

    gateway = _gateway(cache_dir)
    match_specs = [MatchSpec(s, strict=False) for s in specs]
    try:
        records = await rattler.solve(
            list(channels),
            match_specs,
            gateway=gateway,
            platforms=[contract.PLATFORM, "noarch"],
            virtual_packages=virtual_packages(target),
            timeout=SOLVE_TIMEOUT,
        )
    except GatewayError as exc:
        raise ChannelsDown(first_line(exc)) from None
    except SolverError as exc:
        raise Unsolvable(await _explain(gateway, list(channels), list(specs), str(exc))) from None
    return sorted(records, key=lambda r: str(r.name.normalized))


def lock_text(records: Sequence, channels: Sequence[str], target: Sequence[str]) -> str:
    """A rattler lock file (text) holding `records` for the target platform."""
    from rattler import LockChannel, LockFile, LockPlatform

    lock_file = LockFile([LockPlatform(contract.PLATFORM, virtual_packages=list(target))])
    platform = lock_file.platforms()[0]  # the lock's own platform object, not a new one
    lock_file.set_channels("default", [LockChannel(u) for u in channels])
    for record in records:
        lock_file.add_conda_package("default", platform, record)
    fd, tmp = tempfile.mkstemp(suffix=".lock")
    os.close(fd)
    try:
        lock_file.to_path(tmp)
        with open(tmp, encoding="utf-8") as fh:
            return fh.read()
    finally:
        os.unlink(tmp)


def records_from_lock(text: str) -> list:
    """The target platform's records from a lock file's text, sorted by name."""
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
        if lock_platform.name == contract.PLATFORM:
            records = env.conda_repodata_records_for_platform(lock_platform)
            if records:
                return sorted(records, key=lambda r: str(r.name.normalized))
    raise KbundleError(f"the bundle's lock has no {contract.PLATFORM} packages")


async def _explain(gateway, urls: list[str], specs: list[str], message: str) -> str:
    """Turn rattler's solver message into plain words naming the package and the reason."""
    from rattler import MatchSpec

    match = re.search(r"No candidates were found for ([^\n]+?)\.?\s*$", message, re.M)
    if not match:
        lines = [line.strip(" │├└─") for line in message.splitlines() if line.strip(" │├└─")]
        return " ".join(lines)[:400]
    wanted = match.group(1).strip()
    name = wanted.split()[0]
    channels = ", ".join(urls)
    try:
        by_platform = await _versions_by_platform(gateway, urls, name)
    except Exception:  # explaining must never hide the real failure
        return f"no package matches `{wanted}` in {channels}"
    linux = by_platform.get(contract.PLATFORM, []) + by_platform.get("noarch", [])
    if not linux:
        elsewhere = sorted(p for p in _OTHER_PLATFORMS if by_platform.get(p))
        if elsewhere:
            return f"`{name}` exists only for {', '.join(elsewhere)}, not {contract.PLATFORM} (in {channels})"
        return f"`{name}` is not in {channels}"
    versions = sorted(set(linux), key=_sort_key)[-5:]
    spec = next((s for s in specs if MatchSpec(s, strict=False).name.normalized == name), wanted)
    return f"`{spec}` has no match for {contract.PLATFORM} in {channels} (available: {', '.join(versions)})"


def _sort_key(version: str):
    from rattler import Version

    try:
        return (0, Version(version))
    except Exception:
        return (1, version)


async def _versions_by_platform(gateway, urls: list[str], name: str) -> dict[str, list[str]]:
    from rattler import MatchSpec

    found: dict[str, list[str]] = {}
    for platform in (contract.PLATFORM, "noarch") + _OTHER_PLATFORMS:
        try:
            result = await gateway.query(urls, [platform], [MatchSpec(name, strict=False)], recursive=False)
        except Exception:  # a channel without that platform's folder
            continue
        found[platform] = [str(r.version) for group in result for r in group]
    return found
