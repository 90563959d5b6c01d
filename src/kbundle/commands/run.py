"""`kbundle run` and `kbundle doctor`: the recipient's commands, thin over kbundle/flows/run.py.

Progress and warnings go to stderr; stdout carries only the summary or the `--json` object,
so scripts can read it. Heavy imports (docker, rattler, jupyter_client) stay inside functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _stderr_console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, highlight=False)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def run(
    bundle: Path = typer.Argument(..., help="The .kbundle file to rebuild and register as a kernel."),
    gpus: str = typer.Option("auto", "--gpus", help="auto | all | none | N | device=I,J"),
    base_image: Optional[str] = typer.Option(
        None, "--base-image", help="Build FROM this image instead of the bundle's."
    ),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the notebook goes (default ./<name>/)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the summary."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Build without asking (you reviewed the bundle)."),
    execute: bool = typer.Option(
        False, "--execute", help="Run the notebook headless in the kernel and compare outputs."
    ),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="With --execute: where the executed copy goes."),
    lab: bool = typer.Option(False, "--lab", help="Open JupyterLab on the notebook with the kernel selected."),
    use_bundled_dockerfile: bool = typer.Option(
        False,
        "--use-bundled-dockerfile",
        help="Build the bundle's own Dockerfile instead of kbundle's rendering of its manifest (review the diff first).",
    ),
    require_signature: bool = typer.Option(
        False,
        "--require-signature",
        help="Refuse bundles not signed by a key you trust (see `kbundle trust add`), even with --yes.",
    ),
    network: str = typer.Option(
        "bridge", "--network", help="The kernel's network: bridge (ports on 127.0.0.1 only) or host."
    ),
    max_extract: str = typer.Option(
        "2G", "--max-extract", help="Refuse, before writing anything, a bundle that unpacks to more (e.g. 500M, 4G)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Register the kernel as kbundle-NAME (default: the bundle's name), e.g. beside another."
    ),
    replace: bool = typer.Option(
        False, "--replace", help="Take over a kernel of the same name that runs another bundle."
    ),
    progress: str = typer.Option(
        "auto", "--progress", help="auto (rich on a terminal, else plain) | rich | plain (a line every 5 s) | none"
    ),
    engine_timeout: float = typer.Option(
        10.0, "--engine-timeout", help="Seconds the Docker engine may take to answer before kbundle gives up."
    ),
    image: Optional[str] = typer.Option(
        None,
        "--image",
        help="Pull this image (NAME@sha256:…, from `kbundle push`) instead of building; it must be this bundle's.",
    ),
    slurm: bool = typer.Option(
        False,
        "--slurm",
        help="Register a kernel that runs on a Slurm compute node (needs --image; see docs/cluster.md).",
    ),
    partition: str = typer.Option("", "--partition", help="With --slurm: the partition to run the kernel in."),
    gres: str = typer.Option("", "--gres", help="With --slurm: the generic resources, e.g. gpu:1."),
    time_limit: str = typer.Option("", "--time", help="With --slurm: the job's time limit, e.g. 4:00:00."),
    account: str = typer.Option("", "--account", help="With --slurm: the account to charge."),
    slurm_arg: Optional[list[str]] = typer.Option(
        None, "--slurm-arg", help="With --slurm: one more srun argument, e.g. --slurm-arg=--qos=short (repeatable)."
    ),
    start_timeout: float = typer.Option(
        300.0, "--start-timeout", help="With --slurm: seconds a kernel's job may wait in the queue."
    ),
    login_address: str = typer.Option(
        "", "--login-address", help="With --slurm: this machine's address as the nodes reach it (default: found)."
    ),
    native: bool = typer.Option(
        False,
        "--native",
        help="No Docker: install the environment on this machine and run the kernel there, as you, outside any "
        'container (see docs/usage.md, "No Docker?").',
    ),
    prefix_root: Optional[Path] = typer.Option(
        None,
        "--prefix-root",
        help="With --native: where its environment goes (default: kbundle's cache); with --slurm too, "
        "required: a folder on a file system the compute nodes share.",
    ),
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="Build the image again from scratch even when it exists (`kernels list` or `doctor` says it is damaged).",
    ),
) -> None:
    """Rebuild a bundle's image on this machine and register a Jupyter kernel that runs inside it
    (--native: install its environment on this machine instead, without a container)."""
    from kbundle.errors import UsageError
    from kbundle.flows.run import RunOptions, run_bundle, summary_lines
    from kbundle.progress import reporter

    if output is not None and not execute:
        raise UsageError("-o/--output goes with --execute")
    if lab:  # before a build that may take minutes, not after it
        from kbundle.kernel.lab import require_jupyterlab

        require_jupyterlab("run without --lab and open the notebook in VS Code or Notebook")
    console = reporter(progress)
    options = RunOptions(
        bundle,
        gpus,
        base_image,
        workdir,
        yes,
        use_bundled_dockerfile,
        require_signature,
        network,
        parse_size(max_extract),
        name=name,
        replace=replace,
        engine_timeout=_timeout(engine_timeout),
        image=image,
        slurm=_slurm_options(
            slurm, gpus, partition, gres, time_limit, account, slurm_arg or [], start_timeout, login_address
        ),
        native=native,
        prefix_root=prefix_root,
        rebuild=rebuild,
    )
    result = run_bundle(options, console)
    data = result.to_dict()
    if not as_json:
        for line in summary_lines(result):
            typer.echo(line)
    code = 0
    if execute:
        data["execute"], code = _execute(result, output, as_json)
    if as_json:
        _print_json(data)
    if lab:
        from kbundle.kernel.lab import open_lab

        open_lab(result.workdir, result.notebook, result.kernel_name)
    if code:
        raise typer.Exit(code)


def _slurm_options(
    slurm: bool,
    gpus: str,
    partition: str,
    gres: str,
    time_limit: str,
    account: str,
    extra: list[str],
    start_timeout: float,
    login_address: str,
):
    """kernel/slurm.py's SlurmOptions for --slurm, or None; a job option without --slurm is a usage error."""
    from kbundle.errors import UsageError
    from kbundle.kernel.slurm import SlurmOptions

    given = [
        flag
        for flag, value in (
            ("--partition", partition),
            ("--gres", gres),
            ("--time", time_limit),
            ("--account", account),
            ("--slurm-arg", extra),
            ("--login-address", login_address),
        )
        if value
    ]
    if not slurm:
        if given:
            raise UsageError(f"{given[0]} goes with --slurm")
        return None
    if gpus != "auto":
        raise UsageError("with --slurm the GPUs come from Slurm: ask for them with --gres gpu:N, not --gpus")
    if not start_timeout > 0:
        raise UsageError("--start-timeout must be a number of seconds above 0")
    for arg in extra:
        if not arg.startswith("-") or "\n" in arg:
            raise UsageError(f"--slurm-arg {arg!r}: give one srun option, e.g. --slurm-arg=--qos=short")
    return SlurmOptions(partition, gres, time_limit, account, tuple(extra), start_timeout, login_address)


def _execute(result, output: Optional[Path], as_json: bool):
    """Hand over to the kernel stage's headless execution; returns (report data, exit code)."""
    from rich.console import Console

    from kbundle.kernel.execute import execute_notebook

    target = output or result.notebook.with_name(result.notebook.stem + ".executed" + result.notebook.suffix)
    report = execute_notebook(result.notebook, result.kernel_name, target)
    if not as_json:
        Console(highlight=False, soft_wrap=True).print(report.render())  # paths stay whole for copy-paste
    return report.to_dict(), report.exit_code


def _kernel_networks() -> list[dict[str, str]]:
    """Each registered kbundle kernel and the network its launcher gives it."""
    from kbundle.kernel.spec import list_kernelspecs

    try:
        return [{"name": k.name, "network": k.network, "native": bool(k.native)} for k in list_kernelspecs()]
    except Exception:  # doctor reports what it can; a broken Jupyter setup is not its topic
        return []


def parse_size(text: str) -> int:
    """`2G`, `500M`, `64K` or plain bytes (binary units, as `du -h` prints them)."""
    from kbundle.errors import UsageError

    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    if not value:
        raise UsageError("--max-extract needs a size such as 500M or 4G")
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "")
    try:
        size = int(float(number) * units[unit])
    except ValueError:
        raise UsageError(f"--max-extract {text!r}: give a size such as 500M or 4G") from None
    if size <= 0:
        raise UsageError(f"--max-extract {text!r} must be more than nothing")
    return size


def _timeout(seconds: float) -> float:
    from kbundle.errors import UsageError

    if not seconds > 0:
        raise UsageError("--engine-timeout must be a number of seconds above 0")
    return seconds


def doctor(
    bundle: Optional[Path] = typer.Argument(
        None, help="A .kbundle file: also check its needs (CUDA, GPU arch, disk) against this machine."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    engine_timeout: float = typer.Option(
        10.0, "--engine-timeout", help="Seconds the Docker engine may take to answer before kbundle gives up."
    ),
    slurm: bool = typer.Option(False, "--slurm", help="Check this Slurm cluster instead: sinfo, GRES, a test step."),
    partition: str = typer.Option("", "--partition", help="With --slurm: the partition (default: the cluster's)."),
    gres: str = typer.Option("", "--gres", help="With --slurm: the GRES kernels will ask for, e.g. gpu:1."),
    native: bool = typer.Option(
        False, "--native", help="Check this machine for `run --native` instead: no engine; driver, GPUs, disk."
    ),
    prefix_root: Optional[Path] = typer.Option(
        None, "--prefix-root", help="With --native: where the prefixes would go (default: kbundle's cache)."
    ),
) -> None:
    """Check Docker, GPUs and the NVIDIA driver the way `kbundle run` does, without building."""
    from kbundle.errors import KbundleError, MachineError, UsageError
    from kbundle.image import preflight
    from kbundle.image.engine import connect, docker_host

    if prefix_root is not None and not native:
        raise UsageError("--prefix-root goes with --native")
    if slurm:
        return _doctor_slurm(partition, gres, as_json)
    if native:
        return _doctor_native(_open_for_doctor(bundle), prefix_root, as_json)

    opened = _open_for_doctor(bundle)
    cuda = opened.cuda if opened else None
    try:
        client = connect(_timeout(engine_timeout))
    except KbundleError as exc:  # still show what NVML knows
        client = None
        engine = preflight.EngineFacts(False, docker_host(), error=f"{exc}; {preflight.NATIVE_HINT}")
        report = preflight.evaluate(engine, preflight.probe_nvml(), cuda, preflight.GpuRequest.parse("auto"))
    else:
        base = opened.base_image if opened else None  # a local base lets the engine itself say if it passes GPUs
        report = preflight.run_preflight(client, cuda, preflight.GpuRequest.parse("auto"), base, ask_engine=True)
    if opened is not None:
        report.findings.extend(_bundle_findings(opened, client, report.plan.on_gpu))
    kernels = _kernel_networks()
    failure = report.errors[0].message if report.errors else None
    if _findings_out(report.findings, report.to_dict() | {"kernels": kernels}, failure, as_json):
        return
    for gpu in report.nvml.gpus:
        arch = preflight.load_tables().arch(gpu.capability)
        native = f"CUDA {arch.first}..{arch.last or 'latest'}" if arch else "unknown"
        typer.echo(f"gpu {gpu.index}  {gpu.name}  sm_{gpu.capability.replace('.', '')}  native: {native}")
    for kernel in kernels:
        note = "  (shares this machine's network: --network host)" if kernel["network"] == "host" else ""
        if kernel.get("native"):
            note = "  (runs on this machine, outside any container: --native)"
        typer.echo(f"kernel {kernel['name']}  network {kernel['network']}{note}")
    if failure:
        raise MachineError(failure)


def _doctor_slurm(partition: str, gres: str, as_json: bool) -> None:
    """`doctor --slurm`: the cluster's side of a Slurm kernel (kernel/slurm_doctor.py)."""
    from kbundle.errors import MachineError
    from kbundle.image import preflight
    from kbundle.kernel import slurm_doctor

    findings = slurm_doctor.check(partition, gres)
    failure = next((f.message for f in findings if f.level == preflight.ERROR), None)
    data = {"findings": [{"level": f.level, "topic": f.topic, "message": f.message} for f in findings]}
    if not _findings_out(findings, data, failure, as_json) and failure:
        raise MachineError(failure)


def _doctor_native(opened, prefix_root: Optional[Path], as_json: bool) -> None:
    """`doctor --native`: what `run --native` checks before it installs, with no engine asked: the
    platform, the driver and GPUs straight from NVML against the bundle's CUDA, and the disk."""
    from kbundle.errors import KbundleError, MachineError
    from kbundle.image import native, preflight

    findings = []
    try:
        native.check_platform()
        root = native.native_root(prefix_root)
    except KbundleError as exc:
        findings.append(preflight.Finding(preflight.ERROR, "native", str(exc)))
        root = None
    report = preflight.evaluate_native(
        preflight.probe_nvml(), opened.cuda if opened else None, preflight.GpuRequest.parse("auto")
    )
    findings += report.findings
    if opened is not None and root is not None:
        findings += _native_bundle_findings(opened, root, report.plan.on_gpu)
    failure = next((f.message for f in findings if f.level == preflight.ERROR), None)
    data = {k: v for k, v in report.to_dict().items() if k != "docker"}  # no engine is asked
    data["ok"] = failure is None
    data["findings"] = [{"level": f.level, "topic": f.topic, "message": f.message} for f in findings]
    if not _findings_out(findings, data, failure, as_json) and failure:
        raise MachineError(failure)


def _native_bundle_findings(opened, root: Path, on_gpu: bool) -> list:
    """The bundle's needs for a native prefix under `root`: the download and the prefix's disk,
    checked as `run --native` checks them before its first download."""
    from kbundle.display import size
    from kbundle.errors import KbundleError
    from kbundle.flows import checks
    from kbundle.flows.native import _check_room, disk_words
    from kbundle.image import preflight
    from kbundle.image.make import locked_records

    ok, warn, fail = preflight.OK, preflight.WARN, preflight.ERROR
    found = [
        preflight.Finding(ok, "bundle", f"{opened.name}: CUDA {opened.cuda or 'none'}, {len(opened.pip)} pip line(s)")
    ]
    if opened.cuda and not on_gpu:
        found.append(
            preflight.Finding(warn, "gpu", f"it uses CUDA {opened.cuda}, and gets no GPU here: it runs on CPU")
        )
    needs = checks.estimate(locked_records(opened), pip=tuple(opened.pip))
    if needs.download is None:
        return [*found, preflight.Finding(warn, "disk", f"cannot estimate the disk it needs: {disk_words(needs)}")]
    try:
        _check_room(needs, root)
    except KbundleError as exc:
        return [*found, preflight.Finding(fail, "disk", str(exc))]
    import shutil

    free = shutil.disk_usage(checks.existing_ancestor(root)).free
    return [*found, preflight.Finding(ok, "disk", f"{disk_words(needs)}; {size(free)} free under {root}")]


def _findings_out(findings, data: dict, failure: Optional[str], as_json: bool) -> bool:
    """doctor's output: the JSON object (then exit 4 on a failure), or a line per finding.
    True when the JSON was printed and nothing more is to be said."""
    from kbundle.errors import MachineError
    from kbundle.image import preflight

    if as_json:
        if failure:
            data["error"] = {"code": MachineError.exit_code, "message": failure}
        _print_json(data)
        if failure:
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(MachineError.exit_code)
        return True
    marks = {preflight.OK: "ok   ", preflight.WARN: "warn ", preflight.ERROR: "fail "}
    for finding in findings:
        typer.echo(f"{marks[finding.level]}  {finding.topic:<8} {finding.message}")
    return False


def _open_for_doctor(bundle: Optional[Path]):
    if bundle is None:
        return None
    from kbundle.bundle import open_bundle

    return open_bundle(bundle)


def _image_findings(opened, client) -> list:
    """Whether this engine's images of the bundle still hold what was built into them."""
    from kbundle import contract
    from kbundle.image import integrity, preflight

    if client is None:
        return []
    found = []
    for image in client.api.images(filters={"label": f"{contract.LABEL_CONTENT_HASH}={opened.identity}"}):
        ref = next((t for t in image.get("RepoTags") or [] if t != "<none>:<none>"), image["Id"][:19])
        verdict = integrity.check(client, image["Id"])
        if verdict.state == integrity.DAMAGED:
            advice = f"{verdict.detail}; rebuild it with `kbundle run BUNDLE --rebuild`"
            found.append(preflight.Finding(preflight.ERROR, "image", f"{ref} is damaged: {advice}"))
        elif verdict.state == integrity.OK:
            found.append(preflight.Finding(preflight.OK, "image", f"{ref} holds the environment it was built with"))
    return found


def _bundle_findings(opened, client, on_gpu: bool) -> list:
    """This bundle's needs against this machine: the disk its image and build take (CUDA against
    the driver and the GPUs' architecture are the preflight's, given the bundle's CUDA)."""
    import shutil

    from kbundle.cache import cache_root
    from kbundle.display import size
    from kbundle.errors import KbundleError
    from kbundle.flows import checks
    from kbundle.image import env as envmod
    from kbundle.image import preflight
    from kbundle.image.make import declared_channels

    ok, warn, fail = preflight.OK, preflight.WARN, preflight.ERROR
    found = [preflight.Finding(ok, "bundle", f"{opened.name}: CUDA {opened.cuda or 'none'}, base {opened.base_image}")]
    found += _image_findings(opened, client)
    if opened.cuda and not on_gpu:
        found.append(
            preflight.Finding(warn, "gpu", f"it uses CUDA {opened.cuda}, and gets no GPU here: it runs on CPU")
        )
    records = None
    if opened.lock_text:
        spec = envmod.EnvSpec(declared_channels(opened), tuple(opened.dependencies), opened.lock_text)
        records = envmod.resolve(spec).records
    needs = checks.estimate(records, preflight.image_size(client, opened.base_image) if client else None)
    try:
        checks.check_free(cache_root(), needs.cache, "kbundle's cache")
    except KbundleError as exc:
        return [*found, preflight.Finding(fail, "disk", str(exc))]
    if needs.download is None:
        return [*found, preflight.Finding(warn, "disk", f"cannot estimate the disk it needs: {needs.describe()}")]
    free = shutil.disk_usage(checks.existing_ancestor(cache_root())).free
    return [*found, preflight.Finding(ok, "disk", f"{needs.describe()}; {size(free)} free for the cache")]
