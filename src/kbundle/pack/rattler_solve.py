"""The py-rattler calls, kept in one module so nothing else imports rattler."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from datetime import timedelta

from kbundle.errors import first_line

_OTHER_PLATFORMS = ("win-64", "osx-64", "osx-arm64")


class ChannelsDown(Exception):
    """A channel could not be fetched."""


class Unsolvable(Exception):
    """The specs have no solution; the message is plain words."""


@dataclass(frozen=True)
class Solved:
    name: str
    version: str


async def solve(urls: list[str], specs: list[str], vps: list[tuple[str, str, str]]):
    import rattler
    from rattler import BuildString, Gateway, GenericVirtualPackage, LockChannel, LockFile, LockPlatform, MatchSpec, PackageName, Version
    from rattler.exceptions import GatewayError, SolverError

    # A fresh Gateway per lock: it caches repodata in memory, and a channel may change between calls.
    gateway = Gateway(show_progress=False, client=_client())
    virtual = [GenericVirtualPackage(PackageName(n), Version(v), BuildString(b)) for n, v, b in vps]
    match_specs = [MatchSpec(s, strict=False) for s in specs]
    try:
        records = await rattler.solve(
            urls, match_specs, gateway=gateway, platforms=["linux-64", "noarch"], virtual_packages=virtual, timeout=timedelta(minutes=5)
        )
    except GatewayError as exc:
        raise ChannelsDown(first_line(exc)) from None
    except SolverError as exc:
        raise Unsolvable(await _explain(gateway, urls, specs, str(exc))) from None
    vp_strings = [f"{n}={v}" if b == "0" else f"{n}={v}={b}" for n, v, b in vps]
    lock_file = LockFile([LockPlatform("linux-64", virtual_packages=vp_strings)])
    platform = lock_file.platforms()[0]  # the lock's own platform object, not a new one
    lock_file.set_channels("default", [LockChannel(u) for u in urls])
    for record in sorted(records, key=lambda r: str(r.name.normalized)):
        lock_file.add_conda_package("default", platform, record)
    fd, tmp = tempfile.mkstemp(suffix=".lock")
    os.close(fd)
    try:
        lock_file.to_path(tmp)
        with open(tmp, encoding="utf-8") as fh:
            text = fh.read()
    finally:
        os.unlink(tmp)
    solved = [Solved(str(r.name.normalized), str(r.version)) for r in records]
    return solved, text, vp_strings


def _client():
    """The host's proxy and CA settings, shared with the build stage, when it is installed."""
    try:
        from kbundle.build.env import rattler_client
    except ImportError:
        return None
    return rattler_client()


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
        by_platform = await _records_by_platform(gateway, urls, name)
    except Exception:  # explaining must never hide the real failure
        return f"no package matches `{wanted}` in {channels}"
    linux = by_platform.get("linux-64", []) + by_platform.get("noarch", [])
    if not linux:
        elsewhere = sorted(p for p in _OTHER_PLATFORMS if by_platform.get(p))
        if elsewhere:
            return f"`{name}` exists only for {', '.join(elsewhere)}, not linux-64 (in {channels})"
        return f"`{name}` is not in {channels}"
    versions = sorted({r for r in linux}, key=_vkey)[-5:]
    spec = next((s for s in specs if MatchSpec(s, strict=False).name.normalized == name), wanted)
    return f"`{spec}` has no match for linux-64 in {channels} (available: {', '.join(versions)})"


def _vkey(version: str):
    return [int(p) if p.isdigit() else 0 for p in re.split(r"[.+_-]", version)]


async def _records_by_platform(gateway, urls: list[str], name: str) -> dict[str, list[str]]:
    from rattler import MatchSpec

    found: dict[str, list[str]] = {}
    for platform in ("linux-64", "noarch") + _OTHER_PLATFORMS:
        try:
            result = await gateway.query(urls, [platform], [MatchSpec(name, strict=False)], recursive=False)
        except Exception:  # a channel without that platform's folder
            continue
        found[platform] = [str(r.version) for group in result for r in group]
    return found
