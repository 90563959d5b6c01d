"""`kbundle run BUNDLE --slurm --image REF@sha256:…`: register a kernel that runs on a Slurm node.

Nothing is built or pulled here: a login node often has no container engine, and the
image is in a registry already (`kbundle push`). This flow

1. opens and verifies the bundle, checks its signature, places the notebook (as `run` does:
   the workdir is where the kernel's notebook lives, on a file system the nodes share);
2. checks the image reference (a digest, never a tag) and, when this machine's engine
   happens to have that digest, its labels against the bundle's content hash; otherwise the
   node checks them at every kernel start (kernel/node_agent.py);
3. asks for consent (the image is a stranger's code that will run on the cluster), unless --yes;
4. registers `<name> (kbundle, Slurm)` as `kbundle-<name>-slurm`, beside the local kernel,
   with the job's options and this machine's address as the nodes reach it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from rich.markup import escape

from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError


def run_on_slurm(options, console, undo):
    from kbundle.bundle import open_bundle
    from kbundle.flows import run as runflow
    from kbundle.flows.review import check_signature, read_sender
    from kbundle.image import registry
    from kbundle.image import workdir as wd
    from kbundle.kernel.slurm import login_address
    from kbundle.kernel.spec import kernel_name_for, slurm_kernel_name

    t0 = time.perf_counter()
    if not options.image:
        raise UsageError(
            "--slurm needs the image in a registry: push it first (`kbundle push BUNDLE --to REGISTRY/NAMESPACE`) "
            "and pass the reference it prints with --image NAME@sha256:…"
        )
    ref = registry.parse_pinned(options.image)
    bundle = open_bundle(options.bundle, max_extract=options.max_extract)
    signature = read_sender(bundle)
    check_signature(signature, options.require_signature)
    local_name = options.name or bundle.name
    kernel_name = slurm_kernel_name(kernel_name_for(local_name))
    runflow._claim(bundle, options, kernel_name)
    display_name = f"{safe(local_name)} (kbundle, Slurm)"
    target = options.workdir or wd.default_workdir(local_name)
    undo.created_folder(target)
    placement = wd.place(bundle, target, kernel_name, display_name)

    _check_labels_here(ref, runflow.bundle_hash(bundle))
    warnings: list[str] = []
    slurm = options.slurm
    if not slurm.login_address:
        slurm = replace(slurm, login_address=login_address(_environ()))
    runflow.consent_to_pull(console, options.yes, review_lines(signature.describe(), ref, slurm))
    image = runflow.Image(str(ref), "", runflow._locked_count(bundle), ref=str(ref))
    spec_dir = _register(
        runflow, bundle, replace(options, slurm=slurm), kernel_name, image, placement, warnings, console
    )
    return runflow.RunResult(
        name=bundle.name,
        kernel_name=kernel_name,
        display_name=display_name,
        image=str(ref),
        image_id="",
        workdir=placement.workdir,
        notebook=placement.notebook,
        built=False,
        gpus=[slurm.gres] if slurm.gres else [],
        seconds=time.perf_counter() - t0,
        packages=image.packages,
        pip=len(bundle.pip),
        base_image=bundle.base_image,
        warnings=warnings,
        kept=[{"path": str(k.path), "fresh": str(k.fresh)} for k in placement.kept],
        kernelspec=spec_dir,
        image_ref=str(ref),
        slurm=slurm,
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


def _register(runflow, bundle, options, kernel_name: str, image, placement, warnings, console) -> Path:
    """The kernelspec, under the same name lock and collision rules as a local kernel's."""
    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    with runflow._lock(f"kernel-{kernel_name}", console, f"another kbundle run is registering {kernel_name}; waiting"):
        _previous, replaced = runflow._claim(bundle, options, kernel_name)
        if replaced:
            warnings.append(replaced)
            console.print(f"[yellow]warning:[/] {escape(safe(replaced))}", soft_wrap=True)
        metadata = {
            "bundle": str(Path(options.bundle).resolve()),
            "notebook": str(placement.notebook),
            "cuda": bundle.cuda,
            "image_ref": image.ref,
        }
        request = KernelRequest(
            kernel_name,
            safe(options.name or bundle.name),
            image.ref,
            str(placement.workdir),
            [],
            runflow.bundle_hash(bundle),
            metadata,
            slurm=options.slurm,
        )
        if not image.ref:
            raise KbundleError("a Slurm kernel needs its image by digest")
        return install_kernelspec(request)
