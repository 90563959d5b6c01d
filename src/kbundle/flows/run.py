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
   Concurrent runs of one tag take a lock (an flock in the cache): one builds, the others reuse.
   `--image NAME@sha256:…` pulls that image instead (image/registry.py): it must carry this
   bundle's content hash; nothing is built. `image_for` is this step, for run and push alike.
7. register the kernel (kernel/spec.py): a name another bundle holds is refused (--name, --replace)

`--native` (flows/native.py) takes none of steps 3-6: no engine, no image; the environment is
installed on this machine and the kernel is a plain ipykernel of it, after its own consent.

Nothing is registered unless the image exists under its content tag, so a failed or
interrupted build leaves no kernel behind. kbundle builds the Dockerfile it renders
from the manifest, never the shipped one unless --use-bundled-dockerfile says so.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.markup import escape

from kbundle.bundle.format import WORK_DIR
from kbundle.bundle.reader import DEFAULT_MAX_EXTRACT
from kbundle.cache import cache_root
from kbundle.display import safe, size
from kbundle.errors import KbundleError, UsageError
from kbundle.flows.checks import Needs, estimate, prechecks
from kbundle.flows.review import (
    Review,
    _ask,
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
from kbundle.progress import Meter, finish


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
    needs: Optional[Needs] = None  # download and disk, estimated offline


@dataclass(frozen=True)
class Image:
    """The bundle's image on this engine, as `image_for` got it."""

    tag: str
    image_id: str
    packages: int
    built: bool = False
    pulled: bool = False
    ref: Optional[str] = None  # the pinned reference it was pulled by (run --image)
    build_log: Optional[Path] = None


def run_bundle(options: RunOptions, console) -> RunResult:
    """The flow; a run that fails, is declined or is interrupted removes what it created
    (the workdir it made, the build context, untagged images: flows/undo.py)."""
    from kbundle.flows.undo import Undo

    with Undo() as undo:
        if options.native or options.prefix_root is not None:
            from kbundle.flows.native import run_native

            return run_native(options, console, undo)
        if options.slurm is not None:
            from kbundle.flows.slurm import run_on_slurm

            return run_on_slurm(options, console, undo)
        return _run_bundle(options, console, undo)


def _run_bundle(options: RunOptions, console, undo) -> RunResult:
    from kbundle.bundle import open_bundle
    from kbundle.image import preflight
    from kbundle.image import workdir as wd
    from kbundle.kernel.spec import kernel_name_for

    t0 = time.perf_counter()
    request = preflight.GpuRequest.parse(options.gpus)  # bad --gpus fails before any work
    if options.network not in ("bridge", "host"):
        raise UsageError(f"--network must be bridge or host, not {options.network!r}")
    _check_image_option(options)
    bundle = open_bundle(options.bundle, max_extract=options.max_extract)
    signature = read_sender(bundle)
    check_signature(signature, options.require_signature)
    local_name = options.name or bundle.name
    kernel_name = kernel_name_for(local_name)
    _claim(bundle, options, kernel_name)  # a name collision is refused before anything is written
    display_name = f"{safe(local_name)} (kbundle)"

    target = options.workdir or wd.default_workdir(local_name)
    undo.created_folder(target)
    placement = wd.place(bundle, target, kernel_name, display_name)
    warnings = [
        f"kept your {k.path} (it differs from the bundle's); the bundle's copy is at {k.fresh}" for k in placement.kept
    ]

    client = connect_or_hint(options.engine_timeout)
    undo.client = client
    base = options.base_image or bundle.base_image
    report = preflight.run_preflight(client, bundle.cuda, request, probe_image=base)
    report.raise_for_errors()
    warnings += [f.message for f in report.warnings if f.topic != "engine"]  # the runtime finding says it

    # Registering inside image_for's lock makes the builder's workdir the kernel's (_register).
    with image_for(client, bundle, options, base, signature, placement.workdir, warnings, console, undo) as image:
        spec_dir = _register(bundle, options, kernel_name, image, placement, list(report.plan.gpus), warnings, console)
    return RunResult(
        name=bundle.name,
        kernel_name=kernel_name,
        display_name=display_name,
        image=image.tag,
        image_id=image.image_id,
        workdir=placement.workdir,
        notebook=placement.notebook,
        built=image.built,
        gpus=list(report.plan.gpus),
        seconds=time.perf_counter() - t0,
        packages=image.packages,
        pip=len(bundle.pip),
        base_image=base,
        warnings=warnings,
        kept=[{"path": str(k.path), "fresh": str(k.fresh)} for k in placement.kept],
        kernelspec=spec_dir,
        build_log=image.build_log,
        pip_resolved=_pip_resolved(bundle),
        pulled=image.pulled,
        image_ref=image.ref,
    )


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
) -> Iterator[Image]:
    """The bundle's image on this engine, held under its lock for the block (run registers the
    kernel there, push pushes): pulled when `options.image` pins one, else reused under its content
    tag, or built after consent. Prints `warnings` (with the plan's) before anything is fetched."""
    from kbundle.image import build as imagemod

    if options.image:
        with _pulled(client, bundle, options, signature, workdir, warnings, console, undo) as image:
            yield image
        return
    plan = plan_image(client, bundle, options, base, signature, workdir)
    warnings += plan.warnings
    prechecks(plan.needs, workdir)
    _print_warnings(console, warnings)

    image_id = None
    if plan.records is not None and plan.base_local:  # everything known offline: maybe already built
        resolved, key = _identify(bundle, plan, base, imagemod.base_image_id(client, base, console))
        image_id = imagemod.existing_image(client, key.tag)
    build_log = None
    if image_id is None:
        consent(console, yes=options.yes, review=plan.review, signature=signature)
        resolved, key = _identify(bundle, plan, base, imagemod.base_image_id(client, base, console))
    # Concurrent runs of one image: the first builds, the others wait here, then reuse it.
    with _lock(f"image-{key.tag}", console, f"another kbundle run is building {key.tag}; waiting for it"):
        image_id = imagemod.existing_image(client, key.tag)
        if image_id is None:
            result = _build(client, bundle, resolved, key, workdir, console, base, undo)
            image_id, build_log = result.image_id, result.log
        yield Image(key.tag, image_id, resolved.count, built=build_log is not None, build_log=build_log)


@contextmanager
def _pulled(client, bundle, options: RunOptions, signature, workdir: Path, warnings, console, undo) -> Iterator[Image]:
    """`--image`: pull the pinned image (after consent, unless this engine has it), refuse it
    unless its labels name this bundle's content hash, and tag it here as this bundle's."""
    from kbundle.image import registry

    ref = registry.parse_pinned(options.image)
    tag = registry.pulled_tag(bundle.name, ref.digest)
    prechecks(None, workdir)
    _print_warnings(console, warnings)
    if registry.local_by_digest(client, ref) is None:  # nothing is fetched before the answer
        consent_to_pull(console, options.yes, pull_review_lines(signature.describe(), ref))
    with _lock(f"image-{tag}", console, f"another kbundle run is fetching {tag}; waiting for it"):
        got = registry.pull(client, ref, console)
        if got.pulled:
            undo.image(got.image_id)  # refused below: an image only this run fetched goes again
        registry.verify_and_tag(client, got.image_id, ref, bundle_hash(bundle), tag)
        yield Image(tag, got.image_id, _locked_count(bundle), pulled=got.pulled, ref=str(ref))


def _check_image_option(options: RunOptions) -> None:
    """--image is refused before any work when it names no digest or comes with a build option."""
    if not options.image:
        return
    from kbundle.image import registry

    registry.parse_pinned(options.image)
    if options.base_image or options.use_bundled_dockerfile:
        raise UsageError("--image runs an image built elsewhere: --base-image and --use-bundled-dockerfile build one")


def pull_review_lines(sender: str, ref) -> list[str]:
    """What `run --image` is about to do, for the consent question (pure)."""
    return [
        f"sender      {safe(sender)}",
        f"image       {safe(str(ref))}",
        f"contacts    {safe(ref.registry)} (the image is pulled from there)",
        "built       nothing: the image was built elsewhere; its labels must name this bundle's content hash",
    ]


def consent_to_pull(console, yes: bool, lines: list[str], ask=_ask, interactive: Optional[bool] = None) -> None:
    """Running an image someone else built is running their code: show it and ask, unless --yes."""
    if yes:
        return
    if not (sys.stdin.isatty() if interactive is None else interactive):
        raise KbundleError(
            "this runs an image someone else built; review the bundle (kbundle inspect) and pass --yes "
            "to pull it (stdin is not a terminal, so kbundle cannot ask)"
        )
    console.print("[bold]About to pull an image and register a kernel; nothing is built:[/]", soft_wrap=True)
    for line in lines:
        console.print(escape(line), soft_wrap=True, highlight=False)
    if not ask(console, "Pull it and register the kernel? [y/N] "):
        raise KbundleError("not pulled: you declined (pass --yes to skip the question)")


def _print_warnings(console, warnings: list[str]) -> None:
    for message in warnings:
        console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)


def _locked_count(bundle) -> int:
    """The packages of the bundle's lock (read offline); 0 for an unlocked bundle, which is solved only to build."""
    from kbundle.image import env as envmod

    if not bundle.lock_text:
        return 0
    return len(
        envmod.resolve(envmod.EnvSpec(declared_channels(bundle), tuple(bundle.dependencies), bundle.lock_text)).records
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


def plan_image(client, bundle, options: RunOptions, base: str, signature, workdir: Path) -> Plan:
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
    needs = estimate(records, preflight.image_size(client, base) if base_local else None)
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
        disk=needs.describe(),
    )
    return Plan(dockerfile, records, review, warnings, base_local, needs)


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


def _build(client, bundle, resolved, key, workdir: Path, console, base: str, undo=None):
    """Assemble a temporary build context and build it.

    The log is written in kbundle's cache (a failed run removes the workdir it made) and
    copied to `<workdir>/.kbundle/build.log` once the image is built."""
    import shutil

    from kbundle.image import build as imagemod
    from kbundle.image import context

    log = cache_root() / "logs" / f"{key.tag.split('/')[-1].replace(':', '-')}.build.log"
    with context.temporary_context(key.digest[:12]) as ctx:
        done = assemble_context(ctx, bundle, resolved, key.dockerfile, console, base_image=base, client=client)
        result = imagemod.build(client, ctx, key, bundle_hash(bundle), log, console, undo=undo, preamble=done)
    kept = workdir / ".kbundle" / "build.log"
    shutil.copyfile(log, kept)
    return dataclasses.replace(result, log=kept)


def assemble_context(
    ctx: Path, bundle, resolved, dockerfile: str, console=None, *, base_image: Optional[str] = None, client=None
) -> list[str]:
    """Fill `ctx` as the image contract says (image/context.py): the env installed on the host (conda
    with rattler; then the pip: section's wheels, fetched here, installed by the env's pip in a
    throwaway container: image/pipinstall.py), byte-compiled in another (image/bytecode.py), and
    split into the Dockerfile's layers (image/layers.py). Returns what the build log starts with:
    the exact pip resolution and the layers."""
    from kbundle import contract
    from kbundle.image import bytecode, context, engine, pipinstall, sourcebuild, wheels
    from kbundle.image import env as envmod
    from kbundle.specs import PipIndexes

    problem = context.layout_problem(dockerfile)
    if problem:
        raise KbundleError(problem)
    console = console or _quiet_console()
    client = client or engine.connect()
    image = base_image or bundle.base_image
    env_dir = context.env_dir(ctx)
    context.write_static(ctx, dockerfile)
    t0 = time.perf_counter()
    with console.status(f"installing {resolved.count} conda packages for {contract.PREFIX}") as status:
        meter = Meter("installing conda packages", resolved.count, on_change=status.update)
        envmod.install(resolved, env_dir, on_progress=lambda done, total: meter.items(done, total), meter=meter)
        finish(
            status,
            f"installed {resolved.count} conda packages ({size(meter.bytes)} downloaded) "
            f"in {time.perf_counter() - t0:.1f} s",
        )
    log: list[str] = []
    if bundle.pip:
        python = bundle.python or resolved.python_version()
        if not python:
            raise KbundleError("the bundle has pip: pins but no Python version to fetch wheels for")
        # pip's part (image/wheels.py): pip's resolver chooses for the image (exact pins alone), kbundle
        # downloads the files together into the shared cache; VCS/sdist lines are built in a container.
        indexes = PipIndexes.from_dict(bundle.manifest.pip_indexes)
        builder = sourcebuild.ContainerBuilder(client, image, env_dir)
        recorded = wheels.recorded_resolution(bundle_hash(bundle))
        t0 = time.perf_counter()
        with console.status(f"fetching {len(bundle.pip)} pip requirement(s) as wheels for CPython {python}") as status:
            meter = Meter("downloading wheels", on_change=status.update)
            glibc = wheels.glibc_of(target_of(bundle))
            locked = bool(bundle.manifest.pip_locked)
            fetched = wheels.fetch(
                bundle.pip, python, indexes, glibc, builder, recorded, meter, locked=locked, conda_env=env_dir
            )
            finish(
                status,
                f"fetched {len(fetched.files)} wheel(s) ({size(meter.bytes)} downloaded) in {time.perf_counter() - t0:.1f} s",
            )
        lines = fetched.resolution or tuple(p.text for p in fetched.pins)
        t0 = time.perf_counter()
        with console.status(f"installing {len(lines)} wheel(s) into the environment, without network") as status:
            installed = pipinstall.install(client, image, env_dir, fetched.files, lines)
            finish(status, f"installed {len(lines)} wheel(s) with pip in {time.perf_counter() - t0:.1f} s")
        wheels.remember_resolution(bundle_hash(bundle), fetched.resolution)
        console.print(f"pip: {len(lines)} wheel(s): " + ", ".join(r.split(" ")[0] for r in lines))
        for message in installed.warnings:
            console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)
        log += [f"# warning: {message}" for message in installed.warnings]
        log += ["# pip: installed into the environment before the build, from exactly these wheels:", *lines]
        log += [f"#   {line}" for line in installed.log.splitlines() if line.strip()]
    with console.status("byte-compiling the environment") as status:
        compiled = bytecode.compile_env(
            env_dir, cache_root() / "pyc", resolved.interpreter_id(), client=client, image=image
        )
        if not compiled.skipped:
            finish(
                status,
                f"byte-compiled the environment ({compiled.compiled} compiled, {compiled.linked} from the cache) "
                f"in {compiled.seconds:.1f} s",
            )
    if compiled.skipped:
        console.print(
            f"[yellow]warning:[/] not byte-compiled ({escape(compiled.skipped)}): kernels will start slower",
            soft_wrap=True,
        )
    layers = context.stage_layers(ctx)
    console.print("layers: " + ", ".join(layer.describe() for layer in layers))
    log += ["# the environment's layers: " + ", ".join(layer.describe() for layer in layers)]
    bundle.extract(ctx, bundle.members_under(WORK_DIR))
    return log


def _quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def _claim(bundle, options: RunOptions, kernel_name: str):
    """(the kernel registered under `kernel_name` now, or None; a warning when --replace takes
    over another bundle's). Another bundle's kernel of that name is refused (kernel/spec.py)."""
    from kbundle.kernel.spec import claim_name, list_kernelspecs

    if options.name is not None and not any(c.isalnum() for c in options.name):
        raise UsageError(f"--name {options.name!r}: give a name with letters or digits")
    kernels = list_kernelspecs()
    previous = next((k for k in kernels if k.name == kernel_name), None)
    message = claim_name(kernel_name, bundle_hash(bundle), previous, options.replace, {k.name for k in kernels})
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


def _register(
    bundle,
    options: RunOptions,
    kernel_name: str,
    image: Image,
    placement,
    gpus: list[str],
    warnings: list[str],
    console,
) -> Path:
    """Install the kernelspec, under a lock on its name: the collision check and the write are one step."""
    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    with _lock(f"kernel-{kernel_name}", console, f"another kbundle run is registering {kernel_name}; waiting"):
        previous, replaced = _claim(bundle, options, kernel_name)
        metadata = {"bundle": str(Path(options.bundle).resolve()), "notebook": str(placement.notebook)}
        metadata["cuda"] = bundle.cuda
        metadata["pip_resolved"] = _pip_resolved(bundle)  # the exact pip resolution the image was built with
        if image.ref:  # pinned, so that a kernel elsewhere (a Slurm node) can pull the very same image
            metadata["image_ref"] = image.ref
        old = previous.workdir if previous else None
        same = bool(previous) and previous.bundle_hash == bundle_hash(bundle)
        workdir, kept = kernel_workdir(
            str(placement.workdir), old, same, bool(old) and Path(old).is_dir(), options.replace
        )
        if kept:  # the kernel's notebook is the one in its workdir
            metadata["notebook"] = str(previous.metadata.get("notebook") or metadata["notebook"])
        for message in filter(None, (replaced, kept)):
            warnings.append(message)
            console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)
        display = safe(options.name or bundle.name)
        request = KernelRequest(
            kernel_name, display, image.tag, workdir, gpus, bundle_hash(bundle), metadata, network=options.network
        )
        return install_kernelspec(request)


@contextmanager
def _lock(name: str, console, waiting: str):
    """An exclusive `flock` on `<cache>/locks/<name>.lock`, held for the block.

    The kernel drops it when the process ends, however it ends: a killed run never leaves
    the others waiting. The lock files themselves stay (a few bytes each)."""
    import fcntl
    import re

    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:200] + ".lock")
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(escape(waiting), soft_wrap=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _pip_resolved(bundle) -> list[str]:
    """The exact pip resolution of this bundle's last build here (image/wheels.py records it)."""
    from kbundle.image import wheels

    return (wheels.recorded_resolution(bundle_hash(bundle)) or []) if bundle.pip else []


def summary_lines(result: RunResult) -> list[str]:
    if result.native is not None:
        from kbundle.flows.native import summary_lines as native_summary

        return native_summary(result)
    if result.slurm is not None:
        return _slurm_summary(result)
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


def _slurm_summary(result: RunResult) -> list[str]:
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
