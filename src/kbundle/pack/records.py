"""Typed records passed between the pack modules (detection, normalisation, CUDA choice,
locking, rendering), so each module has one job and can be tested on its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kbundle.bundle.format import Added, Changed, Dropped, Variant
from kbundle.specs import CondaSpec, PipPin


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
    # What pack says about how the environment was found and read (which kernel or file, what was
    # left out and why): one `note:` line each.
    notes: list[str] = field(default_factory=list)
    # The file the environment was read from when pack found it itself (beside the notebook, or a
    # kernel's lock file): the bundle keeps it as the original, as it keeps a file given with -e.
    source_path: Path | None = None


@dataclass
class NormalisedEnv:
    channels: list[str]
    dependencies: list[CondaSpec]  # normalised: no platform build hashes, no platform-only channels
    pip: list[PipPin]  # in order
    python: str | None
    dropped: list[Dropped] = field(default_factory=list)
    added: list[Added] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)
    source_platform: str | None = None
    channels_down: list[str] | None = None  # the channels that did not answer pack's probe; None: not asked

    def names(self) -> set[str]:
        return {d.name for d in self.dependencies}


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
    changed: tuple[Changed, ...] = ()  # runtime pins --cuda replaced
    dropped: tuple[Dropped, ...] = ()  # runtime pins --cuda removed (cudatoolkit for CUDA 12)
    conflict: str | None = None  # one sentence: what the env carries cannot serve a framework, and the remedy


@dataclass(frozen=True)
class LockResult:
    locked: bool
    text: str | None
    virtual_packages: tuple[str, ...] = ()
    note: str | None = None
    python: str | None = None  # the solved python version
    provided: tuple = ()  # pydists.Provided: the Python distributions the solved conda side installs
