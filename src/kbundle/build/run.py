"""`kbundle run`: verify and extract → preflight → consent → environment → build → kernel.

Each step lives in its own module; this one only orders them and collects the result.
Nothing is registered unless the image exists under its content tag, so a failed or
interrupted build leaves no kernel behind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from rich.markup import escape

from kbundle.cache import cache_root, contexts_dir
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


def kernel_name_for(bundle_name: str) -> str:
    from kbundle.build.image import slug

    return f"kbundle-{slug(bundle_name)}"


def _ask(console, question: str) -> bool:
    console.print(question, end="")
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def consent(console, *, yes: bool, base_image: str, packages: int, pip: int, dockerfile: Path,
            ask: Callable[[Any, str], bool] = _ask, interactive: Optional[bool] = None) -> None:
    """A bundle is someone else's code: show what will be built and ask, unless --yes."""
    if yes:
        return
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if not interactive:
        raise KbundleError(f"this bundle builds and runs someone else's code; review {dockerfile} "
                           f"and pass --yes to build it (stdin is not a terminal, so kbundle cannot ask)")
    console.print(f"[bold]About to build an image[/] from base [cyan]{escape(base_image)}[/] with {packages} conda "
                  f"package(s) and {pip} pip wheel(s).\nReview the Dockerfile: {escape(str(dockerfile))}", soft_wrap=True)
    if not ask(console, "Build it and register the kernel? [y/N] "):
        raise KbundleError("not built: you declined (pass --yes to skip the question)")


def run_bundle(options: RunOptions, console) -> RunResult:
    from kbundle.build import image as imagemod
    from kbundle.build import preflight, workdir as wd
    from kbundle.bundle import open_bundle
    from kbundle.kernel.spec import install_kernelspec

    t0 = time.perf_counter()
    request = preflight.GpuRequest.parse(options.gpus)  # bad --gpus fails before any work
    bundle = open_bundle(options.bundle)
    kernel_name = kernel_name_for(bundle.name)
    bundle_hash = bundle.manifest.content_hash or _file_hash(bundle.path)
    display_name = f"{bundle.name} (kbundle)"

    # 1. verify and extract the notebook and included files into the working directory
    workdir = options.workdir or wd.default_workdir(bundle.name)
    work_members = sorted(m for m in bundle.members if m.startswith(wd.WORK_PREFIX))
    placement = wd.place(bundle.path, work_members, bundle.notebook, workdir, kernel_name, display_name)
    warnings = [f"kept your {k.path} (it differs from the bundle's); the bundle's copy is at {k.fresh}"
                for k in placement.kept]

    # 2. preflight: Docker, GPUs, driver
    client = preflight.connect()
    base = options.base_image or bundle.base_image
    report = preflight.run_preflight(client, bundle.cuda, request, probe_image=base)
    report.raise_for_errors()
    warnings += [f.message for f in report.warnings]
    for message in warnings:
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    # 3. the environment and the image's identity (no install yet: the tag may exist)
    base_id = imagemod.base_image_id(client, base, console)
    resolved, key = _identify(bundle, options, base, base_id)
    image_id = imagemod.existing_image(client, key.tag)
    build_log = None
    if image_id is None:
        review = wd.review_dockerfile(placement.workdir, key.dockerfile)
        consent(console, yes=options.yes, base_image=base, packages=resolved.count, pip=len(bundle.pip),
                dockerfile=review)
        result = _build(client, bundle, bundle_hash, resolved, key, work_members, placement.workdir, console)
        image_id, build_log = result.image_id, result.log

    # 4. the kernel (a kernel of the same name from another bundle is replaced, and we say so)
    previous = _previous_kernel(kernel_name)
    if previous and previous.bundle_hash != bundle_hash:
        message = f"replaced kernel {kernel_name}, which ran another bundle ({previous.image})"
        warnings.append(message)
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
    spec_dir = install_kernelspec(kernel_name, bundle.name, key.tag, str(placement.workdir),
                                  list(report.plan.gpus), bundle_hash,
                                  extra_metadata={"bundle": str(Path(options.bundle).resolve()),
                                                  "notebook": str(placement.notebook), "cuda": bundle.cuda})
    return RunResult(
        name=bundle.name, kernel_name=kernel_name, display_name=display_name, image=key.tag, image_id=image_id,
        workdir=placement.workdir, notebook=placement.notebook, built=build_log is not None,
        gpus=list(report.plan.gpus), seconds=time.perf_counter() - t0, packages=resolved.count,
        pip=len(bundle.pip), base_image=base, warnings=warnings,
        kept=[{"path": str(k.path), "fresh": str(k.fresh)} for k in placement.kept],
        kernelspec=spec_dir, build_log=build_log,
    )


def _identify(bundle, options: RunOptions, base: str, base_id: str):
    """The resolved environment and the image key (its tag) — cheap: nothing is installed."""
    from kbundle.build import env as envmod
    from kbundle.build import image as imagemod

    dockerfile = imagemod.with_base_image(bundle.dockerfile_text, base) if options.base_image else bundle.dockerfile_text
    # channel_urls: the channels as the sender's conda resolved their names, for unlocked bundles
    channels = tuple(bundle.manifest.channel_urls or bundle.channels)
    resolved = envmod.resolve(envmod.EnvSpec(channels, tuple(bundle.dependencies), bundle.lock_text, bundle.cuda))
    key = imagemod.ImageKey(bundle.name, resolved.content_hash, tuple(bundle.pip), dockerfile, base, base_id)
    return resolved, key


def _build(client, bundle, bundle_hash: str, resolved, key, work_members: list[str], workdir: Path, console):
    """Assemble the build context (env/, pip/, work/, Dockerfile) and build it; the context is temporary."""
    from kbundle.build import bytecode
    from kbundle.build import env as envmod
    from kbundle.build import image as imagemod
    from kbundle.build import wheels
    from kbundle.bundle import extract_bundle

    contexts = contexts_dir()
    contexts.mkdir(parents=True, exist_ok=True)
    context = Path(tempfile.mkdtemp(prefix=key.digest[:12] + "-", dir=contexts))
    try:
        with console.status(f"installing {resolved.count} conda packages for {envmod.FINAL_PREFIX}") as status:
            envmod.install(resolved, context / "env",
                           on_progress=lambda done, total: status.update(
                               f"installing conda packages for {envmod.FINAL_PREFIX}: {done}/{total}"))
        with console.status("byte-compiling the environment"):
            compiled = bytecode.compile_env(context / "env", cache_root() / "pyc", resolved.interpreter_id())
        if compiled.skipped:
            console.print(f"[yellow]warning:[/] not byte-compiled ({escape(compiled.skipped)}): "
                          f"kernels will start slower", soft_wrap=True)
        if bundle.pip:
            python = bundle.python or resolved.python_version()
            if not python:
                raise KbundleError("the bundle has pip: pins but no Python version to fetch wheels for")
            with console.status(f"fetching {len(bundle.pip)} pip wheel(s) for CPython {python}"):
                wheels.write_context(wheels.fetch(bundle.pip, python), context)
        extract_bundle(bundle.path, context, members=work_members)
        (context / "Dockerfile").write_text(key.dockerfile, encoding="utf-8")
        return imagemod.build(client, context, key, bundle_hash,
                              workdir / ".kbundle" / "build.log", console)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def _previous_kernel(name: str):
    from kbundle.kernel.spec import list_kernelspecs

    return next((k for k in list_kernelspecs() if k.name == name), None)


def _file_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def summary_lines(result: RunResult) -> list[str]:
    where = "GPUs " + ", ".join(result.gpus) if result.gpus else "CPU"
    state = f"built, {result.seconds:.1f}s" if result.built else f"already built: reused, {result.seconds:.1f}s"
    lines = [
        f"image      {result.image} ({state})",
        f"runs on    {where}",
        f"kernel     {result.kernel_name}  \"{result.display_name}\"",
        f"workdir    {result.workdir}",
        f"open it    jupyter lab {result.notebook}   (or pick \"{result.display_name}\" in VS Code)",
    ]
    return lines
