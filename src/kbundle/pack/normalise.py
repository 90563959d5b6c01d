"""Turn an environment exported on any OS into one for linux-64.

Drops `prefix:` and packages that exist only on another OS (each with its reason),
drops platform build hashes but keeps a variant's intent (a CUDA build stays a CUDA
build), keeps exact versions, channels and the ordered pip section, and makes sure
the kernel's own package, ipykernel, is there. The facts live in data/normalise.yaml.
"""

from __future__ import annotations

import re
from dataclasses import replace

from kbundle.bundle.format import Added, Dropped, Variant
from kbundle.facts import normalise_facts
from kbundle.pack.envfile import write_environment_yml
from kbundle.pack.records import NormalisedEnv, RawEnv
from kbundle.specs import CondaSpec, PipPin, parse_conda_spec, parse_pip_line

_WORDS = re.compile(r"[a-z]+")


def guess_platform(env: RawEnv) -> str | None:
    if env.platform:
        return env.platform
    names = {s.name for s in env.conda}
    for platform, markers in normalise_facts().platform_markers.items():
        if names & markers:
            return platform
    return None


def variant_of(build: str | None) -> tuple[str, str] | None:
    """The marker a build string carries and its intent: 'py3.9_cuda11.8_0' -> ('cuda', ...)."""
    if not build:
        return None
    words = set(_WORDS.findall(build.lower()))
    for marker, intent in normalise_facts().variant_markers.items():
        if marker in words:
            return marker, intent
    return None


def normalise_conda_spec(spec: CondaSpec) -> tuple[CondaSpec, Variant | None]:
    """The spec for linux-64: no platform-only channel, no build hash, but a variant's build glob."""
    channel = spec.channel if spec.channel not in normalise_facts().platform_channels else None
    plain = replace(spec, channel=channel, build=None)
    found = variant_of(spec.build) if not spec.constraint else None
    if not found:
        return plain, None
    marker, intent = found
    kept = replace(plain, build=_build_glob(spec.build, marker))
    return kept, Variant(spec.name, kept.text, intent)


def _build_glob(build: str, marker: str) -> str:
    # A build string that is just the word (`_tflow_select=2.1.0=gpu`, `blas=1.0=mkl`) stays exact.
    return build if build.lower() == marker else f"*{marker}*"


def _channels(env: RawEnv, dropped: list[Dropped], added: list[Added]) -> list[str]:
    platform_only = normalise_facts().platform_channels
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


def _pip(pins: list[PipPin], dropped: list[Dropped]) -> list[PipPin]:
    facts = normalise_facts()
    kept: list[PipPin] = []
    for pin in pins:
        if pin.local:
            dropped.append(Dropped(f"pip: {pin.raw}", "a local path or editable install on the sender's machine"))
            continue
        reason = facts.pip_os_reason(pin.name)
        if reason:
            dropped.append(Dropped(f"pip: {pin.raw}", reason))
            continue
        linux_name = facts.pip_replace.get(pin.name)
        if linux_name and pin.version:
            new = parse_pip_line(f"{linux_name}=={pin.version}")
            dropped.append(Dropped(f"pip: {pin.raw}", f"replaced by {new.text} on Linux"))
            kept.append(new)
            continue
        kept.append(pin)
    return kept


def _python_version(spec: CondaSpec) -> str | None:
    """python's version when the spec pins a plain one (3.10, 3.10.*), else None."""
    if spec.name == "python" and re.fullmatch(r"\d+(\.\d+)*(\.\*)?", spec.version or ""):
        return spec.version.rstrip(".*")
    return None


def normalise(env: RawEnv) -> NormalisedEnv:
    facts = normalise_facts()
    dropped: list[Dropped] = []
    added: list[Added] = []
    variants: list[Variant] = []
    channels = _channels(env, dropped, added)
    deps: list[CondaSpec] = []
    python = None
    for spec in env.conda:
        reason = facts.conda_os_reason(spec.name)
        if reason:
            dropped.append(Dropped(spec.raw, reason))
            continue
        kept, variant = normalise_conda_spec(spec)
        if variant:
            variants.append(variant)
        python = _python_version(spec) or python
        deps.append(kept)
    pip = _pip(env.pip, dropped)
    names = {d.name for d in deps}
    if pip and "pip" not in names:
        deps.append(parse_conda_spec("pip"))
        added.append(Added("pip", "the environment has a pip: section"))
    if "ipykernel" not in names and "ipykernel" not in {p.name for p in pip}:
        deps.append(parse_conda_spec("ipykernel"))
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
    return write_environment_yml(
        header, name, env.channels, [d.text for d in env.dependencies], [p.text for p in env.pip]
    )
