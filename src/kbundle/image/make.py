"""The image stage as one step: the bundle's image on this engine, for `run` and `push` alike.

`image_for` yields it, held under its lock for the block (run registers the kernel there, push
pushes):

- `--image NAME@sha256:…` (`ImageRequest.pinned`): pulled from its registry unless this engine has
  that digest, refused unless its labels name this bundle's content hash, tagged here as the bundle's;
- else reused under its content tag (image/build.py `ImageKey`) when the engine has it;
- else, after the flow's consent, built as a chain of step images (image/chain.py): the first step
  (base image, user, activation script), one image per layer group of the environment, each tagged
  by a hash of its packages and of everything under it, then the bundle's own small image on the
  last one, under its content tag. The steps' tags are worked out before anything is installed
  when the pip resolution is known (locked, or recorded by this bundle's last build): when the
  engine has every step, nothing is installed and only the final image is built; when it has the
  bottom ones, only the other groups' wheels are installed (image/partial.py). Otherwise the
  environment is resolved (image/env.py), installed into a build context with the pip: section's
  wheels (image/wheels.py, image/pipinstall.py; a locked section's downloads start while conda
  installs), byte-compiled (image/bytecode.py), split into
  layers (image/layers.py), and each step the engine lacks is built from its own small context
  (its Dockerfile and its group's folder) under a lock of its own (two bundles may share it).
  `--use-bundled-dockerfile` builds the shipped Dockerfile in one build of one context, as before.

The notebook and the included files (work/) are the final image's last COPY, and its tag covers
their content (`work_digest`): a notebook edited and mailed back builds only that small final image,
on the same steps, and sends only work/. The kernel mounts the kernelspec's workdir and the
notebook's folder where it can (kernel/launch_mounts.py), but a folder it leaves out (a home folder)
and a Slurm node that cannot see it (docs/cluster.md) start in the image's copy: it must be there,
and be the bundle's own.

What the flow shows before consent, the look (`look`), is found offline: the lock is read, not
fetched. Consent itself is the flow's (flows/review.py): this stage only calls `ask` before the
first byte is fetched, and never registers a kernel.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from rich.markup import escape

from kbundle.bundle.format import WORK_DIR
from kbundle.cache import cache_root
from kbundle.display import safe, size
from kbundle.errors import KbundleError, UsageError
from kbundle.image import engine, ledger
from kbundle.image.locks import deferred_signals, held
from kbundle.progress import Meter, finish


@dataclass(frozen=True)
class ImageRequest:
    """What the flow asks of the image stage for one bundle."""

    content_hash: str  # the bundle's; the image's label, and the key of its recorded pip resolution
    base: str  # the base image: the bundle's, or --base-image
    base_override: Optional[str] = None  # --base-image, applied to the rendered and the shipped Dockerfile
    use_bundled_dockerfile: bool = False
    pinned: Optional[str] = None  # --image NAME@sha256:…: pull this image instead of building
    rebuild: bool = False  # --rebuild: build again, reusing no cached step, even when the image exists


@dataclass(frozen=True)
class Look:
    """The image's part of what the review shows, found offline."""

    dockerfile: str  # what is built: kbundle's rendering, or the shipped one (--use-bundled-dockerfile)
    rendered: str  # kbundle's rendering of the manifest
    shipped: str  # the bundle's Dockerfile (with --base-image applied)
    records: Optional[tuple]  # the lock's records; None when unlocked (solved after consent)
    base_local: bool
    base_size: Optional[int]  # the base image's size, when it is on this engine


@dataclass(frozen=True)
class BuiltImage:
    """The bundle's image on this engine, as `image_for` got it."""

    tag: str
    image_id: str
    packages: int
    built: bool = False
    pulled: bool = False
    ref: Optional[str] = None  # the pinned reference it was pulled by (run --image)
    build_log: Optional[Path] = None
    steps: tuple = ()  # image/chain.py StepOutcome: the environment's steps, built or found, bottom first
    installed: bool = False  # whether this run installed the environment on the host


# ----------------------------------------------------------------- the step


@contextmanager
def image_for(
    client,
    bundle,
    request: ImageRequest,
    look: Optional[Look],
    ask: Callable[[Any], None],
    workdir: Path,
    console,
    undo,
    solved: Optional[Callable[[tuple], None]] = None,
) -> Iterator[BuiltImage]:
    """The bundle's image, held under its lock for the block. `ask(None)` before a build, or
    `ask(ref)` before a pull, is the flow's consent; `look` is None for a pinned image.
    `solved(records)` sees an unlocked bundle's solution before anything is fetched (the flow's
    disk check)."""
    if request.pinned:
        with _pulled(client, bundle, request, ask, console, undo) as image:
            yield image
        return
    from kbundle.image import build as imagemod

    image_id = None
    if look.records is not None and look.base_local and not request.rebuild:  # known offline: maybe built
        resolved, key = identify(bundle, look, request.base, imagemod.base_image_id(client, request.base, console))
        image_id = engine.image_id(client, key.tag)
    build_log, result = None, None
    if image_id is None:
        ask(None)
        resolved, key = identify(bundle, look, request.base, imagemod.base_image_id(client, request.base, console))
        if look.records is None and solved is not None:
            solved(tuple(resolved.records))
    # Concurrent runs of one image: the first builds, the others wait here, then reuse it.
    with held(f"image-{key.tag}", console, f"another kbundle run is building {key.tag}; waiting for it"):
        image_id = engine.image_id(client, key.tag)
        replaced, image_id = (image_id, None) if request.rebuild else (None, image_id)
        if image_id is None:
            result = build(client, bundle, request, resolved, key, workdir, console, undo)
            image_id, build_log = result.image_id, result.log
            ledger.record_quietly(image_id, ledger.BUILT, bundle.name, key.tag)  # gc may remove what we made
            if replaced and replaced != image_id:
                _drop(client, replaced)
        yield BuiltImage(
            key.tag,
            image_id,
            resolved.count,
            built=build_log is not None,
            build_log=build_log,
            steps=result.steps if result else (),
            installed=result.installed if result else False,
        )


@contextmanager
def _pulled(client, bundle, request: ImageRequest, ask, console, undo) -> Iterator[BuiltImage]:
    """`--image`: pull the pinned image (after consent, unless this engine has it), refuse it
    unless its labels name this bundle's content hash, and tag it here as this bundle's."""
    from kbundle.image import registry

    ref = registry.parse_pinned(request.pinned)
    tag = registry.pulled_tag(bundle.name, ref.digest)
    if registry.local_by_digest(client, ref) is None:  # nothing is fetched before the answer
        ask(ref)
    with held(f"image-{tag}", console, f"another kbundle run is fetching {tag}; waiting for it"):
        got = registry.pull(client, ref, console)
        if got.pulled:
            undo.image(got.image_id)  # refused below: an image only this run fetched goes again
        registry.verify_and_tag(client, got.image_id, ref, request.content_hash, tag)
        if got.pulled:
            ledger.record_quietly(got.image_id, ledger.PULLED, bundle.name, tag)
        yield BuiltImage(tag, got.image_id, locked_count(bundle), pulled=got.pulled, ref=str(ref))


def _drop(client, image_id: str) -> None:
    """The image `--rebuild` replaced, unless a container still uses it (gc removes it later)."""
    import docker

    try:
        client.api.remove_image(image_id)
    except docker.errors.APIError:
        # In use by a container (409), or gone already (404): the new image is built and tagged,
        # and the old one is gc's to remove (the ledger records it). Nothing else is caught.
        pass


# ----------------------------------------------------------------- offline


def look(client, bundle, request: ImageRequest) -> Look:
    """The Dockerfiles, the lock's records and the base image's presence: nothing is fetched."""
    from kbundle.image import build as imagemod
    from kbundle.image import preflight

    rendered = rendered_dockerfile(bundle, request.base_override)
    shipped = bundle.dockerfile_text
    if request.base_override:
        shipped = imagemod.with_base_image(shipped, request.base_override)
    dockerfile = shipped if request.use_bundled_dockerfile else rendered
    records = locked_records(bundle)
    base_local = preflight.local_image(client, request.base)
    base_size = preflight.image_size(client, request.base) if base_local else None
    return Look(dockerfile, rendered, shipped, records, base_local, base_size)


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


def declared_channels(bundle) -> tuple[str, ...]:
    """The channels the manifest declares: as the sender's conda resolved them, and as named."""
    return tuple(dict.fromkeys([*bundle.manifest.channel_urls, *bundle.channels]))


def locked_records(bundle) -> Optional[tuple]:
    """The records of the bundle's lock, read offline; None for an unlocked bundle (solved to build)."""
    from kbundle.image import env as envmod

    if not bundle.lock_text:
        return None
    spec = envmod.EnvSpec(declared_channels(bundle), tuple(bundle.dependencies), bundle.lock_text)
    return tuple(envmod.resolve(spec).records)


def locked_count(bundle) -> int:
    """The packages of the bundle's lock (read offline); 0 for an unlocked bundle, which is solved only to build."""
    records = locked_records(bundle)
    return 0 if records is None else len(records)


def target_of(bundle) -> tuple[str, ...]:
    """The image's virtual packages for an unlocked solve: as recorded, else from the base image's OS."""
    from kbundle import contract
    from kbundle.facts import glibc_for

    recorded = bundle.manifest.virtual_packages
    if recorded:
        return tuple(recorded)
    return tuple(contract.target_virtual_packages(glibc_for(bundle.base_image), bundle.cuda))


def recorded_pins(bundle, content_hash: str) -> list[str]:
    """The exact pip resolution of this bundle's last build here (image/wheels.py records it)."""
    from kbundle.image import wheels

    return (wheels.recorded_resolution(content_hash) or []) if bundle.pip else []


def identify(bundle, look: Look, base: str, base_id: str):
    """The resolved environment and the image key (its tag). An unlocked bundle is solved here."""
    from kbundle.image import build as imagemod
    from kbundle.image import env as envmod

    if look.records is not None:
        resolved = envmod.ResolvedEnv(tuple(look.records), locked=True)
    else:
        spec = envmod.EnvSpec(declared_channels(bundle), tuple(bundle.dependencies), None, target_of(bundle))
        resolved = envmod.resolve(spec)
    key = imagemod.ImageKey(
        bundle.name, resolved.content_hash, tuple(bundle.pip), look.dockerfile, base, base_id, work_digest(bundle)
    )
    return resolved, key


def work_digest(bundle) -> str:
    """A hash of the files the image holds in work/ (the notebook and the included files): each
    member's path and the sha256 the bundle's manifest checks it against."""
    import hashlib

    entries = [f"{m} {bundle.members[m].sha256}" for m in bundle.members_under(WORK_DIR)]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


# ----------------------------------------------------------------- the build


def build(client, bundle, request: ImageRequest, resolved, key, workdir: Path, console, undo=None):
    """Build the image: as a chain of step images (image/chain.py) from kbundle's rendering, or in
    one build of the shipped Dockerfile (--use-bundled-dockerfile, or a Dockerfile not in kbundle's
    layout).

    The log is written in kbundle's cache (a failed run removes the workdir it made) and
    copied to `<workdir>/.kbundle/build.log` once the image is built."""
    from kbundle.image import chain

    log = cache_root() / "logs" / f"{key.tag.split('/')[-1].replace(':', '-')}.build.log"
    parts = None if request.use_bundled_dockerfile else chain.split(key.dockerfile)
    if parts is None:
        result = _build_whole(client, bundle, request, resolved, key, log, console, undo)
    else:
        result = _build_chain(client, bundle, request, resolved, key, parts, log, console, undo)
    return dataclasses.replace(result, log=_keep_log(log, workdir))


def _build_whole(client, bundle, request: ImageRequest, resolved, key, log: Path, console, undo):
    """The Dockerfile in one build of one context holding the whole environment and work/."""
    from kbundle import contract
    from kbundle.image import build as imagemod
    from kbundle.image import integrity

    with _context(key.digest[:12]) as ctx:
        done = _assemble(ctx, bundle, request.content_hash, resolved, key.dockerfile, console, request.base, client)
        files = integrity.of_layers(ctx / contract.CONTEXT_LAYERS)  # what a later check compares (run --rebuild)
        return imagemod.build(
            client,
            ctx,
            key,
            request.content_hash,
            log,
            console,
            undo=undo,
            preamble=done.log,
            env_files=files,
            fresh=request.rebuild,
        )


def _build_chain(client, bundle, request: ImageRequest, resolved, key, parts, log: Path, console, undo):
    """The environment's steps the engine lacks, then the bundle's own small image on them.

    When the steps' tags are known before installing (a locked or recorded pip resolution) and the
    engine has every one, nothing is installed: only the final image is built."""
    from kbundle import contract
    from kbundle.image import chain, integrity, wheels

    known = None if request.rebuild else _known_pip(bundle, request.content_hash)
    steps = _plan(resolved, chain.pip_wheels(known), key.base_id, parts) if known is not None else None
    with _context(key.digest[:12]) as ctx:
        if steps is not None and all(engine.image_id(client, s.tag) for s in steps):
            if bundle.pip:
                wheels.remember_resolution(request.content_hash, known)  # the kernelspec's record of it
            console.print("environment: every step is on this engine already; nothing to install", soft_wrap=True)
            _start_log(log, ["# the environment's steps are all on this engine already: nothing was installed"])
            outcomes = _reuse_steps(steps, log)
            env_files = _label_of(client, steps[-1].tag, contract.LABEL_ENV_FILES)
            return _final(
                client, bundle, request, key, parts, outcomes, ctx, env_files, log, console, undo, installed=False
            )
        partial = _partial(client, bundle, resolved, known, steps, key.base_id, console)
        done = _assemble(
            ctx,
            bundle,
            request.content_hash,
            resolved,
            key.dockerfile,
            console,
            request.base,
            client,
            work=False,
            partial=partial,
        )
        wheels_now = _chain_pip(done.pip_lines)
        steps = _plan(resolved, wheels_now, key.base_id, parts)
        if partial is None:
            env_files = integrity.of_layers(ctx / contract.CONTEXT_LAYERS)
        else:
            env_files = _partial_env_files(client, ctx, steps, partial)
        _start_log(log, done.log)
        present = partial.present if partial else ()
        outcomes = _build_steps(client, ctx, steps, env_files, log, console, undo, request.rebuild, present)
        return _final(client, bundle, request, key, parts, outcomes, ctx, env_files, log, console, undo, installed=True)


def _partial(client, bundle, resolved, known, steps, base_id: str, console):
    """image/partial.py's plan, when the engine has the chain's bottom steps and the cache holds
    the wheels of their groups (only their metadata is read); else None: install everything."""
    from kbundle.facts import layer_groups
    from kbundle.image import chain, wheels
    from kbundle.image import partial as partialmod

    if steps is None or not known or any("  # built from " in line for line in known):
        return None
    groups = layer_groups()
    inputs = _inputs(resolved, chain.pip_wheels(known), base_id)
    found = partialmod.decide(
        steps,
        lambda tag: engine.image_id(client, tag) is not None,
        known,
        lambda name: groups.group_of("pip", name),
        chain.shadowed(inputs),
    )
    python = bundle.python or resolved.python_version()
    if found is None or not python:
        return None
    cached = wheels.cached_unread(found.skipped, python, wheels.glibc_of(target_of(bundle)))
    metadata = _skipped_metadata(cached) if cached is not None else None
    if metadata is None:
        return None
    names = ", ".join(s.name for s in steps[: len(found.present)])
    console.print(
        f"environment: this engine has the steps {names}: installing only the pip wheels of the others "
        f"({len(found.install)} of {len(found.lines)})",
        soft_wrap=True,
    )
    return dataclasses.replace(found, metadata=metadata)


def _skipped_metadata(wheels_found) -> Optional[tuple]:
    """Each skipped wheel's metadata, read now; None when one is damaged: it is removed from the
    cache, and the whole install fetches it again (the cache heals, as on a hash mismatch)."""
    from kbundle.image import healing
    from kbundle.image import partial as partialmod

    read = []
    for wheel in wheels_found:
        try:
            read.append(partialmod.read_metadata(wheel))
        except KbundleError:
            healing.note(f"wheel {wheel.name} in kbundle's cache was damaged: removed, fetched again")
            wheel.unlink(missing_ok=True)
            return None
    return tuple(read)


def _partial_env_files(client, ctx: Path, steps, partial) -> str:
    """The final image's file list: the top present step's prefix with the built groups' folders over it."""
    from kbundle import contract
    from kbundle.image import integrity
    from kbundle.image import partial as partialmod

    lower = integrity.listing(client, partial.present[-1])
    if lower is None:
        raise KbundleError(f"cannot list the environment in {partial.present[-1]} to record the image's files")
    built = [PurePosixPath(s.folder).name for s in steps if s.tag not in partial.present and s.folder]
    upper = integrity.layer_lines(ctx / contract.CONTEXT_LAYERS, only=built)
    return integrity.digest(partialmod.overlaid(lower, upper))


def _known_pip(bundle, content_hash: str) -> Optional[list[str]]:
    """The exact pip resolution, when known before installing: this bundle's recorded one, or a
    locked section whose every line names one wheel (written as pip's install records it); else None."""
    from kbundle.image import chain, wheels

    if not bundle.pip:
        return []
    recorded = wheels.recorded_resolution(content_hash)
    if recorded and chain.pip_wheels(recorded) is not None:
        return list(recorded)
    found = chain.wheels_in_order(bundle.pip) if bundle.manifest.pip_locked else None
    return None if found is None else [w.line() for w in found]


def _chain_pip(lines):
    from kbundle.image import chain

    found = chain.pip_wheels(lines)
    if found is None:  # pip's resolution names each wheel by its sha256 (image/wheels.py)
        raise KbundleError("the pip resolution names a wheel without its sha256; cannot tag the environment's steps")
    return found


def _inputs(resolved, pip, base_id: str):
    """What the chain's tags depend on (image/chain.py ChainInputs)."""
    import hashlib

    from kbundle import contract
    from kbundle.facts import layer_groups
    from kbundle.image import chain

    return chain.ChainInputs(
        base_id=base_id,
        activate_sha256=hashlib.sha256(contract.activate_script().read_bytes()).hexdigest(),
        conda=chain.conda_packages(resolved.records),
        pip=tuple(pip),
        interpreter=resolved.interpreter_id(),
        groups=layer_groups(),
    )


def _plan(resolved, pip, base_id: str, parts):
    """The chain's steps (image/chain.py) for this environment."""
    from kbundle.image import chain

    inputs = _inputs(resolved, pip, base_id)
    if not chain.fits(inputs, parts):
        raise KbundleError("kbundle's Dockerfile does not COPY the environment's layer groups in order")
    return chain.plan(inputs, parts)


def _start_log(log: Path, lines) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _log_step(log: Path, step, what: str) -> None:
    """A step's header in the build log, with its Dockerfile, so a person can read what was built."""
    text = "".join(f"#   {line}\n" for line in step.dockerfile.splitlines())
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"# ---- step {step.name}: {step.tag} ({what})\n# Dockerfile:\n{text}")


def _reuse_steps(steps, log: Path):
    from kbundle.image import chain

    for step in steps:
        _log_step(log, step, "on this engine already")
    return tuple(chain.StepOutcome(s.name, s.tag, False) for s in steps)


def _build_steps(client, ctx: Path, steps, env_files: str, log: Path, console, undo, fresh: bool, present=()):
    """Each step the engine lacks, bottom first, under a lock of its own (two bundles may share it).
    `present`: the tags that must be on the engine (their groups were not installed: image/partial.py)."""
    return tuple(
        _build_step(client, ctx, step, env_files if step is steps[-1] else "", log, console, undo, fresh, present)
        for step in steps
    )


def _build_step(client, ctx: Path, step, env_files: str, log: Path, console, undo, fresh: bool, present=()):
    from kbundle import __version__, contract
    from kbundle.image import build as imagemod
    from kbundle.image import chain

    with held(f"step-{step.tag}", console, f"another kbundle run is building {step.tag}; waiting for it"):
        old = engine.image_id(client, step.tag)
        if old is None and step.tag in present:
            raise KbundleError(f"the step image {step.tag} left this engine during the build (a gc?): run again")
        if old is not None and not fresh:
            _log_step(log, step, "on this engine already")
            console.print(f"step {step.name}: {step.tag} is on this engine already", soft_wrap=True)
            return chain.StepOutcome(step.name, step.tag, False)
        _log_step(log, step, "built")
        labels = {chain.LABEL_STEP: step.name, contract.LABEL_VERSION: __version__}
        if env_files:
            labels[contract.LABEL_ENV_FILES] = env_files  # the final image reads it when nothing is installed
        t0 = time.perf_counter()
        image_id = imagemod.build_tagged(
            client, _step_context(ctx, step), step.tag, labels, log, console, undo, fresh=fresh, append=True
        )
        ledger.record_quietly(image_id, ledger.BUILT, f"step {step.name}", step.tag)  # gc may remove what we made
        if old is not None and old != image_id:
            _drop(client, old)
        console.print(f"step {step.name}: built {step.tag} in {time.perf_counter() - t0:.1f} s", soft_wrap=True)
        return chain.StepOutcome(step.name, step.tag, True)


def _step_context(ctx: Path, step) -> Path:
    """The step's own small context: its Dockerfile, and its group's folder (moved, not copied)
    or, for the first step, the activation script."""
    import os

    from kbundle import contract

    folder = ctx / "steps" / step.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / contract.CONTEXT_DOCKERFILE).write_text(step.dockerfile, encoding="utf-8")
    if step.folder is None:
        shutil.copyfile(contract.activate_script(), folder / contract.CONTEXT_ACTIVATE)
        os.chmod(folder / contract.CONTEXT_ACTIVATE, 0o755)  # the legacy builder's COPY keeps the mode
    elif (ctx / step.folder).exists():
        (folder / step.folder).parent.mkdir(parents=True, exist_ok=True)
        os.rename(ctx / step.folder, folder / step.folder)
    return folder


def _final(
    client, bundle, request: ImageRequest, key, parts, outcomes, ctx: Path, env_files, log, console, undo, installed
):
    """The bundle's image: FROM the last step, its ENV, user, entrypoint, work/ and labels; under
    its content tag. Its context is the Dockerfile and work/ alone."""
    from kbundle import contract
    from kbundle.image import build as imagemod
    from kbundle.image import chain

    folder = ctx / "final"
    folder.mkdir(parents=True, exist_ok=True)
    bundle.extract(folder, bundle.members_under(WORK_DIR))
    dockerfile = chain.final_dockerfile(outcomes[-1].tag, parts.tail)
    (folder / contract.CONTEXT_DOCKERFILE).write_text(dockerfile, encoding="utf-8")
    _log_step(log, chain.Step("final", None, dockerfile, key.tag), "built")
    extra = {chain.LABEL_STEP: "", chain.LABEL_STEPS: chain.chain_label(outcomes)}
    result = imagemod.build(
        client,
        folder,
        key,
        request.content_hash,
        log,
        console,
        undo=undo,
        env_files=env_files or "",
        fresh=request.rebuild,
        extra_labels=extra,
        append=True,
    )
    return dataclasses.replace(result, steps=outcomes, installed=installed)


def _label_of(client, tag: str, label: str) -> str:
    try:
        return (client.api.inspect_image(tag).get("Config") or {}).get("Labels", {}).get(label) or ""
    except Exception:  # gone meanwhile: the final build then fails on its FROM and says so
        return ""


@contextmanager
def _context(prefix: str) -> Iterator[Path]:
    """A temporary build context (image/context.py), made after those a killed run of this image
    left are swept, and removed with Ctrl-C and SIGTERM deferred until it is gone: an interrupted
    removal leaves half a context and can turn the interruption into an EBADF (image/locks.py
    `deferred_signals`)."""
    from kbundle.image import context

    _sweep_contexts(prefix)
    with context.temporary_context(prefix) as ctx:
        try:
            yield ctx
        finally:
            with deferred_signals():
                shutil.rmtree(ctx, ignore_errors=True)


def _sweep_contexts(prefix: str) -> None:
    """Remove the contexts a killed build of this very image left (`<prefix>-*`, hundreds of MiB
    each). Safe: the caller holds the image's lock, so no live run assembles one of them."""
    from kbundle.cache import contexts_dir

    root = contexts_dir()
    for stale in root.glob(f"{prefix}-*") if root.is_dir() else ():
        with deferred_signals():
            shutil.rmtree(stale, ignore_errors=True)


def _keep_log(log: Path, workdir: Path) -> Path:
    """The build log, copied beside the notebook. A workdir removed meanwhile (by hand: runs that
    share it keep it while any is present) is said as such, not as a bare ENOENT."""
    from kbundle.image.workdir import STATE_DIR

    if not (workdir / STATE_DIR).is_dir():
        raise KbundleError(f"the working directory {workdir} is gone (removed while the image was built; log: {log})")
    kept = workdir / STATE_DIR / "build.log"
    shutil.copyfile(log, kept)
    return kept


@dataclass(frozen=True)
class Assembled:
    log: list[str]  # what the build log starts with: the exact pip resolution and the layers
    pip_lines: tuple[str, ...]  # the exact pip resolution installed (one wheel and its sha256 a line)


def assemble_context(
    ctx: Path,
    bundle,
    content_hash: str,
    resolved,
    dockerfile: str,
    console=None,
    *,
    base_image: Optional[str] = None,
    client=None,
) -> list[str]:
    """Fill `ctx` as the image contract says (image/context.py): the env installed on the host (conda
    with rattler; then the pip: section's wheels, fetched here, installed by the env's pip in a
    throwaway container: image/pipinstall.py), byte-compiled in another (image/bytecode.py), and
    split into the Dockerfile's layers (image/layers.py). Returns what the build log starts with:
    the exact pip resolution and the layers."""
    return _assemble(ctx, bundle, content_hash, resolved, dockerfile, console, base_image, client).log


def _assemble(
    ctx: Path,
    bundle,
    content_hash: str,
    resolved,
    dockerfile: str,
    console,
    base_image,
    client,
    work: bool = True,
    partial=None,
) -> Assembled:
    """`assemble_context`, with the pip resolution it installed; `work`: put the bundle's work/ in too;
    `partial` (image/partial.py): install only the pip wheels of the steps the engine lacks."""
    from kbundle.image import context, engine

    problem = context.layout_problem(dockerfile)
    if problem:
        raise KbundleError(problem)
    console = console or _quiet_console()
    client = client or engine.connect()
    image = base_image or bundle.base_image
    env_dir = context.env_dir(ctx)
    context.write_static(ctx, dockerfile)
    early = _early_wheels(bundle, content_hash, partial)
    _install_conda(resolved, env_dir, console)
    if partial is not None:
        log, lines = _install_pip_partly(
            bundle, content_hash, resolved, env_dir, image, client, console, partial, early
        )
    elif bundle.pip:
        log, lines = _install_pip(bundle, content_hash, resolved, env_dir, image, client, console, early)
    else:
        log, lines = [], ()
    _compile(resolved, env_dir, image, client, console)
    from kbundle.image import healing

    for found in healing.drain():  # damaged cache entries, removed and replaced (never used)
        console.print(f"[yellow]warning:[/] {escape(found)}", soft_wrap=True)
    layers = context.stage_layers(ctx)
    console.print("layers: " + ", ".join(layer.describe() for layer in layers))
    log += ["# the environment's layers: " + ", ".join(layer.describe() for layer in layers)]
    if work:
        bundle.extract(ctx, bundle.members_under(WORK_DIR))
    return Assembled(log, tuple(lines))


@dataclass(frozen=True)
class _Early:
    """The pip wheels' fetch, started before conda installs (wheels.fetch_early)."""

    future: Any  # of a wheels.WheelSet
    meter: Meter
    started: float


def _early_wheels(bundle, content_hash: str, partial) -> Optional[_Early]:
    """Start fetching the pip: section's wheels now, while conda installs, when that needs nothing
    of the conda side (every line a locked pin, image/wheels.py); else None: fetched after conda."""
    from kbundle.image import wheels
    from kbundle.specs import PipIndexes

    lines = partial.install if partial is not None else bundle.pip
    if not bundle.pip or not lines:
        return None
    meter = Meter("downloading wheels")
    started = time.perf_counter()
    future = wheels.fetch_early(
        lines,
        bundle.python,
        PipIndexes.from_dict(bundle.manifest.pip_indexes),
        wheels.glibc_of(target_of(bundle)),
        wheels.recorded_resolution(content_hash),
        partial is not None or bool(bundle.manifest.pip_locked),
        meter=meter,
    )
    return None if future is None else _Early(future, meter, started)


def _fetch_wheels(console, doing: str, early: Optional[_Early], fetch_now: Callable[[Meter], Any]):
    """The wheels, under a status line that counts their downloads: the early fetch's (its
    progress shown from now on), or `fetch_now(meter)`'s."""
    t0 = early.started if early is not None else time.perf_counter()
    with console.status(doing) as status:
        if early is not None:
            meter = early.meter
            meter.on_change = status.update
            status.update(meter.line())
            fetched = early.future.result()
        else:
            meter = Meter("downloading wheels", on_change=status.update)
            fetched = fetch_now(meter)
        took = time.perf_counter() - t0
        finish(status, f"fetched {len(fetched.files)} wheel(s) ({size(meter.bytes)} downloaded) in {took:.1f} s")
    return fetched


def _install_conda(resolved, env_dir: Path, console) -> None:
    from kbundle import contract
    from kbundle.image import env as envmod

    t0 = time.perf_counter()
    with console.status(f"installing {resolved.count} conda packages for {contract.PREFIX}") as status:
        meter = Meter("installing conda packages", resolved.count, on_change=status.update)
        envmod.install(resolved, env_dir, on_progress=lambda done, total: meter.items(done, total), meter=meter)
        finish(
            status,
            f"installed {resolved.count} conda packages ({size(meter.bytes)} downloaded) "
            f"in {time.perf_counter() - t0:.1f} s",
        )


def _install_pip(
    bundle, content_hash: str, resolved, env_dir: Path, image: str, client, console, early=None
) -> tuple[list[str], tuple[str, ...]]:
    """pip's part (image/wheels.py): pip's resolver chooses for the image (exact pins alone), kbundle
    downloads the files together into the shared cache; VCS/sdist lines are built in a container.
    Then the env's own pip installs exactly those wheels, without network. The build log's lines,
    and the exact resolution installed."""
    from kbundle.image import pipinstall, sourcebuild, wheels
    from kbundle.specs import PipIndexes

    python = bundle.python or resolved.python_version()
    if not python:
        raise KbundleError("the bundle has pip: pins but no Python version to fetch wheels for")
    indexes = PipIndexes.from_dict(bundle.manifest.pip_indexes)
    builder = sourcebuild.ContainerBuilder(client, image, env_dir)
    recorded = wheels.recorded_resolution(content_hash)
    glibc = wheels.glibc_of(target_of(bundle))
    locked = bool(bundle.manifest.pip_locked)
    fetched = _fetch_wheels(
        console,
        f"fetching {len(bundle.pip)} pip requirement(s) as wheels for CPython {python}",
        early,
        lambda meter: wheels.fetch(
            bundle.pip, python, indexes, glibc, builder, recorded, meter, locked=locked, conda_env=env_dir
        ),
    )
    lines = fetched.resolution or tuple(p.text for p in fetched.pins)
    t0 = time.perf_counter()
    with console.status(f"installing {len(lines)} wheel(s) into the environment, without network") as status:
        installed = pipinstall.install(client, image, env_dir, fetched.files, lines)
        finish(status, f"installed {len(lines)} wheel(s) with pip in {time.perf_counter() - t0:.1f} s")
    wheels.remember_resolution(content_hash, fetched.resolution)
    console.print(f"pip: {len(lines)} wheel(s): " + ", ".join(r.split(" ")[0] for r in lines))
    for message in installed.warnings:
        console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)
    log = [f"# warning: {message}" for message in installed.warnings]
    log += ["# pip: installed into the environment before the build, from exactly these wheels:", *lines]
    return log + [f"#   {line}" for line in installed.log.splitlines() if line.strip()], tuple(lines)


def _install_pip_partly(
    bundle, content_hash: str, resolved, env_dir: Path, image: str, client, console, partial, early=None
) -> tuple[list[str], tuple[str, ...]]:
    """`_install_pip` for image/partial.py's plan: the wheels of the missing steps' groups are
    fetched and installed; the others' metadata is placed, so that pip check sees them all."""
    from kbundle.image import partial as partialmod
    from kbundle.image import pipinstall, wheels
    from kbundle.specs import PipIndexes

    python = bundle.python or resolved.python_version()
    glibc = wheels.glibc_of(target_of(bundle))
    indexes = PipIndexes.from_dict(bundle.manifest.pip_indexes)
    fetched = _fetch_wheels(
        console,
        f"fetching {len(partial.install)} pip wheel(s) for CPython {python}",
        early,
        lambda meter: wheels.fetch(partial.install, python, indexes, glibc, None, None, meter, locked=True),
    )
    site = env_dir / "lib" / f"python{resolved.python_version()}" / "site-packages"
    for files in partial.metadata:
        partialmod.write_metadata(files, site)
    t0 = time.perf_counter()
    with console.status(f"installing {len(partial.install)} wheel(s) into the environment, without network") as status:
        installed = pipinstall.install(client, image, env_dir, fetched.files, partial.install, judged=partial.lines)
        finish(status, f"installed {len(partial.install)} wheel(s) with pip in {time.perf_counter() - t0:.1f} s")
    wheels.remember_resolution(content_hash, partial.lines)
    for message in installed.warnings:
        console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)
    log = [f"# warning: {message}" for message in installed.warnings]
    log += [
        "# pip: the environment's exact resolution (the wheels of steps on this engine already were not installed):",
        *partial.lines,
    ]
    return log + [f"#   {line}" for line in installed.log.splitlines() if line.strip()], partial.lines


def _compile(resolved, env_dir: Path, image: str, client, console) -> None:
    from kbundle.image import bytecode

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
    if compiled.damaged:
        console.print(
            f"[yellow]warning:[/] {len(compiled.damaged)} cached .pyc file(s) were damaged "
            f"(first: {escape(compiled.damaged[0])}): removed from kbundle's cache and compiled again",
            soft_wrap=True,
        )
    if compiled.skipped:
        console.print(
            f"[yellow]warning:[/] not byte-compiled ({escape(compiled.skipped)}): kernels will start slower",
            soft_wrap=True,
        )


def _quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)
