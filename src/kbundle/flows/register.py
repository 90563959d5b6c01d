"""The kernel's registration, one step for every kind of kernel `run` makes: in an image on this
engine, on a Slurm node, or native in a prefix on this machine.

The same rules hold for all three: a name another bundle's kernel holds is refused (kernel/spec.py
`claim_name`; --name, --replace), the collision check and the write are one step under a lock on
the name, runs of one bundle in several folders keep the workdir registered first while it exists
(`kernel_workdir`), a kernel whose workdir is gone is never registered (and the folder of one
that is stays, whichever concurrent run fails later), and the kernelspec records the bundle, its
notebook, its CUDA and the exact pip resolution it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError
from kbundle.flows.notices import warn
from kbundle.flows.options import RunOptions
from kbundle.image.locks import held


@dataclass(frozen=True)
class Registration:
    """Where the kernel runs, beyond what the arrival (flows/arrive.py) knows."""

    image: str  # the image's tag here; for Slurm the pinned reference the node pulls; "" native
    gpus: list[str]
    pip_resolved: list[str] = field(default_factory=list)  # the exact pip resolution the kernel runs
    image_ref: Optional[str] = None  # pinned, so that a kernel elsewhere (a Slurm node) pulls the very same image
    network: str = "bridge"
    slurm: Any = None  # kernel/slurm.py's SlurmOptions
    native: Optional[str] = None  # the prefix a native kernel runs
    env: dict[str, str] = field(default_factory=dict)  # a native kernel's activation


def claim(options: RunOptions, content_hash: str, kernel_name: str, legacy_hash: str = ""):
    """(the kernel registered under `kernel_name` now, or None; a warning when --replace takes
    over another bundle's). Another bundle's kernel of that name is refused (kernel/spec.py).

    `legacy_hash`: the bundle's member-only content hash, which kernels registered before the
    bundle identity existed recorded; such a kernel of this very bundle is the same bundle."""
    from kbundle.kernel.spec import claim_name, list_kernelspecs

    if options.name is not None and not any(c.isalnum() for c in options.name):
        raise UsageError(f"--name {options.name!r}: give a name with letters or digits")
    kernels = list_kernelspecs()
    previous = next((k for k in kernels if k.name == kernel_name), None)
    if previous is not None and legacy_hash and previous.bundle_hash == legacy_hash:
        content_hash = legacy_hash
    message = claim_name(kernel_name, content_hash, previous, options.replace, {k.name for k in kernels})
    return previous, message


def kernel_workdir(ours: str, previous: Optional[str], same_bundle: bool, previous_exists: bool, replace: bool):
    """(the workdir the kernel points at, a warning or None) when this bundle's kernel is registered (pure).

    Runs of one bundle in several folders register one kernel: the folder already registered
    stays while it exists (a notebook open there keeps working), and the later runs are told
    so. Under the image lock the first registration is the builder's, so concurrent runs
    agree. --replace, or another bundle's kernel, points it at ours."""
    if previous is None or previous == ours or not same_bundle or not previous_exists or replace:
        return ours, None
    return previous, (
        f"the kernel keeps its workdir {previous}, where another run of this bundle placed it; "
        f"this run's files are in {ours} (--replace points the kernel here)"
    )


def register(options: RunOptions, arrival, kernel: Registration, warnings: list[str], console) -> Path:
    """Install the kernelspec, under a lock on its name: the collision check and the write are one step."""
    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    name, bundle, placement = arrival.kernel_name, arrival.bundle, arrival.placement
    with held(f"kernel-{name}", console, f"another kbundle run is registering {name}; waiting"):
        legacy = getattr(bundle, "content_hash", "")
        previous, replaced = claim(options, arrival.content_hash, name, legacy)
        same = bool(previous) and previous.bundle_hash in (arrival.content_hash, legacy)
        metadata: dict[str, Any] = {"bundle": str(Path(options.bundle).resolve()), "notebook": str(placement.notebook)}
        metadata["cuda"] = bundle.cuda
        metadata["pip_resolved"] = list(kernel.pip_resolved)
        if kernel.image_ref:
            metadata["image_ref"] = kernel.image_ref
        old = previous.workdir if previous else None
        workdir, kept = kernel_workdir(
            str(placement.workdir), old, same, bool(old) and Path(old).is_dir(), options.replace
        )
        if kept:  # the kernel's notebook is the one in its workdir
            metadata["notebook"] = str(previous.metadata.get("notebook") or metadata["notebook"])
        for message in filter(None, (replaced, kept, _moved(name, previous, same, kernel))):
            warn(console, warnings, message)
        _check_workdir(Path(workdir), placement.workdir, name)
        request = KernelRequest(
            name,
            safe(options.name or bundle.name),
            kernel.image,
            workdir,
            list(kernel.gpus),
            arrival.content_hash,
            metadata,
            network=kernel.network,
            slurm=kernel.slurm,
            native=kernel.native,
            env=dict(kernel.env),
        )
        return install_kernelspec(request)


def _check_workdir(workdir: Path, placed: Path, name: str) -> None:
    """The kernel starts in `workdir`: refuse to register it when that folder is gone, and keep
    the folder this run placed from any other run's undo from now on (image/workdir.py)."""
    from kbundle.image import workdir as wd

    if not workdir.is_dir():
        raise KbundleError(
            f"kernel {name} would start in {workdir}, which is gone (removed while this run worked): run again"
        )
    wd.mark_relied_on(placed, name)


def _moved(name: str, previous, same: bool, kernel: Registration) -> Optional[str]:
    """A kernel of this bundle that ran its image and now runs natively says so (it is one name)."""
    if kernel.native is None or not same or not previous.image or previous.native:
        return None
    return (
        f"kernel {name} ran the image {previous.image}; it now runs natively "
        "(`kbundle run` without --native takes it back to the image)"
    )
