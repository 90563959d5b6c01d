"""`kbundle run`: the recipient's flow, one step per module.

1. open the bundle once, verifying every member (bundle/reader.py); read its signature
2. place its notebook and files in the working directory (image/workdir.py)
3. preflight: the engine, GPUs, driver (image/preflight.py)
4. look, offline: the lock's package locations (image/provenance.py), kbundle's own
   rendering of the Dockerfile against the shipped one, whether the base image is local
5. consent, informed (flows/review.py): the sender, the base image, every host to be contacted, package
   counts and sizes, anything unusual. Without --yes nothing touches the network before
   the answer: no pull, no solve, no download
6. identify the image (pull the base, solve an unlocked env, hash into a tag); assemble
   the context and build only when that tag is missing (image/context.py, image/env.py,
   image/bytecode.py, image/wheels.py, image/build.py)
7. register the kernel (kernel/spec.py)

Nothing is registered unless the image exists under its content tag, so a failed or
interrupted build leaves no kernel behind. kbundle builds the Dockerfile it renders
from the manifest, never the shipped one unless --use-bundled-dockerfile says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.markup import escape

from kbundle.bundle.format import WORK_DIR
from kbundle.bundle.reader import DEFAULT_MAX_EXTRACT
from kbundle.cache import cache_root
from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError
from kbundle.flows.review import (
    Review,
    check_signature,
    conda_summary,
    consent,
    dockerfile_diff,
    pip_hosts,
    read_sender,
    registry_of,
    unpinned,
    url_host,
)


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
        }


# ----------------------------------------------------------------- the flow


@dataclass
class Plan:
    """What run decided before consent, offline."""

    dockerfile: str
    records: Optional[tuple]  # the lock's records; None when unlocked (solved after consent)
    review: Review
    warnings: list[str]
    base_local: bool


def run_bundle(options: RunOptions, console) -> RunResult:
    from kbundle.bundle import open_bundle
    from kbundle.image import build as imagemod
    from kbundle.image import preflight
    from kbundle.image import workdir as wd
    from kbundle.kernel.spec import kernel_name_for

    t0 = time.perf_counter()
    request = preflight.GpuRequest.parse(options.gpus)  # bad --gpus fails before any work
    if options.network not in ("bridge", "host"):
        raise UsageError(f"--network must be bridge or host, not {options.network!r}")
    bundle = open_bundle(options.bundle, max_extract=options.max_extract)
    signature = read_sender(bundle)
    check_signature(signature, options.require_signature)
    kernel_name = kernel_name_for(bundle.name)
    display_name = f"{safe(bundle.name)} (kbundle)"

    placement = wd.place(bundle, options.workdir or wd.default_workdir(bundle.name), kernel_name, display_name)
    warnings = [
        f"kept your {k.path} (it differs from the bundle's); the bundle's copy is at {k.fresh}" for k in placement.kept
    ]

    client = preflight.connect()
    base = options.base_image or bundle.base_image
    report = preflight.run_preflight(client, bundle.cuda, request, probe_image=base)
    report.raise_for_errors()
    warnings += [f.message for f in report.warnings]

    plan = _plan(client, bundle, options, base, signature, placement.workdir)
    warnings += plan.warnings
    for message in warnings:
        console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)

    image_id = None
    if plan.records is not None and plan.base_local:  # everything known offline: maybe already built
        resolved, key = _identify(bundle, plan, base, imagemod.base_image_id(client, base, console))
        image_id = imagemod.existing_image(client, key.tag)
    build_log = None
    if image_id is None:
        consent(console, yes=options.yes, review=plan.review, signature=signature)
        resolved, key = _identify(bundle, plan, base, imagemod.base_image_id(client, base, console))
        image_id = imagemod.existing_image(client, key.tag)
    if image_id is None:
        result = _build(client, bundle, resolved, key, placement.workdir, console, base)
        image_id, build_log = result.image_id, result.log

    spec_dir = _register(bundle, options, kernel_name, key.tag, placement, list(report.plan.gpus), warnings, console)
    return RunResult(
        name=bundle.name,
        kernel_name=kernel_name,
        display_name=display_name,
        image=key.tag,
        image_id=image_id,
        workdir=placement.workdir,
        notebook=placement.notebook,
        built=build_log is not None,
        gpus=list(report.plan.gpus),
        seconds=time.perf_counter() - t0,
        packages=resolved.count,
        pip=len(bundle.pip),
        base_image=base,
        warnings=warnings,
        kept=[{"path": str(k.path), "fresh": str(k.fresh)} for k in placement.kept],
        kernelspec=spec_dir,
        build_log=build_log,
        pip_resolved=_pip_resolved(bundle),
    )


def declared_channels(bundle) -> tuple[str, ...]:
    """The channels the manifest declares: as the sender's conda resolved them, and as named."""
    return tuple(dict.fromkeys([*bundle.manifest.channel_urls, *bundle.channels]))


def rendered_dockerfile(bundle, base_image: Optional[str]) -> str:
    """kbundle's own rendering of the manifest, with --base-image applied."""
    from kbundle.bundle import BundleError
    from kbundle.image import build as imagemod
    from kbundle.pack.dockerfile import render_for

    try:
        text = render_for(bundle.manifest)
    except UsageError as exc:
        raise BundleError(f"the bundle's manifest cannot be rendered into a Dockerfile: {exc}") from None
    return imagemod.with_base_image(text, base_image) if base_image else text


def _plan(client, bundle, options: RunOptions, base: str, signature, workdir: Path) -> Plan:
    """Everything the review shows, found offline: the lock is read, not fetched."""
    from kbundle.image import build as imagemod
    from kbundle.image import env as envmod
    from kbundle.image import preflight, provenance
    from kbundle.image import workdir as wd

    rendered = rendered_dockerfile(bundle, options.base_image)
    shipped = bundle.dockerfile_text
    if options.base_image:
        shipped = imagemod.with_base_image(shipped, options.base_image)
    diff = dockerfile_diff(shipped, rendered)
    dockerfile = shipped if options.use_bundled_dockerfile else rendered
    warnings, unusual = [], []
    if diff:
        which = "the bundle's, as --use-bundled-dockerfile asks" if options.use_bundled_dockerfile else "kbundle's"
        warnings.append(f"the bundle's Dockerfile differs from kbundle's rendering of its manifest; building {which}")
        unusual.append(f"the shipped Dockerfile differs from kbundle's rendering (building {which})")
    channels = declared_channels(bundle)
    records = None
    if bundle.lock_text:
        records = envmod.resolve(envmod.EnvSpec(channels, tuple(bundle.dependencies), bundle.lock_text)).records
        hosts = [url_host(str(r.url)) for r in records]
    else:
        hosts = [url_host(provenance.channel_base(c)) for c in channels]
        unusual.append("the environment is not locked: it is solved on this machine, and may differ from the sender's")
        loose = unpinned(bundle.dependencies)
        if loose:
            unusual.append("unpinned conda specs: " + ", ".join(safe(s) for s in loose))
    if bundle.pip:
        hosts += list(pip_hosts(bundle.manifest))
    base_local = preflight.local_image(client, base)
    if not base_local:
        hosts.append(registry_of(base))
    if options.network == "host":
        unusual.append("--network host: the kernel shares this machine's network (and its loopback services)")
    review = Review(
        sender=safe(signature.describe()),
        base_image=base,
        base_local=base_local,
        hosts=tuple(dict.fromkeys(hosts)),
        conda=conda_summary(records, bundle.dependencies),
        pip=len(bundle.pip),
        unusual=tuple(unusual),
        diff=diff,
        dockerfile=str(wd.review_dockerfile(workdir, dockerfile)),
    )
    return Plan(dockerfile, records, review, warnings, base_local)


def bundle_hash(bundle) -> str:
    """The bundle's content hash; bundles sealed without one get it computed from the verified members."""
    found = getattr(bundle, "content_hash", None)
    if isinstance(found, str) and found:
        return found
    from kbundle.bundle.format import content_hash

    return bundle.manifest.content_hash or content_hash(bundle.members)


def target_of(bundle) -> tuple[str, ...]:
    """The image's virtual packages for an unlocked solve: as recorded, else from the base image's OS."""
    from kbundle import contract
    from kbundle.facts import glibc_for

    recorded = bundle.manifest.virtual_packages
    if recorded:
        return tuple(recorded)
    return tuple(contract.target_virtual_packages(glibc_for(bundle.base_image), bundle.cuda))


def _identify(bundle, plan: Plan, base: str, base_id: str):
    """The resolved environment and the image key (its tag). An unlocked bundle is solved here."""
    from kbundle.image import build as imagemod
    from kbundle.image import env as envmod

    if plan.records is not None:
        resolved = envmod.ResolvedEnv(tuple(plan.records), locked=True)
    else:
        spec = envmod.EnvSpec(declared_channels(bundle), tuple(bundle.dependencies), None, target_of(bundle))
        resolved = envmod.resolve(spec)
    key = imagemod.ImageKey(bundle.name, resolved.content_hash, tuple(bundle.pip), plan.dockerfile, base, base_id)
    return resolved, key


def _build(client, bundle, resolved, key, workdir: Path, console, base: str):
    """Assemble a temporary build context and build it."""
    from kbundle.image import build as imagemod
    from kbundle.image import context

    with context.temporary_context(key.digest[:12]) as ctx:
        assemble_context(ctx, bundle, resolved, key.dockerfile, console, base_image=base, client=client)
        return imagemod.build(client, ctx, key, bundle_hash(bundle), workdir / ".kbundle" / "build.log", console)


def assemble_context(
    ctx: Path, bundle, resolved, dockerfile: str, console=None, *, base_image: Optional[str] = None, client=None
) -> None:
    """Fill `ctx` as the image contract says (image/context.py): everything is fetched on the host,
    and the env is byte-compiled in a throwaway container of the base image (image/bytecode.py)."""
    from kbundle import contract
    from kbundle.image import bytecode, context, preflight, wheels
    from kbundle.image import env as envmod
    from kbundle.specs import PipIndexes

    console = console or _quiet_console()
    client = client or preflight.connect()
    context.write_static(ctx, dockerfile)
    with console.status(f"installing {resolved.count} conda packages for {contract.PREFIX}") as status:
        envmod.install(
            resolved,
            context.env_dir(ctx),
            on_progress=lambda done, total: status.update(
                f"installing conda packages for {contract.PREFIX}: {done}/{total}"
            ),
        )
    with console.status("byte-compiling the environment"):
        compiled = bytecode.compile_env(
            context.env_dir(ctx),
            cache_root() / "pyc",
            resolved.interpreter_id(),
            client=client,
            image=base_image or bundle.base_image,
        )
    if compiled.skipped:
        console.print(
            f"[yellow]warning:[/] not byte-compiled ({escape(compiled.skipped)}): kernels will start slower",
            soft_wrap=True,
        )
    if bundle.pip:
        python = bundle.python or resolved.python_version()
        if not python:
            raise KbundleError("the bundle has pip: pins but no Python version to fetch wheels for")
        # pip's part (image/wheels.py): exact hashed pins are fetched as they are; anything else is
        # resolved by pip here for the image, VCS/sdist lines built in a throwaway container.
        indexes = PipIndexes.from_dict(bundle.manifest.pip_indexes)
        builder = wheels.ContainerBuilder(client, base_image or bundle.base_image, context.env_dir(ctx))
        with console.status(f"fetching {len(bundle.pip)} pip requirement(s) as wheels for CPython {python}"):
            fetched = wheels.fetch(bundle.pip, python, indexes, wheels.glibc_of(target_of(bundle)), builder)
        wheels.write_context(fetched, ctx)
        wheels.remember_resolution(bundle_hash(bundle), fetched.resolution)
        console.print(
            f"pip: {len(fetched.resolution)} wheel(s): " + ", ".join(r.split(" ")[0] for r in fetched.resolution)
        )
    bundle.extract(ctx, bundle.members_under(WORK_DIR))


def _quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def _register(
    bundle, options: RunOptions, kernel_name: str, image: str, placement, gpus: list[str], warnings: list[str], console
) -> Path:
    """Install the kernelspec; a kernel of the same name from another bundle is replaced, and we say so."""
    from kbundle.kernel.spec import KernelRequest, install_kernelspec, list_kernelspecs

    digest = bundle_hash(bundle)
    previous = next((k for k in list_kernelspecs() if k.name == kernel_name), None)
    if previous and previous.bundle_hash != digest:
        message = f"replaced kernel {kernel_name}, which ran another bundle ({previous.image})"
        warnings.append(message)
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
    metadata = {"bundle": str(Path(options.bundle).resolve()), "notebook": str(placement.notebook), "cuda": bundle.cuda}
    metadata["pip_resolved"] = _pip_resolved(bundle)  # the exact pip resolution the image was built with
    request = KernelRequest(
        kernel_name, safe(bundle.name), image, str(placement.workdir), gpus, digest, metadata, network=options.network
    )
    return install_kernelspec(request)


def _pip_resolved(bundle) -> list[str]:
    """The exact pip resolution of this bundle's last build here (image/wheels.py records it)."""
    from kbundle.image import wheels

    return (wheels.recorded_resolution(bundle_hash(bundle)) or []) if bundle.pip else []


def summary_lines(result: RunResult) -> list[str]:
    where = "GPUs " + ", ".join(result.gpus) if result.gpus else "CPU"
    state = f"built, {result.seconds:.1f}s" if result.built else f"already built: reused, {result.seconds:.1f}s"
    lines = [
        f"image      {result.image} ({state})",
        f"runs on    {where}",
        f'kernel     {result.kernel_name}  "{result.display_name}"',
        f"workdir    {result.workdir}",
        f'open it    jupyter lab {result.notebook}   (or pick "{result.display_name}" in VS Code)',
    ]
    return [safe(line) for line in lines]  # names and paths come from the bundle
