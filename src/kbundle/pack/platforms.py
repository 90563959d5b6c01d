"""Which OS an export came from, and which of its conda packages exist for linux-64.

Two sources decide, in this order: the channels' own repodata, when they answer at pack
time (`query`), and otherwise the static table in data/normalise.yaml. The decision for one
spec (`verdict`) is a pure function of the spec, the table and what the channels said, so it
is tested table-driven; only `query` talks to the network (through rattler's Gateway).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kbundle import contract
from kbundle.facts import normalise_facts
from kbundle.pack.records import RawEnv
from kbundle.specs import CondaSpec

OTHER_PLATFORMS = ("win-64", "osx-64", "osx-arm64")


# ---------------------------------------------------------------- the export's platform


def _family(platform: str) -> str:
    return platform.split("-")[0]


def _from_builds(specs: list[CondaSpec]) -> set[str]:
    words = normalise_facts().platform_build_words
    found = set()
    for spec in specs:
        tokens = set(re.split(r"[_.]", (spec.build or "").lower()))
        found |= {platform for platform, marks in words.items() if tokens & marks}
    return found


def detect_platform(env: RawEnv) -> str | None:
    """The subdir an export came from, from unambiguous evidence only: the prefix's form, packages
    published for one OS alone, and platform words in build strings. Disagreeing packages and
    build strings give None (the prefix, when there is one, settles the OS)."""
    if env.platform:
        return env.platform
    facts = normalise_facts()
    from_prefix = next((p for p, rx in facts.platform_prefixes.items() if env.prefix and rx.search(env.prefix)), None)
    evidence = _from_builds(env.conda)
    for spec in env.conda:
        evidence |= facts.platforms_of_package(spec.name)
    if from_prefix:
        # The prefix says the OS; the other evidence may still say the architecture (osx-arm64).
        same_os = {p for p in evidence if _family(p) == _family(from_prefix)}
        return max(same_os, key=lambda p: p.endswith("arm64")) if same_os else from_prefix
    families = {_family(p) for p in evidence}
    if len(families) != 1:
        return None
    return max(evidence, key=lambda p: p.endswith("arm64"))


def where(platforms) -> str:
    return ", ".join(sorted(platforms))


# ---------------------------------------------------------------- what the channels publish


@dataclass
class Availability:
    """What the channels publish of each queried name: versions for linux-64/noarch, and per other platform."""

    linux: dict[str, set[str]] = field(default_factory=dict)
    other: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def knows(self, name: str) -> bool:
        return bool(self.linux.get(name)) or any(self.other.get(name, {}).values())

    def other_platforms(self, name: str, version: str | None = None) -> set[str]:
        return {p for p, vs in self.other.get(name, {}).items() if vs and (version is None or _has(vs, version))}


def _has(versions: set[str], wanted: str) -> bool:
    """conda's `name=1.2` matches 1.2 and 1.2.x; compare the way MatchSpec does."""
    from rattler import Version, VersionSpec

    spec = VersionSpec(f"{wanted}.*" if not wanted.endswith("*") else wanted, strict=False)
    for text in versions:
        try:
            if spec.matches(Version(text)):
                return True
        except Exception:  # a version rattler cannot read: no match, not a crash
            continue
    return False


async def query(urls: list[str], names: list[str], platforms: tuple[str, ...]) -> Availability:
    """Every version of `names` the channels publish for linux-64, noarch and `platforms`."""
    from rattler import Gateway, MatchSpec

    from kbundle.net import rattler_client

    gateway = Gateway(show_progress=False, client=rattler_client())
    specs = [MatchSpec(n, strict=False) for n in sorted(set(names))]
    found = Availability()
    for platform in (contract.PLATFORM, "noarch", *platforms):
        try:
            groups = await gateway.query(urls, [platform], specs, recursive=False)
        except Exception:  # a channel without that platform's folder: it publishes nothing there
            continue
        for group in groups:
            for record in group:
                name, version = str(record.name.normalized), str(record.version)
                if platform in (contract.PLATFORM, "noarch"):
                    found.linux.setdefault(name, set()).add(version)
                else:
                    found.other.setdefault(name, {}).setdefault(platform, set()).add(version)
    return found


def query_platforms(platform: str | None) -> tuple[str, ...]:
    """The other subdirs worth asking about: the export's own (both macOS ones), or all of them."""
    if platform in (None, contract.PLATFORM) or platform not in OTHER_PLATFORMS:
        return OTHER_PLATFORMS
    return tuple(p for p in OTHER_PLATFORMS if _family(p) == _family(platform))


# ---------------------------------------------------------------- one spec's verdict


@dataclass(frozen=True)
class Verdict:
    """Drop the spec (`to` None) or carry it as `to`, and why."""

    to: CondaSpec | None
    reason: str


def verdict(spec: CondaSpec, available: Availability | None) -> Verdict | None:
    """None: carry the spec as it is. The channels decide for a name they know; the table otherwise."""
    if available is not None and available.knows(spec.name):
        return _by_channels(spec, available)
    return _by_table(spec)


def _by_channels(spec: CondaSpec, available: Availability) -> Verdict | None:
    linux = available.linux.get(spec.name, set())
    if not linux:
        return Verdict(None, f"exists only for {where(available.other_platforms(spec.name))}")
    if spec.version and not _has(linux, spec.version):
        elsewhere = available.other_platforms(spec.name, spec.version)
        if elsewhere:  # a version published nowhere is the lock's to report, not ours to relax
            return _relaxed(spec, _nearest(spec.version, linux), where(elsewhere))
    return None


def _by_table(spec: CondaSpec) -> Verdict | None:
    facts = normalise_facts()
    reason = facts.conda_os_reason(spec.name)
    if reason:
        return Verdict(None, reason)
    versions = facts.conda_os_only_versions.get(spec.name)
    if versions is not None and versions.covers(spec.version):
        return _relaxed(spec, None, versions.os)
    return None


def _nearest(version: str, linux: set[str]) -> str | None:
    """The Linux version line closest to `version`: one sharing its major.minor, else none."""
    from kbundle.facts import Version

    wanted = Version.lenient(version)
    for text in sorted(linux):
        have = Version.lenient(text)
        if wanted and have and have.parts[:2] == wanted.parts[:2]:
            return f"{have.major}.{have.minor}"
    return None


def _relaxed(spec: CondaSpec, version: str | None, where_: str) -> Verdict:
    from dataclasses import replace

    new = replace(spec, version=version, build=None, constraint=None)
    return Verdict(new, f"relaxed `{spec.raw}` to `{new.text}`: that version exists only for {where_}")
