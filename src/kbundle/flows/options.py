"""The records `kbundle run` passes in and gets back, for every kind of kernel: image, Slurm, native.

They live apart from the flows so that each flow (flows/run.py, flows/slurm.py, flows/native.py)
and each shared step (flows/arrive.py, flows/register.py) can name them without importing another."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle.bundle.reader import DEFAULT_MAX_EXTRACT


@dataclass(frozen=True)
class RunOptions:
    bundle: Path
    gpus: str = "auto"
    base_image: Optional[str] = None
    workdir: Optional[Path] = None
    yes: bool = False
    use_bundled_dockerfile: bool = False
    require_signature: bool = False
    network: str = "bridge"  # the kernel's: bridge (ports on 127.0.0.1) or host
    max_extract: int = DEFAULT_MAX_EXTRACT  # what the bundle may unpack to, refused before writing
    engine_timeout: float = 10.0  # seconds the engine may take to answer at all
    name: Optional[str] = None  # --name: this machine's name for the bundle (its kernel's), not the sender's
    replace: bool = False  # --replace: take over a kernel of that name that runs another bundle
    image: Optional[str] = None  # --image NAME@sha256:…: pull this pushed image instead of building
    slurm: Any = None  # --slurm: kernel/slurm.py's SlurmOptions; the kernel runs on a compute node (flows/slurm.py)
    native: bool = False  # --native: no container; the env installed on this machine (flows/native.py)
    prefix_root: Optional[Path] = None  # --prefix-root: where --native puts its prefix (default: kbundle's cache)
    rebuild: bool = False  # --rebuild: build the image again, reusing no cached step (a damaged image)


@dataclass
class RunResult:
    name: str
    kernel_name: str
    display_name: str
    image: str
    image_id: str
    workdir: Path
    notebook: Path
    built: bool
    gpus: list[str]
    seconds: float
    packages: int
    pip: int
    base_image: str
    warnings: list[str] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    kernelspec: Optional[Path] = None
    build_log: Optional[Path] = None
    pip_resolved: list[str] = field(default_factory=list)  # exact pip pins with hashes, as built
    pulled: bool = False  # --image: pulled now (False: this engine had that digest)
    image_ref: Optional[str] = None  # --image: the pinned reference the kernel's image came from
    slurm: Any = None  # --slurm: the job's options the kernel was registered with
    native: Optional[dict[str, Any]] = None  # --native: prefix, reused, install_seconds, virtual_packages
    steps: list[dict[str, Any]] = field(default_factory=list)  # the environment's step images: name, tag, built
    installed: bool = False  # whether this run installed (part of) the environment on the host

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kernel_name": self.kernel_name,
            "display_name": self.display_name,
            "image": self.image,
            "image_id": self.image_id,
            "workdir": str(self.workdir),
            "notebook": str(self.notebook),
            "built": self.built,
            "gpus": list(self.gpus),
            "seconds": round(self.seconds, 3),
            "packages": self.packages,
            "pip": self.pip,
            "base_image": self.base_image,
            "warnings": list(self.warnings),
            "kept": list(self.kept),
            "kernelspec": str(self.kernelspec) if self.kernelspec else None,
            "pip_resolved": list(self.pip_resolved),
            "pulled": self.pulled,
            "image_ref": self.image_ref,
            "slurm": dataclasses.asdict(self.slurm) if self.slurm is not None else None,
            "native": dict(self.native) if self.native is not None else None,
            "steps": [dict(step) for step in self.steps],
            "installed": self.installed,
        }
