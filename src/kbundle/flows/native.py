"""`kbundle run BUNDLE --native`: the recipient without a container engine.

The bundle's environment is installed on this machine, in a prefix kbundle owns (image/native.py),
and its kernel is a plain ipykernel of that prefix. Nothing isolates it: the bundle's code runs as
the recipient, outside any container, and the consent says so first (flows/review.py).

1. refuse what --native cannot do, and a machine it does not run on, before any work (`check`)
2. take the bundle as every run does (flows/arrive.py): open it once, verifying every member, check
   its signature, refuse a kernel name another bundle holds, place its notebook and files
3. preflight on this host (image/preflight.py `evaluate_native`): GPUs straight from NVML, the
   driver against the environment's CUDA, each GPU's architecture against the CUDA build
4. the prefix, `<kbundle cache>/native/<content hash[:16]>` (or under `--prefix-root`): complete
   (its stamp) means reused, nothing installed and nothing asked
5. otherwise consent (the review: runs as you, outside any container; which pip lines build here;
   .pth files; the disk the prefix takes), then under the prefix's lock: conda from the bundle's
   lock (or solved against THIS machine's virtual packages), the pip: section's wheels fetched as
   for the image and installed by the env's own pip here, the same checks as the image's, the stamp
6. register the kernel `kbundle-<name>`, "<name> (kbundle, native)" (flows/register.py: the same
   rules as every kernel's)

A run that fails, is declined or is interrupted removes what it created (flows/undo.py): the
workdir it made and a prefix it started.

With `--slurm` (a cluster without containers) the prefix goes under `--prefix-root`, which is
required: the compute nodes cannot see kbundle's cache. Nothing is checked against this machine's
GPUs (the node's are Slurm's to give), and the kernel registered is a Slurm kernel,
`kbundle-<name>-slurm`, whose node agent runs the prefix's own python (kernel/node_agent.py
`NativeAgent`), with the same activation a local native kernel gets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from rich.markup import escape

from kbundle.display import safe, size
from kbundle.errors import UsageError
from kbundle.flows.arrive import Arrival
from kbundle.flows.notices import print_warnings, warn
from kbundle.flows.options import RunOptions, RunResult
from kbundle.flows.register import Registration, register


@dataclass(frozen=True)
class Ready:
    """What `check` found before the bundle was opened."""

    gpus: object  # image/preflight.py GpuRequest
    root: Path  # where native prefixes live


@dataclass(frozen=True)
class NativePlan:
    """What the native install will do, found offline before consent."""

    records: Optional[tuple]  # the lock's records; None when unlocked (solved after consent)
    target: tuple[str, ...]  # this machine's virtual packages (an unlocked solve, and pip's glibc)
    review: object  # flows/review.py NativeReview
    needs: object  # flows/checks.py Needs


def check_options(options) -> None:
    """What --native cannot do, refused before any work (pure)."""
    if options.slurm is not None and options.prefix_root is None:
        raise UsageError(
            "--native with --slurm needs --prefix-root DIR, a folder on a file system the compute nodes "
            "share: they cannot see kbundle's cache on this machine"
        )
    refused = [
        flag
        for flag, given in (
            ("--image", options.image),
            ("--base-image", options.base_image),
            ("--use-bundled-dockerfile", options.use_bundled_dockerfile),
            ("--network host", options.network == "host"),
        )
        if given
    ]
    if refused:
        raise UsageError(
            f"--native runs no container: {refused[0]} does not apply (the kernel runs on this machine, on its network)"
        )
    if options.prefix_root is not None and not options.native:
        raise UsageError("--prefix-root goes with --native")


def check(options: RunOptions) -> Ready:
    """Step 1: --gpus parsed, the options --native refuses, a machine it cannot install on."""
    from kbundle.image import native, preflight

    gpus = preflight.GpuRequest.parse(options.gpus)
    check_options(options)
    native.check_platform()
    return Ready(gpus, native.native_root(options.prefix_root))


def run_native(options: RunOptions, ready: Ready, arrival: Arrival, console, undo) -> RunResult:
    """Steps 3-6, for a bundle `arrive` has opened and placed."""
    from kbundle.image import native, preflight

    bundle, signature, placement, root = arrival.bundle, arrival.signature, arrival.placement, ready.root
    warnings = arrival.kept_warnings
    report = None  # a Slurm kernel's GPUs are the node's, given by Slurm: this machine's say nothing
    if options.slurm is None:
        report = preflight.evaluate_native(preflight.probe_nvml(), bundle.cuda, ready.gpus)
        report.raise_for_errors()
        warnings += [f.message for f in report.warnings]

    prefix = native.prefix_for(arrival.content_hash, root)
    consented = False
    if not native.is_complete(prefix):  # nothing to install: no question (as an image already built)
        plan = plan_native(bundle, options, signature, prefix, placement.workdir)
        _prechecks(plan.needs, placement.workdir, root)
        print_warnings(console, warnings)
        _consent(console, options, plan, signature)
        consented = True
    else:
        print_warnings(console, warnings)

    installed = None
    waiting = f"another kbundle run is installing {prefix}; waiting for it"
    with native.locked(prefix, on_wait=lambda: console.print(escape(waiting), soft_wrap=True)):
        if not native.is_complete(prefix):
            if not consented:  # removed between the look and the lock (gc): ask after all
                plan = plan_native(bundle, options, signature, prefix, placement.workdir)
                _consent(console, options, plan, signature)
            if prefix.exists():  # a run that died half-way: its prefix goes, then again from the start
                console.print(escape(f"removing the unfinished environment {prefix}"), soft_wrap=True)
                native.remove(prefix)
            undo.created_folder(prefix)
            installed = install_prefix(bundle, arrival.content_hash, plan, prefix, options.yes, console, warnings)
        stamp = native.stamp_of(prefix) or {}
        kernel = _registration(bundle, prefix, stamp, report, _job(options))
        spec_dir = register(options, arrival, kernel, warnings, console)
    pip_resolved = [str(x) for x in stamp.get("pip_resolved") or []]
    return RunResult(
        name=bundle.name,
        kernel_name=arrival.kernel_name,
        display_name=arrival.display_name,
        image="",
        image_id="",
        workdir=placement.workdir,
        notebook=placement.notebook,
        built=installed is not None,
        gpus=list(kernel.gpus),
        seconds=time.perf_counter() - arrival.started,
        packages=int(stamp.get("packages") or 0),
        pip=len(bundle.pip),
        base_image="",
        warnings=warnings,
        kept=arrival.kept,
        kernelspec=spec_dir,
        pip_resolved=pip_resolved,
        native={
            "prefix": str(prefix),
            "reused": installed is None,
            "install_seconds": round(installed, 3) if installed is not None else 0.0,
            "virtual_packages": list(stamp.get("virtual_packages") or []),
        },
        slurm=kernel.slurm,
    )


def _job(options: RunOptions):
    """The Slurm job's options with the login node's address filled in; None without --slurm."""
    import os
    from dataclasses import replace

    from kbundle.kernel.slurm import login_address

    job = options.slurm
    if job is not None and not job.login_address:
        job = replace(job, login_address=login_address(dict(os.environ)))
    return job


def plan_native(bundle, options, signature, prefix: Path, workdir: Path) -> NativePlan:
    """Everything the native review shows, found offline: the lock is read, not fetched."""
    from kbundle.flows.checks import estimate
    from kbundle.flows.review import (
        NativeReview,
        conda_summary,
        native_builds,
        pip_hosts,
        unpinned,
        url_host,
    )
    from kbundle.image import env as envmod
    from kbundle.image import native, provenance
    from kbundle.image.make import declared_channels

    channels = declared_channels(bundle)
    target = native.host_virtual_packages()
    unusual = []
    records = None
    if bundle.lock_text:
        records = envmod.resolve(envmod.EnvSpec(channels, tuple(bundle.dependencies), bundle.lock_text)).records
        hosts = [url_host(str(r.url)) for r in records]
        conda = conda_summary(records, bundle.dependencies) + " (the bundle's lock)"
    else:
        hosts = [url_host(provenance.channel_base(c)) for c in channels]
        conda = f"not locked: solved here from {len(bundle.dependencies)} spec(s), for this machine ({native.described(target)})"
        unusual.append(
            "the environment is not locked: it is solved on this machine, for its glibc and CUDA, "
            "and may differ from the sender's"
        )
        loose = unpinned(bundle.dependencies)
        if loose:
            unusual.append("unpinned conda specs: " + ", ".join(safe(s) for s in loose))
    if bundle.pip:
        hosts += list(pip_hosts(bundle.manifest))
    needs = estimate(records, pip=tuple(bundle.pip))
    review = NativeReview(
        sender=safe(signature.describe()),
        prefix=str(prefix),
        hosts=tuple(dict.fromkeys(hosts)),
        conda=conda,
        pip=len(bundle.pip),
        builds=native_builds(bundle.pip),
        disk=disk_words(needs),
        unusual=tuple(unusual),
        workdir=str(workdir),
        slurm=_slurm_words(options.slurm),
    )
    return NativePlan(tuple(records) if records is not None else None, target, review, needs)


def _slurm_words(job) -> str:
    """Where a native Slurm kernel runs, for the review (pure); "" without --slurm."""
    if job is None:
        return ""
    asks = ", ".join(f"{k} {v}" for k, v in (("partition", job.partition), ("gres", job.gres), ("time", job.time)) if v)
    return f"a Slurm compute node ({asks or 'the cluster defaults'}), straight from this prefix, as you"


def disk_words(needs) -> str:
    """The disk a native prefix takes, for the review (pure)."""
    if needs.download is None:
        return "unknown until the environment is solved"
    return (
        f"about {size(needs.env)} for the environment (hard links into kbundle's package cache where both "
        f"share a disk), {size(needs.download)} of packages to download at most"
    )


def _prechecks(needs, workdir: Path, root: Path) -> None:
    """Before the first download: every place run writes is writable, and the disks have room."""
    from kbundle import activity
    from kbundle.flows import checks

    for path, what in [*checks.places(workdir), (root, "the native prefixes' folder")]:
        checks.check_writable(path, what)
    activity.hold(create=True)  # from here on the run writes to the cache: gc must see it working
    _check_room(needs, root)


def _check_room(needs, root: Path) -> None:
    """The cache and the prefixes' folder have room; an unlocked bundle is checked once solved."""
    from kbundle.cache import cache_root
    from kbundle.flows import checks

    if needs.download is not None:
        checks.check_free(cache_root(), needs.download + needs.env, "kbundle's cache")
        checks.check_free(root, needs.env, "the native prefixes' folder")


def _consent(console, options, plan: NativePlan, signature) -> None:
    from kbundle.flows.review import consent_native

    consent_native(console, yes=options.yes, review=plan.review, signature=signature)


def _fetch(bundle, plan: NativePlan, prefix: Path, python: str, indexes, key: str, console):
    """The pip: section's wheels, resolved against the installed conda side (an unlocked section)."""
    from kbundle.image import sourcebuild, wheels
    from kbundle.progress import Meter, finish

    t0 = time.perf_counter()
    with console.status(f"fetching {len(bundle.pip)} pip requirement(s) as wheels for CPython {python}") as status:
        meter = Meter("downloading wheels", on_change=status.update)
        fetched = wheels.fetch(
            bundle.pip,
            python,
            indexes,
            wheels.glibc_of(plan.target),
            sourcebuild.HostBuilder(prefix),
            wheels.recorded_resolution(key),
            meter,
            locked=bool(bundle.manifest.pip_locked),
            conda_env=prefix,
        )
        finish(
            status,
            f"fetched {len(fetched.files)} wheel(s) ({size(meter.bytes)} downloaded) in {time.perf_counter() - t0:.1f} s",
        )
    return fetched


def install_prefix(
    bundle, content_hash: str, plan: NativePlan, prefix: Path, yes: bool, console, warnings: list[str]
) -> float:
    """The environment into `prefix`, its own final prefix: conda with rattler, the pip: section's
    wheels by the env's own pip here, the checks, and the stamp last. Returns the seconds it took."""
    from kbundle.flows import checks
    from kbundle.image import env as envmod
    from kbundle.image import native, pipinstall, wheels
    from kbundle.image.make import declared_channels
    from kbundle.progress import Meter, finish
    from kbundle.specs import PipIndexes

    t_start = time.perf_counter()
    if plan.records is not None:
        resolved = envmod.ResolvedEnv(tuple(plan.records), locked=True)
    else:
        spec = envmod.EnvSpec(declared_channels(bundle), tuple(bundle.dependencies), None, plan.target)
        resolved = envmod.resolve(spec)
        _check_room(checks.estimate(tuple(resolved.records), pip=tuple(bundle.pip)), prefix.parent)
    indexes = PipIndexes.from_dict(bundle.manifest.pip_indexes)
    key = "native-" + content_hash
    # A locked pip section is fetched while conda installs: it needs nothing from the conda side.
    early = wheels.fetch_early(
        bundle.pip,
        bundle.python,
        indexes,
        wheels.glibc_of(plan.target),
        wheels.recorded_resolution(key),
        bool(bundle.manifest.pip_locked),
    )
    beside = _pip_beside_conda(bundle, resolved, prefix, early) if bundle.pip and early is not None else None
    t0 = time.perf_counter()
    with console.status(f"installing {resolved.count} conda packages into {prefix}") as status:
        meter = Meter("installing conda packages", resolved.count, on_change=status.update)
        stats = envmod.install(
            resolved,
            prefix,
            on_progress=lambda d, t: meter.items(d, t),
            meter=meter,
            final_prefix=str(prefix),
            early=beside,
        )
        finish(
            status,
            f"installed {resolved.count} conda packages ({size(meter.bytes)} downloaded) "
            f"in {time.perf_counter() - t0:.1f} s",
        )
    lines: tuple[str, ...] = ()
    if bundle.pip:
        python = bundle.python or resolved.python_version()
        if not python:
            from kbundle.errors import KbundleError

            raise KbundleError("the bundle has pip: pins but no Python version to fetch wheels for")
        if early is not None:
            fetched = early.result()
            console.print(f"fetched {len(fetched.files)} wheel(s) while conda installed ({fetched.downloaded} new)")
        else:
            fetched = _fetch(bundle, plan, prefix, python, indexes, key, console)
        lines = fetched.resolution or tuple(p.text for p in fetched.pins)
        installed = stats.early  # installed beside conda's last packages; still to be checked
        if installed is not None:
            console.print(f"installed {len(lines)} wheel(s) with pip while conda's last packages were linked")
            installed = replace(installed, warnings=pipinstall.check_on_host(prefix, lines))
        else:
            installed = _install_pip(console, yes, warnings, prefix, fetched, lines)
        wheels.remember_resolution(key, fetched.resolution)
        console.print(f"pip: {len(lines)} wheel(s): " + ", ".join(r.split(" ")[0] for r in lines))
        for message in installed.warnings:
            warn(console, warnings, message)
    from kbundle.image import healing

    for found in healing.drain():  # damaged cache entries, removed and replaced (never used)
        warn(console, warnings, found)
    _check_kernel(prefix)
    scripts = native.activate_scripts(prefix)
    if scripts:
        message = (
            f"the environment's activation scripts (etc/conda/activate.d: {', '.join(scripts)}) do not run for "
            "a native kernel; an image's entrypoint runs them"
        )
        warn(console, warnings, message)
    native.write_stamp(
        prefix,
        bundle_hash=content_hash,
        name=bundle.name,
        packages=resolved.count,
        locked=resolved.locked,
        virtual_packages=list(plan.target) if not resolved.locked else [],
        pip_resolved=list(lines),
    )
    return time.perf_counter() - t_start


def _install_pip(console, yes: bool, warnings: list[str], prefix: Path, fetched, lines):
    """The pip: section after conda, once any .pth file in its wheels has been consented to."""
    from kbundle.flows.review import consent_pth
    from kbundle.image import pipinstall, wheels
    from kbundle.progress import finish

    for message in consent_pth(console, yes=yes, found=wheels.pth_files(fetched.files)):
        warnings.append(message)
        console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)
    t0 = time.perf_counter()
    with console.status(f"installing {len(lines)} wheel(s) into {prefix}, without network") as status:
        installed = pipinstall.install_on_host(prefix, fetched.files, lines)
        finish(status, f"installed {len(lines)} wheel(s) with pip in {time.perf_counter() - t0:.1f} s")
    return installed


def _pip_beside_conda(bundle, resolved, prefix: Path, early):
    """An EarlyLink (image/env.py) for a locked pip: section: python, pip and what they need are
    linked first, and the wheels fetched while conda installed go in while rattler links the rest.
    A conda package that a pip line names goes in first too (pip then sees it, as after conda). A
    wheel with a .pth file is left for afterwards: its question is asked on the main thread."""
    from kbundle.image import env as envmod
    from kbundle.image import pipinstall, wheels
    from kbundle.specs import parse_pip_line

    pip_names = []
    for line in bundle.pip:
        pin = parse_pip_line(line)
        if pin is not None:
            pip_names.append(pin.name)
    names = envmod.dependency_closure(resolved.records, ["python", "pip", *pip_names])

    def install_wheels():
        fetched = early.result()
        if wheels.pth_files(fetched.files):
            return None
        lines = fetched.resolution or tuple(p.text for p in fetched.pins)
        return pipinstall.install_on_host(prefix, fetched.files, lines, check=False)

    return envmod.EarlyLink(resolved.records, names, install_wheels)


def _check_kernel(prefix: Path) -> None:
    """A native kernel is the env's own ipykernel: refuse, naming it, an env without one."""
    from kbundle.errors import KbundleError

    if not any(prefix.glob("lib/python3*/site-packages/ipykernel_launcher.py")):
        raise KbundleError(
            "the bundle's environment has no ipykernel, so it cannot be a Jupyter kernel: "
            "the sender adds ipykernel to the environment and packs it again"
        )


def _registration(bundle, prefix: Path, stamp: dict, report, job=None) -> Registration:
    """The native kernel: the prefix, its activation, the GPUs the preflight chose (Slurm's --gres
    for a Slurm kernel, whose node sets CUDA_VISIBLE_DEVICES itself), the pip pins installed."""
    from kbundle.image import native, preflight

    env = native.activation(prefix, bool(bundle.manifest.cuda_env_libs), native.nvidia_lib_dirs(prefix))
    pins = [str(x) for x in stamp.get("pip_resolved") or []]
    if job is not None:
        gpus = [job.gres] if job.gres else []
        return Registration("", gpus, pip_resolved=pins, native=str(prefix), env=env, slurm=job)
    devices = preflight.visible_devices(report.request, report.plan)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return Registration("", list(report.plan.gpus), pip_resolved=pins, native=str(prefix), env=env)


def summary_lines(result) -> list[str]:
    """The calm summary of a native run (pure)."""
    info = result.native or {}
    where = "GPUs " + ", ".join(result.gpus) + " (straight from the driver)" if result.gpus else "CPU"
    where += ", on this machine"
    if result.slurm is not None:
        job = result.slurm
        asks = ", ".join(f"--{k} {v}" for k, v in (("partition", job.partition), ("gres", job.gres)) if v)
        where = f"a Slurm node, through srun {asks or '(the cluster defaults)'}"
    if info.get("reused"):
        state = f"already installed: reused, {result.seconds:.1f}s"
    else:
        state = f"installed, {result.seconds:.1f}s"
    lines = [
        f"prefix     {info.get('prefix', '')} ({state})",
        f"runs on    {where}, as you, outside any container",
        f'kernel     {result.kernel_name}  "{result.display_name}"',
        f"workdir    {result.workdir}",
        f'open it    jupyter lab {result.notebook}   (or pick "{result.display_name}" in VS Code)',
    ]
    return [safe(line) for line in lines]
