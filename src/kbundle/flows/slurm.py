"""`kbundle run BUNDLE --slurm --image REF@sha256:…`: register a kernel that runs on a Slurm node.

Nothing is built or pulled here: a login node often has no container engine, and the
image is in a registry already (`kbundle push`). This flow

1. checks the image reference (a digest, never a tag) before any work (`check`);
2. takes the bundle as every run does (flows/arrive.py): opened, verified, its signature checked,
   the name claimed, the notebook placed (the workdir is where the kernel's notebook lives, on a
   file system the nodes share);
3. when this machine's engine happens to have that digest, checks its labels against the
   bundle's content hash; otherwise the node checks them at every kernel start (kernel/node_agent.py);
4. asks for consent (the image is a stranger's code that will run on the cluster), unless --yes;
5. registers `<name> (kbundle, Slurm)` as `kbundle-<name>-slurm`, beside the local kernel, with the
   job's options and this machine's address as the nodes reach it (flows/register.py: the same
   rules as every kernel's).
"""

from __future__ import annotations

import time
from dataclasses import replace

from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError
from kbundle.flows.arrive import Arrival
from kbundle.flows.options import RunOptions, RunResult
from kbundle.flows.pulling import consent_to_pull
from kbundle.flows.register import Registration, register

SUFFIX = " (kbundle, Slurm)"  # after the bundle's name, in the kernel's display name


def check(options: RunOptions):
    """--slurm needs a pushed image, pinned by its digest: refused before any work. The reference."""
    from kbundle.image import registry

    if not options.image:
        raise UsageError(
            "--slurm needs the image in a registry: push it first (`kbundle push BUNDLE --to REGISTRY/NAMESPACE`) "
            "and pass the reference it prints with --image NAME@sha256:…"
        )
    return registry.parse_pinned(options.image)


def run_on_slurm(options: RunOptions, ref, arrival: Arrival, console, undo) -> RunResult:
    from kbundle.image import make
    from kbundle.kernel.slurm import login_address

    bundle, placement = arrival.bundle, arrival.placement
    _check_labels_here(ref, arrival.content_hash)
    warnings = arrival.kept_warnings
    job = options.slurm
    if not job.login_address:
        job = replace(job, login_address=login_address(_environ()))
    consent_to_pull(console, options.yes, review_lines(arrival.signature.describe(), ref, job))
    image = make.BuiltImage(str(ref), "", make.locked_count(bundle), ref=str(ref))
    if not image.ref:
        raise KbundleError("a Slurm kernel needs its image by digest")
    pins = make.recorded_pins(bundle, arrival.content_hash)
    kernel = Registration(image.ref, [], pip_resolved=pins, image_ref=image.ref, slurm=job)
    spec_dir = register(options, arrival, kernel, warnings, console)
    return RunResult(
        name=bundle.name,
        kernel_name=arrival.kernel_name,
        display_name=arrival.display_name,
        image=str(ref),
        image_id="",
        workdir=placement.workdir,
        notebook=placement.notebook,
        built=False,
        gpus=[job.gres] if job.gres else [],
        seconds=time.perf_counter() - arrival.started,
        packages=image.packages,
        pip=len(bundle.pip),
        base_image=bundle.base_image,
        warnings=warnings,
        kept=arrival.kept,
        kernelspec=spec_dir,
        pip_resolved=pins,
        image_ref=str(ref),
        slurm=job,
    )


def review_lines(sender: str, ref, slurm) -> list[str]:
    """What `run --slurm` sets up, for the consent question (pure)."""
    job = ", ".join(
        f"{k} {v}" for k, v in (("partition", slurm.partition), ("gres", slurm.gres), ("time", slurm.time)) if v
    )
    return [
        f"sender      {safe(sender)}",
        f"image       {safe(str(ref))}",
        f"runs on     a Slurm compute node ({safe(job) or 'the cluster defaults'}), pulled there by its digest",
        "built       nothing: the node checks that the image's labels name this bundle's content hash",
    ]


def summary_lines(result: RunResult) -> list[str]:
    """The calm summary of a Slurm kernel's registration (pure)."""
    job = result.slurm
    asks = ", ".join(
        f"--{k} {v}" for k, v in (("partition", job.partition), ("gres", job.gres), ("time", job.time)) if v
    )
    lines = [
        f"image      {result.image} (pulled by each node that runs it)",
        f"runs on    a Slurm node, through srun {asks or '(the cluster defaults)'}",
        f'kernel     {result.kernel_name}  "{result.display_name}"',
        f"workdir    {result.workdir}",
        f'open it    jupyter lab {result.notebook}   (pick "{result.display_name}")',
    ]
    return [safe(line) for line in lines]


def _check_labels_here(ref, bundle_hash: str) -> None:
    """Check the image's labels here when this machine's engine has it (the node checks them anyway)."""
    from kbundle.image import registry
    from kbundle.image.engine import connect_or_none

    client = connect_or_none()  # no engine on a login node is normal
    try:
        image_id = registry.local_by_digest(client, ref) if client is not None else None
    except Exception:  # the engine went away between the calls: the node checks the labels anyway
        image_id = None
    if image_id is not None:
        registry.check_labels(client.api.inspect_image(image_id)["Config"].get("Labels"), bundle_hash, str(ref))


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)
