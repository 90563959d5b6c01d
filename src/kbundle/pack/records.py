"""Typed records passed between the pack modules (detection, normalisation, CUDA choice,
locking, rendering), so each module has one job and can be tested on its own."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kbundle.bundle.format import Added, Dropped, Variant


@dataclass(frozen=True)
class CondaSpec:
    """One conda dependency as written by the sender (`name=version=build` or a free spec)."""

    raw: str
    name: str
    channel: str | None = None
    version: str | None = None  # an exact version from `=ver` / `==ver`
    build: str | None = None
    constraint: str | None = None  # any other version constraint, kept verbatim (`>=1.2`)


@dataclass(frozen=True)
class PipPin:
    raw: str
    name: str  # canonical (lower case, `-`)
    version: str | None  # from `name==version`
    local: bool = False  # a path or editable install on the sender's machine


@dataclass
class RawEnv:
    """An environment as found on the sender's side, before normalisation."""

    name: str | None
    channels: list[str]
    conda: list[CondaSpec]
    pip: list[PipPin]
    prefix: str | None = None
    platform: str | None = None  # the subdir it came from, when known or guessed
    source_kind: str = "env-file"  # env-file | requirements | kernelspec-prefix | conda-prefix
    source_file: str | None = None  # the original file name (basename)
    source_text: str = ""  # the original environment file's text (synthesised for a prefix)


@dataclass
class NormalisedEnv:
    channels: list[str]
    dependencies: list[str]  # normalised conda spec strings
    pip: list[str]  # exact pins, in order
    python: str | None
    dropped: list[Dropped] = field(default_factory=list)
    added: list[Added] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    source_platform: str | None = None

    def names(self) -> set[str]:
        return {spec_name(d) for d in self.dependencies}


@dataclass(frozen=True)
class CudaChoice:
    cuda: str | None
    cudnn: str | None
    runtime_in_env: bool
    base_image: str
    glibc: str
    reason: str
    require_cuda: str | None = None  # NVIDIA_REQUIRE_CUDA for the image, when it differs from the base
    added: tuple[Added, ...] = ()
    env_libs: bool = False  # the env's lib/ holds CUDA libraries a pip framework must find


@dataclass(frozen=True)
class LockResult:
    locked: bool
    text: str | None
    virtual_packages: tuple[str, ...] = ()
    note: str | None = None
    python: str | None = None  # the solved python version


def spec_name(spec: str) -> str:
    """The package name of a normalised conda spec string."""
    spec = spec.split("::", 1)[-1]
    match = re.match(r"[A-Za-z0-9_.\-]+", spec.strip())
    return match.group(0).lower() if match else spec
