"""Turn an environment exported on any OS into one for linux-64.

Drops `prefix:` and packages that exist only on another OS (each with its reason),
drops platform build hashes but keeps a variant's intent (a CUDA build stays a CUDA
build), keeps exact versions, channels and the ordered pip section, and makes sure
the kernel's own package, ipykernel, is there. The facts live in data/normalise.yaml.
"""

from __future__ import annotations

import re

from kbundle.bundle.format import Added, Dropped, Variant
from kbundle.pack.envfile import write_environment_yml
from kbundle.facts import normalise_facts
from kbundle.pack.records import CondaSpec, NormalisedEnv, PipPin, RawEnv, spec_name

_WORDS = re.compile(r"[a-z]+")


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def _os_only(name: str, table: dict) -> str | None:
    for entry in table.values():
        if _matches(name, entry["names"]):
            return entry["reason"]
    return None


def guess_platform(env: RawEnv) -> str | None:
    if env.platform:
        return env.platform
    names = {s.name for s in env.conda}
    for platform, markers in normalise_facts()["platform_markers"].items():
        if names & set(markers):
            return platform
    return None


def variant_of(build: str | None) -> tuple[str, str] | None:
    """The marker a build string carries and its intent: 'py3.9_cuda11.8_0' -> ('cuda', ...)."""
    if not build:
        return None
    words = set(_WORDS.findall(build.lower()))
    for marker, intent in normalise_facts()["variant_markers"].items():
        if marker in words:
            return marker, intent
    return None


def normalise_conda_spec(spec: CondaSpec) -> tuple[str, Variant | None]:
    head = f"{spec.channel}::{spec.name}" if spec.channel and spec.channel not in _platform_channels() else spec.name
    if spec.constraint:
        return f"{head}{spec.constraint if spec.constraint[0] in '<>=!~' else ' ' + spec.constraint}", None
    if not spec.version:
        if spec.build and variant_of(spec.build):
            marker, intent = variant_of(spec.build)
            text = f"{head}=*={_build_glob(spec.build, marker)}"
            return text, Variant(spec.name, text, intent)
        return head, None
    found = variant_of(spec.build)
    if found:
        marker, intent = found
        text = f"{head}={spec.version}={_build_glob(spec.build, marker)}"
        return text, Variant(spec.name, text, intent)
    return f"{head}={spec.version}", None


def _build_glob(build: str, marker: str) -> str:
    # A build string that is just the word (`_tflow_select=2.1.0=gpu`, `blas=1.0=mkl`) stays exact.
    return build if build.lower() == marker else f"*{marker}*"


def _platform_channels() -> set[str]:
    return {name for name, urls in normalise_facts()["channel_aliases"].items() if not urls}


def _channels(env: RawEnv, dropped: list[Dropped], added: list[Added]) -> list[str]:
    platform_only = _platform_channels()
    channels = []
    for channel in env.channels:
        if channel in platform_only:
            dropped.append(Dropped(f"channel {channel}", "a Windows-only channel"))
        elif channel not in channels:
            channels.append(channel)
    if not channels:
        channels = ["conda-forge"]
        added.append(Added("channel conda-forge", "the environment names no channel"))
    return channels


def _pip(pins: list[PipPin], dropped: list[Dropped]) -> list[str]:
    facts = normalise_facts()
    replace = facts["pip_replace"]
    kept: list[str] = []
    for pin in pins:
        if pin.local:
            dropped.append(Dropped(f"pip: {pin.raw}", "a local path or editable install on the sender's machine"))
            continue
        reason = _os_only(pin.name, facts["pip_os_only"])
        if reason:
            dropped.append(Dropped(f"pip: {pin.raw}", reason))
            continue
        if pin.name in replace and pin.version:
            new = f"{replace[pin.name]}=={pin.version}"
            dropped.append(Dropped(f"pip: {pin.raw}", f"replaced by {new} on Linux"))
            kept.append(new)
            continue
        kept.append(pin.raw)
    return kept


def normalise(env: RawEnv) -> NormalisedEnv:
    facts = normalise_facts()
    dropped: list[Dropped] = []
    added: list[Added] = []
    variants: list[Variant] = []
    channels = _channels(env, dropped, added)
    deps: list[str] = []
    python = None
    for spec in env.conda:
        reason = _os_only(spec.name, facts["conda_os_only"])
        if reason:
            dropped.append(Dropped(spec.raw, reason))
            continue
        text, variant = normalise_conda_spec(spec)
        if variant:
            variants.append(variant)
        if spec.name == "python" and re.fullmatch(r"\d+(\.\d+)*(\.\*)?", spec.version or ""):
            python = spec.version.rstrip(".*")
        deps.append(text)
    pip = _pip(env.pip, dropped)
    names = {spec_name(d) for d in deps}
    pip_names = {p.split("==")[0].strip().lower().replace("_", "-") for p in pip}
    if pip and "pip" not in names:
        deps.append("pip")
        added.append(Added("pip", "the environment has a pip: section"))
    if "ipykernel" not in names and "ipykernel" not in pip_names:
        deps.append("ipykernel")
        added.append(Added("ipykernel", "the kernel inside the image needs it"))
    return NormalisedEnv(
        channels=channels,
        dependencies=deps,
        pip=pip,
        python=python,
        dropped=dropped,
        added=added,
        variants=variants,
        source_platform=guess_platform(env),
    )


def environment_yml(name: str, env: NormalisedEnv) -> str:
    """The normalised environment as an environment.yml (no prefix, no build hashes)."""
    header = "normalised by kbundle for linux-64; see kbundle.json for what was dropped or added"
    return write_environment_yml(header, name, env.channels, env.dependencies, env.pip)
