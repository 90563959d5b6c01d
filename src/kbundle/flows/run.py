"""`kbundle run`: the recipient's flow, one step per module.

1. open the bundle once, verifying every member (bundle/reader.py)
2. place its notebook and files in the working directory (image/workdir.py)
3. preflight: the engine, GPUs, driver (image/preflight.py)
4. identify the image: resolve the environment, hash it into a tag (image/env.py, image/build.py)
5. consent, then assemble the context and build, only when that tag is missing
   (image/context.py, image/env.py, image/bytecode.py, image/wheels.py, image/build.py)
6. register the kernel (kernel/spec.py)

Nothing is registered unless the image exists under its content tag, so a failed or
interrupted build leaves no kernel behind.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.markup import escape

from kbundle.bundle.format import WORK_DIR
from kbundle.cache import cache_root
from kbundle.errors import KbundleError


@dataclass(frozen=True)
class RunOptions:
    bundle: Path
    gpus: str = "auto"
    base_image: Optional[str] = None
    workdir: Optional[Path] = None
    yes: bool = False


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
        }


def _ask(console, question: str) -> bool:
    console.print(question, end="")
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def consent(
    console,
    *,
    yes: bool,
    base_image: str,
    packages: int,
    pip: int,
    dockerfile: Path,
    ask: Callable[[Any, str], bool] = _ask,
    interactive: Optional[bool] = None,
) -> None:
    """A bundle is someone else's code: show what will be built and ask, unless --yes."""
    if yes:
        return
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if not interactive:
        raise KbundleError(
            f"this bundle builds and runs someone else's code; review {dockerfile} "
            f"and pass --yes to build it (stdin is not a terminal, so kbundle cannot ask)"
        )
    console.print(
        f"[bold]About to build an image[/] from base [cyan]{escape(base_image)}[/] with {packages} conda "
        f"package(s) and {pip} pip wheel(s).\nReview the Dockerfile: {escape(str(dockerfile))}",
        soft_wrap=True,
    )
    if not ask(console, "Build it and register the kernel? [y/N] "):
        raise KbundleError("not built: you declined (pass --yes to skip the question)")


def run_bundle(options: RunOptions, console) -> RunResult:
    from kbundle.bundle import open_bundle
    from kbundle.image import build as imagemod
    from kbundle.image import preflight
    from kbundle.image import workdir as wd
    from kbundle.kernel.spec import kernel_name_for

    t0 = time.perf_counter()
    request = preflight.GpuRequest.parse(options.gpus)  # bad --gpus fails before any work
    bundle = open_bundle(options.bundle)
    kernel_name = kernel_name_for(bundle.name)
    display_name = f"{bundle.name} (kbundle)"

    placement = wd.place(bundle, options.workdir or wd.default_workdir(bundle.name), kernel_name, display_name)
    warnings = [
        f"kept your {k.path} (it differs from the bundle's); the bundle's copy is at {k.fresh}" for k in placement.kept
    ]

    client = preflight.connect()
    base = options.base_image or bundle.base_image
    report = preflight.run_preflight(client, bundle.cuda, request, probe_image=base)
    report.raise_for_errors()
    warnings += [f.message for f in report.warnings]
    for message in warnings:
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    resolved, key = _identify(bundle, options, base, imagemod.base_image_id(client, base, console))
    image_id = imagemod.existing_image(client, key.tag)
    build_log = None
    if image_id is None:
        review = wd.review_dockerfile(placement.workdir, key.dockerfile)
        consent(
            console, yes=options.yes, base_image=base, packages=resolved.count, pip=len(bundle.pip), dockerfile=review
        )
        result = _build(client, bundle, resolved, key, placement.workdir, console)
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
    )


def bundle_hash(bundle) -> str:
    """The bundle's content hash; bundles sealed without one get it computed from the verified members."""
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


def _identify(bundle, options: RunOptions, base: str, base_id: str):
    """The resolved environment and the image key (its tag) — cheap: nothing is installed."""
    from kbundle.image import build as imagemod
    from kbundle.image import env as envmod

    dockerfile = (
        imagemod.with_base_image(bundle.dockerfile_text, base) if options.base_image else bundle.dockerfile_text
    )
    # channel_urls: the channels as the sender's conda resolved their names, for unlocked bundles
    channels = tuple(bundle.manifest.channel_urls or bundle.channels)
    resolved = envmod.resolve(envmod.EnvSpec(channels, tuple(bundle.dependencies), bundle.lock_text, target_of(bundle)))
    key = imagemod.ImageKey(bundle.name, resolved.content_hash, tuple(bundle.pip), dockerfile, base, base_id)
    return resolved, key


def _build(client, bundle, resolved, key, workdir: Path, console):
    """Assemble a temporary build context and build it."""
    from kbundle.image import build as imagemod
    from kbundle.image import context

    with context.temporary_context(key.digest[:12]) as ctx:
        assemble_context(ctx, bundle, resolved, key.dockerfile, console)
        return imagemod.build(client, ctx, key, bundle_hash(bundle), workdir / ".kbundle" / "build.log", console)


def assemble_context(ctx: Path, bundle, resolved, dockerfile: str, console=None) -> None:
    """Fill `ctx` as the image contract says (image/context.py): everything is fetched on the host."""
    from kbundle import contract
    from kbundle.image import bytecode, context, wheels
    from kbundle.image import env as envmod

    console = console or _quiet_console()
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
        compiled = bytecode.compile_env(context.env_dir(ctx), cache_root() / "pyc", resolved.interpreter_id())
    if compiled.skipped:
        console.print(
            f"[yellow]warning:[/] not byte-compiled ({escape(compiled.skipped)}): kernels will start slower",
            soft_wrap=True,
        )
    if bundle.pip:
        python = bundle.python or resolved.python_version()
        if not python:
            raise KbundleError("the bundle has pip: pins but no Python version to fetch wheels for")
        with console.status(f"fetching {len(bundle.pip)} pip wheel(s) for CPython {python}"):
            wheels.write_context(wheels.fetch(bundle.pip, python), ctx)
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
    return install_kernelspec(
        KernelRequest(kernel_name, bundle.name, image, str(placement.workdir), gpus, digest, metadata)
    )


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
    return lines
