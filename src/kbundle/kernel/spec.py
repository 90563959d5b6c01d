"""kbundle's kernelspecs: a plain `argv` spec that starts `kbundle-kernel` by absolute path.

Public functions (the `run` command and `kbundle kernels list/remove` call these):

- `install_kernelspec(KernelRequest(...)) -> Path` writes `<user data dir>/kernels/<name>/kernel.json`
  atomically, with kbundle's logo beside it (data/logo/), and returns its directory. The user data dir is jupyter_core's
  (`JUPYTER_DATA_DIR` honoured).
- `list_kernelspecs() -> list[KernelRecord]`: the kbundle kernels Jupyter can see (every
  directory of `JUPYTER_PATH` and the data dirs), recognised by `metadata.kbundle`.
- `remove_kernelspec(name) -> Path`: removes one of kbundle's specs; refuses other kernels.
- `vscode_problems(spec) -> list[str]`: the rules VS Code applies to an argv kernelspec.

Why argv and no provisioner: VS Code starts kernels from `argv` only, and rewrites specs
whose argv looks like `python -m ipykernel...`. The launcher reads everything it needs
from its own argv, so the spec is self-contained.

A native kernel (`run --native`, `KernelRequest.native`) is a plain ipykernel of the prefix
kbundle installed on this machine: `<prefix>/bin/python -m ipykernel_launcher -f {connection_file}`,
with the environment's activation in the spec's `env` (image/native.py `activation`) and
`metadata.kbundle.native` naming the prefix.

A native Slurm kernel (`run --native --slurm`, both `native` and `slurm` set) starts the launcher
as a Slurm kernel does, with `--native PREFIX` instead of an image: the prefix is on a file
system the nodes share, and its activation travels as `--activate KEY=VALUE` arguments to the
node (the spec's own `env` would activate the launcher on the login node, srun included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kbundle.atomic import write_atomic
from kbundle.display import safe
from kbundle.errors import KbundleError, UsageError

LAUNCHER_SCRIPT = "kbundle-kernel"
DISPLAY_SUFFIX = " (kbundle)"
SLURM_SUFFIX = " (kbundle, Slurm)"
NATIVE_SUFFIX = " (kbundle, native)"
NATIVE_SLURM_SUFFIX = " (kbundle, Slurm, native)"
# Jupyter shows these from a kernelspec's directory (JupyterLab's launcher, Notebook's menu).
LOGO_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
NETWORKS = ("bridge", "host")
# jupyter_client accepts [a-z0-9._-] case-insensitively but looks names up in lower case;
# we accept lower case only so that the name in a notebook's metadata always matches.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class KernelRecord:
    """One installed kbundle kernel, as `kbundle kernels list` shows it."""

    name: str
    display_name: str
    resource_dir: Path
    image: str
    bundle_hash: str
    gpus: list[str] = field(default_factory=list)
    workdir: str = ""
    network: str = "bridge"
    argv: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    native: str = ""  # the prefix a native kernel runs (`run --native`); "" for a container's
    docker_host: str = ""  # the engine it was registered against (DOCKER_HOST then); "" for the default

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["resource_dir"] = str(self.resource_dir)
        return data


def launcher_path() -> Path:
    """The `kbundle-kernel` console script of this installation, as an absolute path.

    It sits next to the interpreter that runs kbundle (a venv's or pipx's bin dir); we do
    not resolve symlinks of sys.executable, since that would leave the venv.
    """
    names = [LAUNCHER_SCRIPT + ".exe", LAUNCHER_SCRIPT] if os.name == "nt" else [LAUNCHER_SCRIPT]
    bindir = Path(sys.executable).parent
    for candidate in names:
        path = bindir / candidate
        if path.is_file() and os.access(path, os.X_OK):
            return path.absolute()
    found = shutil.which(LAUNCHER_SCRIPT)
    if found:
        return Path(found).absolute()
    raise KbundleError(
        f"the {LAUNCHER_SCRIPT} launcher is missing from this installation "
        f"(looked in {bindir} and on PATH); reinstall kbundle, e.g. `pip install --force-reinstall kbundle`"
    )


def gpus_argument(gpus: list[str]) -> str:
    """The launcher's `--gpus` value: `none`, `all`, or comma-separated device ids."""
    gpus = [str(g).strip() for g in gpus if str(g).strip()]
    if not gpus or gpus == ["none"]:
        return "none"
    if "all" in gpus:
        return "all"
    for gpu in gpus:
        if "," in gpu or gpu.startswith("-"):
            raise UsageError(f"invalid GPU id {gpu!r}")
    return ",".join(gpus)


@dataclass(frozen=True)
class KernelRequest:
    """What a kernel kbundle registers runs: which image, where, on which GPUs."""

    name: str  # the kernelspec's name, e.g. kbundle-analysis
    display_name: str  # the bundle's name; shown as "<display_name> (kbundle)"
    image: str
    workdir: str
    gpus: list[str]  # [] for CPU, ["all"], or device ids/UUIDs such as ["0", "1"]
    bundle_hash: str
    extra_metadata: dict[str, Any] = field(default_factory=dict)  # more for metadata.kbundle
    network: str = "bridge"  # bridge: ports published on 127.0.0.1; host: opted in with `run --network host`
    slurm: Any = None  # kernel/slurm.py's SlurmOptions: the kernel runs on a compute node through srun
    native: Optional[str] = None  # `run --native`: the prefix on this machine the kernel runs (no image)
    env: dict[str, str] = field(default_factory=dict)  # native: the activation (image/native.py `activation`)
    # The engine the image lives on: DOCKER_HOST at registration (None: read it then, in
    # install_kernelspec). Recorded in the launcher's argv, so that a Jupyter started without the
    # variable (a desktop launcher, VS Code) still reaches that engine; "" for the default engine.
    docker_host: Optional[str] = None


def slurm_kernel_name(name: str) -> str:
    """A bundle's Slurm kernel sits beside its local one: `kbundle-x` and `kbundle-x-slurm`."""
    return name if name.endswith("-slurm") else f"{name}-slurm"


def build_spec(request: KernelRequest, launcher: Optional[Path] = None) -> dict[str, Any]:
    """The kernel.json content (pure: no file is touched)."""
    name, image, gpus, display_name = request.name, request.image, request.gpus, request.display_name
    check_name(name)
    if request.native is not None and request.slurm is not None:
        return _native_slurm_spec(request, launcher or launcher_path())
    if request.native is not None:
        return _native_spec(request)
    if not image:
        raise UsageError("a kernelspec needs an image")
    workdir = os.path.abspath(request.workdir)
    launcher = launcher or launcher_path()
    argv = [
        str(launcher),
        "--kernel-name",
        name,
        "--image",
        image,
        "--workdir",
        workdir,
        "--gpus",
        gpus_argument(gpus),
    ]
    if request.network not in NETWORKS:
        raise UsageError(f"invalid kernel network {request.network!r}: use bridge or host")
    if request.network == "host":
        argv += ["--network", "host"]
    if request.docker_host and request.slurm is None:  # a Slurm kernel's engine is the node's
        argv += ["--docker-host", request.docker_host]
    if request.slurm is not None:  # the GPUs are Slurm's to give (--gres): the launcher's --gpus is moot
        argv += [*request.slurm.argv(), "--content-hash", request.bundle_hash]
    argv += ["-f", "{connection_file}"]
    kb: dict[str, Any] = dict(request.extra_metadata)
    kb.update(image=image, bundle_hash=request.bundle_hash, gpus=list(gpus), workdir=workdir, network=request.network)
    suffix = DISPLAY_SUFFIX
    if request.docker_host and request.slurm is None:
        kb["docker_host"] = request.docker_host
    if request.slurm is not None:
        kb["slurm"] = dataclasses.asdict(request.slurm)
        suffix = SLURM_SUFFIX
    return _spec(argv, display_name, suffix, kb)


def _native_spec(request: KernelRequest) -> dict[str, Any]:
    """A plain ipykernel of the native prefix, activated through the spec's `env` (pure)."""
    prefix, workdir, kb = _native_metadata(request)
    argv = [os.path.join(prefix, "bin", "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return _spec(argv, request.display_name, NATIVE_SUFFIX, kb, request.env)


def _native_slurm_spec(request: KernelRequest, launcher: Path) -> dict[str, Any]:
    """The launcher on the login node, running the prefix's ipykernel on a Slurm node (pure).
    The activation travels in argv, not `env`: the launcher and srun here stay unactivated."""
    prefix, workdir, kb = _native_metadata(request)
    argv = [str(launcher), "--kernel-name", request.name, "--native", prefix, "--workdir", workdir]
    for key, value in sorted(request.env.items()):
        argv.append(f"--activate={key}={value}")
    argv += [*request.slurm.argv(), "--content-hash", request.bundle_hash, "-f", "{connection_file}"]
    kb["slurm"] = dataclasses.asdict(request.slurm)
    return _spec(argv, request.display_name, NATIVE_SLURM_SUFFIX, kb)


def _native_metadata(request: KernelRequest) -> tuple[str, str, dict[str, Any]]:
    """(the absolute prefix, the absolute workdir, kbundle's metadata) of a native kernel."""
    prefix = request.native or ""
    if not os.path.isabs(prefix):
        raise UsageError(f"a native kernel needs an absolute prefix, not {prefix!r}")
    workdir = os.path.abspath(request.workdir)
    kb: dict[str, Any] = dict(request.extra_metadata)
    kb.update(native=prefix, bundle_hash=request.bundle_hash, gpus=list(request.gpus), workdir=workdir)
    return prefix, workdir, kb


def _spec(argv: list[str], display_name: str, suffix: str, kb: dict[str, Any], env=None) -> dict[str, Any]:
    """kernel.json: the display name (made safe: a bundle's name, which Jupyter and VS Code show
    as is) with its kind's suffix once, the banner's variables, then `env`."""
    shown = safe(display_name)
    shown = shown if shown.endswith(suffix) else shown + suffix
    environment = banner_env(shown.removesuffix(suffix), kb.get("cuda"))
    environment.update(env or {})
    return {
        "argv": argv,
        "display_name": shown,
        "language": "python",
        "interrupt_mode": "signal",
        "env": environment,
        "metadata": {"kbundle": kb},
    }


def banner_env(bundle: str, cuda: Any) -> dict[str, str]:
    """What the kernel's banner names beyond the image: the launcher gets it from Jupyter's
    environment (its argv stays what the container needs) and hands it to the shim."""
    return {"KBUNDLE_BUNDLE": bundle, "KBUNDLE_CUDA": str(cuda or "none")}


def kernel_name_for(bundle_name: str) -> str:
    """The kernel a bundle registers: `kbundle-<slug of its name>`."""
    from kbundle.names import slug

    return f"kbundle-{slug(bundle_name)}"


def claim_name(
    name: str, bundle_hash: str, existing: Optional[KernelRecord], replace: bool, taken: set[str]
) -> Optional[str]:
    """May a bundle register kernel `name`? (pure) None: yes; a message: yes, replacing another
    bundle's kernel (--replace), which the caller shows as a warning.

    Like `conda create -n`, an existing name from *another* bundle (content hash) is refused
    with advice; the same bundle again is no collision. `taken`: the kernel names in use, so
    that the advice names a free one."""
    if existing is None or existing.bundle_hash == bundle_hash:
        return None
    runs = existing.image or (f"native prefix {existing.native}" if existing.native else "")
    other = f"another bundle ({safe(runs) or 'unknown image'})"
    if replace:
        return f"replaced kernel {name}, which ran {other}"
    raise KbundleError(
        f"a kernel named {name} already runs {other}; register this bundle beside it with "
        f"`--name {suggest_name(name, taken)}`, or replace it with `--replace`"
    )


def suggest_name(kernel_name: str, taken: set[str]) -> str:
    """The `--name` for a free kernel beside `kernel_name`: `analysis-2`, `analysis-3`, … (pure)."""
    base = kernel_name.removeprefix("kbundle-")
    n = 2
    while kernel_name_for(f"{base}-{n}") in taken:
        n += 1
    return f"{base}-{n}"


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise UsageError(f"invalid kernel name {name!r}: use lower-case letters, digits, '.', '_' and '-'")


def _kernel_folders() -> dict[str, Path]:
    """Every kernelspec in Jupyter's kernel folders (jupyter_core's search path, the user's first),
    by name: the first found wins, as jupyter_client's KernelSpecManager finds them. Read here
    rather than through jupyter_client, whose package imports zmq and its asyncio clients (about
    50 ms of every run); kbundle only ever installs to and lists from these folders."""
    from jupyter_core.paths import jupyter_path

    found: dict[str, Path] = {}
    for folder in jupyter_path("kernels"):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            name = entry.name.lower()
            if name not in found and _NAME.match(name) and os.path.isfile(os.path.join(entry.path, "kernel.json")):
                found[name] = Path(entry.path)
    return found


def user_kernels_dir() -> Path:
    """`<jupyter data dir>/kernels`, the directory `jupyter kernelspec install --user` uses
    (KernelSpecManager's own default, read from jupyter_core without importing jupyter_client)."""
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "kernels"


def install_kernelspec(request: KernelRequest) -> Path:
    """Install (or replace) kbundle's kernelspec `name` for the current user; return its directory.

    Replacing is allowed only for a spec kbundle installed: a user's own kernel of the same
    name is never overwritten.
    """
    if request.docker_host is None and request.native is None and request.slurm is None:
        request = dataclasses.replace(request, docker_host=os.environ.get("DOCKER_HOST", ""))
    spec = build_spec(request)
    name = request.name
    target = user_kernels_dir() / name
    existing = target / "kernel.json"
    if existing.exists() and not _is_kbundle(_read_json(existing)):
        raise KbundleError(
            f"a kernel named {name!r} that kbundle did not install exists at {target}; remove it or pick another name"
        )
    target.mkdir(parents=True, exist_ok=True)
    _copy_logo(target)
    write_atomic(existing, json.dumps(spec, indent=1) + "\n")
    return target


def _copy_logo(target: Path) -> None:
    from kbundle.resources import data_dir

    for name in LOGO_FILES:
        shutil.copyfile(data_dir() / "logo" / name, target / name)


def list_kernelspecs() -> list[KernelRecord]:
    """kbundle's kernels among all the kernelspecs Jupyter finds, sorted by name."""
    records = []
    for name, path in sorted(_kernel_folders().items()):
        data = _read_json(Path(path) / "kernel.json")
        if _is_kbundle(data):
            records.append(_record(name, Path(path), data))
    return records


def get_kernelspec(name: str) -> KernelRecord:
    for record in list_kernelspecs():
        if record.name == name:
            return record
    raise KbundleError(f"no kbundle kernel named {name!r} (see `kbundle kernels list`)")


def find_kernel(ref: str) -> KernelRecord:
    """The kernel `ref` names: its name, the name without `kbundle-`, or a .kbundle file it came from."""
    records = {r.name: r for r in list_kernelspecs()}
    for name in (ref, f"kbundle-{ref}"):
        if name in records:
            return records[name]
    if ref.endswith(".kbundle") or os.path.isfile(ref):
        return _kernel_of_bundle(Path(ref), records)
    raise KbundleError(f"no kbundle kernel named {ref!r} (see `kbundle kernels list`)")


def _kernel_of_bundle(path: Path, records: dict[str, KernelRecord]) -> KernelRecord:
    # `kbundle run` records the bundle's path; a bundle moved or copied since is recognised by
    # its content hash (whatever name `run --name` gave its kernel).
    resolved = str(path.resolve())
    for record in records.values():
        if record.metadata.get("bundle") == resolved:
            return record
    if not path.is_file():
        raise UsageError(f"no bundle at {path}, and no kbundle kernel came from there")
    from kbundle.bundle.reader import open_bundle

    opened = open_bundle(path)
    found = [r for r in records.values() if r.bundle_hash == opened.identity]
    # Kernels registered before bundles had an identity recorded the content hash.
    found = found or [r for r in records.values() if r.bundle_hash == opened.content_hash]
    if len(found) != 1:
        which = f"kernels {', '.join(r.name for r in found)}; name one" if found else "no kernel here"
        raise KbundleError(f"{path.name} has {which} (see `kbundle kernels list`)")
    return found[0]


def remove_kernelspec(name: str) -> Path:
    """Remove kbundle's kernel `name`; return the directory that was removed."""
    record = get_kernelspec(name)
    if not os.access(record.resource_dir.parent, os.W_OK):
        raise KbundleError(f"cannot remove {record.resource_dir}: no write permission")
    shutil.rmtree(record.resource_dir)
    return record.resource_dir


def vscode_problems(spec: dict[str, Any]) -> list[str]:
    """Why VS Code would hide or rewrite this argv kernelspec (empty when it is fine)."""
    problems = []
    argv = spec.get("argv") or []
    if not argv:
        return ["argv is empty"]
    first = argv[0]
    if not os.path.isabs(first):
        problems.append(f"argv[0] {first!r} is not an absolute path")
    elif not os.path.isfile(first) or not os.access(first, os.X_OK):
        problems.append(f"argv[0] {first!r} is not an existing executable")
    if not any("{connection_file}" in a for a in argv):
        problems.append("argv has no {connection_file}")
    base = os.path.basename(first).lower()
    if base.startswith("python") and ("-m" in argv and any(a.startswith("ipykernel") for a in argv)):
        problems.append("argv is `python -m ipykernel...`, which VS Code replaces with its own interpreter")
    if spec.get("metadata", {}).get("kernel_provisioner"):
        problems.append("a kernel provisioner is set; VS Code only runs argv")
    if not spec.get("language"):
        problems.append("language is missing")
    return problems


def _record(name: str, path: Path, data: dict[str, Any]) -> KernelRecord:
    kb = data["metadata"]["kbundle"]
    return KernelRecord(
        name=name,
        display_name=str(data.get("display_name", name)),
        resource_dir=path,
        image=str(kb.get("image", "")),
        bundle_hash=str(kb.get("bundle_hash", "")),
        gpus=[str(g) for g in kb.get("gpus") or []],
        workdir=str(kb.get("workdir", "")),
        # a native kernel is a process of this machine: it shares its network
        network="host" if kb.get("native") or "host" in _network_args(data.get("argv") or []) else "bridge",
        argv=list(data.get("argv") or []),
        metadata=dict(kb),
        native=str(kb.get("native") or ""),
        docker_host=str(kb.get("docker_host") or ""),
    )


def _network_args(argv: list) -> list[str]:
    """The launcher's --network value(s) in a spec's argv: what the kernel really gets."""
    return [str(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--network"]


def _is_kbundle(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("metadata", {}).get("kbundle"), dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
