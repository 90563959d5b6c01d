"""`kbundle run`: the recipient's flow, one step per module.

1. check the options that need no bundle (`--gpus`, `--network`, `--image`)
2. open the bundle once, verifying every member, check its signature, refuse a kernel name another
   bundle holds, and place its notebook and files in the working directory (flows/arrive.py)
3. preflight: the engine, GPUs, driver (image/preflight.py)
4. look, offline (image/make.py `look`): the lock's package locations, kbundle's own rendering of
   the Dockerfile against the shipped one, whether the base image is local; the review's facts
   (flows/review.py) and the checks of writable places and free disk (flows/checks.py)
5. consent, informed (flows/review.py): the sender, the base image, every host to be contacted, package
   counts and sizes, anything unusual. Without --yes nothing touches the network before
   the answer: no pull, no solve, no download
6. the image (image/make.py `image_for`): reused under its content tag, built after consent, or
   pulled by `--image NAME@sha256:…` (it must carry this bundle's content hash; nothing is built).
   Concurrent runs of one tag take a lock (an flock in the cache): one builds, the others reuse.
   `image_for` here is this step with its review and consent, for run and push alike.
7. register the kernel (flows/register.py), inside the image's lock

`--native` (flows/native.py) and `--slurm` (flows/slurm.py) share steps 1-2 and 7 and take their
own way between: no engine and no image natively, an image already in a registry for Slurm.

Nothing is registered unless the image exists under its content tag and the kernel's workdir
exists, so a failed or interrupted build leaves no kernel behind, and no run exits 0 with a
kernel that cannot start. kbundle builds the Dockerfile it renders
from the manifest, never the shipped one unless --use-bundled-dockerfile says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle.display import safe
from kbundle.errors import UsageError
from kbundle.flows import native, slurm
from kbundle.flows.arrive import Arrival, arrive
from kbundle.flows.checks import Needs, check_solved, disk_truth, engine_root, estimate, places, prechecks
from kbundle.flows.notices import print_warnings
from kbundle.flows.options import RunOptions, RunResult
from kbundle.flows.pulling import consent_to_pull, pull_review_lines
from kbundle.flows.register import Registration, kernel_workdir, register
from kbundle.flows.review import (
    Review,
    conda_summary,
    consent,
    dockerfile_diff,
    pip_hosts,
    registry_of,
    unpinned,
    url_host,
)
from kbundle.image import make
from kbundle.image.make import BuiltImage, declared_channels, target_of

__all__ = [  # what other modules and the tests name from here
    "BuiltImage",
    "RunOptions",
    "RunResult",
    "bundle_hash",
    "consent_to_pull",
    "declared_channels",
    "image_for",
    "kernel_workdir",
    "pull_review_lines",
    "run_bundle",
    "summary_lines",
    "target_of",
]


@dataclass
class Plan:
    """What run decided before consent, offline."""

    look: make.Look  # the image stage's part: Dockerfiles, the lock's records, the base image
    review: Review
    warnings: list[str]
    needs: Optional[Needs] = None  # download and disk, estimated offline


def run_bundle(options: RunOptions, console) -> RunResult:
    """The flow; a run that fails, is declined or is interrupted removes what it created
    (the workdir it made, the build context, untagged images: flows/undo.py)."""
    from kbundle.flows.undo import Undo
    from kbundle.kernel.spec import NATIVE_SLURM_SUFFIX, NATIVE_SUFFIX, kernel_name_for, slurm_kernel_name

    with Undo() as undo, disk_truth(lambda: _disk_places(options, undo)):
        if options.native or options.prefix_root is not None:
            ready = native.check(options)
            if options.slurm is not None:  # beside the bundle's local kernel, as an image's Slurm kernel is
                naming, suffix = (lambda n: slurm_kernel_name(kernel_name_for(n))), NATIVE_SLURM_SUFFIX
            else:
                naming, suffix = kernel_name_for, NATIVE_SUFFIX
            arrival = arrive(options, undo, bundle_hash, naming, suffix)
            return native.run_native(options, ready, arrival, console, undo)
        if options.slurm is not None:
            ref = slurm.check(options)
            arrival = arrive(options, undo, bundle_hash, lambda n: slurm_kernel_name(kernel_name_for(n)), slurm.SUFFIX)
            return slurm.run_on_slurm(options, ref, arrival, console, undo)
        gpus = _check(options)
        arrival = arrive(options, undo, bundle_hash, kernel_name_for, " (kbundle)")
        return _run_image(options, gpus, arrival, console, undo)


def _disk_places(options: RunOptions, undo) -> list[tuple[Path, str]]:
    """Every place a run writes, for naming the one that filled (flows/checks.py `disk_truth`)."""
    found = places(options.workdir or Path.cwd())
    root = engine_root(undo.client) if undo.client is not None else None
    if root is not None:
        found.append((root, "the engine's storage"))
    if options.prefix_root is not None:
        found.append((options.prefix_root, "the native prefixes' folder"))
    return found


def _check(options: RunOptions):
    """Step 1: what needs no bundle is refused before any work. The parsed --gpus."""
    from kbundle.image import preflight

    gpus = preflight.GpuRequest.parse(options.gpus)
    if options.network not in ("bridge", "host"):
        raise UsageError(f"--network must be bridge or host, not {options.network!r}")
    _check_image_option(options)
    return gpus


def _run_image(options: RunOptions, gpus, arrival: Arrival, console, undo) -> RunResult:
    """Steps 3-7: a kernel in the bundle's image on this engine."""
    from kbundle.image import preflight

    bundle, placement = arrival.bundle, arrival.placement
    warnings = arrival.kept_warnings
    client = connect_or_hint(options.engine_timeout)
    undo.client = client
    base = options.base_image or bundle.base_image
    report = preflight.run_preflight(client, bundle.cuda, gpus, probe_image=base)
    report.raise_for_errors()
    warnings += [f.message for f in report.warnings if f.topic != "engine"]  # the runtime finding says it

    # Registering inside image_for's lock makes the builder's workdir the kernel's (flows/register.py).
    with image_for(
        client, bundle, options, base, arrival.signature, placement.workdir, warnings, console, undo
    ) as image:
        _check_image(client, image.tag)
        kernel = Registration(
            image.tag,
            list(report.plan.gpus),
            pip_resolved=make.recorded_pins(bundle, arrival.content_hash),
            image_ref=image.ref,
            network=options.network,
        )
        spec_dir = register(options, arrival, kernel, warnings, console)
    return RunResult(
        name=bundle.name,
        kernel_name=arrival.kernel_name,
        display_name=arrival.display_name,
        image=image.tag,
        image_id=image.image_id,
        workdir=placement.workdir,
        notebook=placement.notebook,
        built=image.built,
        gpus=list(report.plan.gpus),
        seconds=time.perf_counter() - arrival.started,
        packages=image.packages,
        pip=len(bundle.pip),
        base_image=base,
        warnings=warnings,
        kept=arrival.kept,
        kernelspec=spec_dir,
        build_log=image.build_log,
        pip_resolved=make.recorded_pins(bundle, arrival.content_hash),
        pulled=image.pulled,
        image_ref=image.ref,
        steps=[{"name": s.name, "tag": s.tag, "built": s.built} for s in image.steps],
        installed=image.installed,
    )


def _check_image(client, tag: str) -> None:
    """The kernel runs `tag`: refuse to register it when the engine lost that image (removed by
    another process since it was built or found), rather than leave a kernel that cannot start."""
    from kbundle.errors import KbundleError
    from kbundle.image import engine

    if engine.image_id(client, tag) is None:
        raise KbundleError(f"the image {tag} is gone from the engine (removed while this run worked): run again")


def connect_or_hint(timeout: float):
    """The engine; when none answers, the error also says that `--native` exists and what it means
    (it is never chosen silently)."""
    from kbundle.errors import MachineError
    from kbundle.image import engine, preflight

    try:
        return engine.connect(timeout)
    except MachineError as exc:
        raise MachineError(f"{exc}; {preflight.NATIVE_HINT}") from None


@contextmanager
def image_for(
    client, bundle, options: RunOptions, base: str, signature, workdir: Path, warnings: list[str], console, undo
) -> Iterator[BuiltImage]:
    """Steps 4-6: the bundle's image on this engine (image/make.py), held under its lock for the
    block (run registers the kernel there, push pushes), after the review and the consent.
    Prints `warnings` (with the plan's) before anything is fetched."""
    request = make.ImageRequest(
        bundle_hash(bundle), base, options.base_image, options.use_bundled_dockerfile, options.image, options.rebuild
    )
    if options.image:
        prechecks(None, workdir)
        print_warnings(console, warnings)

        def ask(ref) -> None:  # only when this engine lacks the image: nothing is fetched before the answer
            consent_to_pull(console, options.yes, pull_review_lines(signature.describe(), ref))

        with make.image_for(client, bundle, request, None, ask, workdir, console, undo) as image:
            yield image
        return
    plan = plan_image(client, bundle, options, request, signature, workdir)
    warnings += plan.warnings
    engine_disk = engine_root(client)
    prechecks(plan.needs, workdir, engine_disk)
    print_warnings(console, warnings)

    def ask(_ref) -> None:  # only when the image must be built
        consent(console, yes=options.yes, review=plan.review, signature=signature)

    def solved(records) -> None:  # an unlocked bundle: its sizes are known now
        check_solved(records, tuple(bundle.pip), engine_disk, plan.look.base_size)

    with make.image_for(client, bundle, request, plan.look, ask, workdir, console, undo, solved) as image:
        yield image


def _check_image_option(options: RunOptions) -> None:
    """--image is refused before any work when it names no digest or comes with a build option."""
    if not options.image:
        return
    from kbundle.image import registry

    registry.parse_pinned(options.image)
    if options.base_image or options.use_bundled_dockerfile or options.rebuild:
        raise UsageError(
            "--image runs an image built elsewhere: --base-image, --use-bundled-dockerfile and --rebuild build one"
        )


def plan_image(client, bundle, options: RunOptions, request: make.ImageRequest, signature, workdir: Path) -> Plan:
    """Everything the review shows, found offline: the lock is read, not fetched."""
    from kbundle.image import provenance
    from kbundle.image import workdir as wd

    look = make.look(client, bundle, request)
    diff = dockerfile_diff(look.shipped, look.rendered)
    warnings, unusual = [], []
    if diff:
        which = "the bundle's, as --use-bundled-dockerfile asks" if options.use_bundled_dockerfile else "kbundle's"
        warnings.append(f"the bundle's Dockerfile differs from kbundle's rendering of its manifest; building {which}")
        unusual.append(f"the shipped Dockerfile differs from kbundle's rendering (building {which})")
    if look.records is not None:
        hosts = [url_host(str(r.url)) for r in look.records]
    else:
        hosts = [url_host(provenance.channel_base(c)) for c in declared_channels(bundle)]
        unusual.append("the environment is not locked: it is solved on this machine, and may differ from the sender's")
        loose = unpinned(bundle.dependencies)
        if loose:
            unusual.append("unpinned conda specs: " + ", ".join(safe(s) for s in loose))
    if bundle.pip:
        hosts += list(pip_hosts(bundle.manifest))
    if not look.base_local:
        hosts.append(registry_of(request.base))
    if options.network == "host":
        unusual.append("--network host: the kernel shares this machine's network (and its loopback services)")
    needs = estimate(look.records, look.base_size, tuple(bundle.pip))
    review = Review(
        sender=safe(signature.describe()),
        base_image=request.base,
        base_local=look.base_local,
        hosts=tuple(dict.fromkeys(hosts)),
        conda=conda_summary(look.records, bundle.dependencies),
        pip=len(bundle.pip),
        unusual=tuple(unusual),
        diff=diff,
        dockerfile=str(wd.review_dockerfile(workdir, look.dockerfile)),
        disk=needs.describe(),
    )
    return Plan(look, review, warnings, needs)


def bundle_hash(bundle) -> str:
    """The bundle's identity (`Bundle.identity`, docs/format.md `bundle_hash`): its members' content
    hash and every manifest field that defines what is built. Images are labelled with it, and pip
    resolutions, kernels and native prefixes are keyed by it, so a copy with the same members and
    another manifest (a stranger's pip section) shares none of them with the original."""
    found = getattr(bundle, "identity", None)
    if isinstance(found, str) and found:
        return found
    from kbundle.bundle.format import content_hash_of, identity_of

    digests = {path: entry.sha256 for path, entry in bundle.members.items()}
    return identity_of(bundle.manifest, bundle.manifest.content_hash or content_hash_of(digests))


def summary_lines(result: RunResult) -> list[str]:
    if result.native is not None:
        return native.summary_lines(result)
    if result.slurm is not None:
        return slurm.summary_lines(result)
    where = "GPUs " + ", ".join(result.gpus) if result.gpus else "CPU"
    state = f"built, {result.seconds:.1f}s" if result.built else f"already built: reused, {result.seconds:.1f}s"
    if result.image_ref:
        how = "pulled" if result.pulled else "already here by its digest: reused"
        state = f"{how} {result.image_ref}, {result.seconds:.1f}s"
    lines = [
        f"image      {result.image} ({state})",
        f"runs on    {where}",
        f'kernel     {result.kernel_name}  "{result.display_name}"',
        f"workdir    {result.workdir}",
        f'open it    jupyter lab {result.notebook}   (or pick "{result.display_name}" in VS Code)',
    ]
    return [safe(line) for line in lines]  # names and paths come from the bundle
