"""Preflight: can this host build the image and give the kernel its GPUs?

Two halves. `probe_*` functions read the world (Docker engine, NVML) into typed facts;
`evaluate` turns facts plus the environment's CUDA plus the `--gpus` request into
findings and a GPU plan. `evaluate` is pure, so the decision table is unit-tested by data.
`evaluate_native` is the same for `run --native`: no engine, no passthrough, the GPUs
straight from NVML, and the same driver and architecture checks.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from kbundle import contract
from kbundle.errors import MachineError, UsageError, first_line
from kbundle.facts import CompatTables, Version, load_tables
from kbundle.image.engine import docker_host, is_podman

OK, WARN, ERROR = "ok", "warn", "error"

# Added to "no engine answers" by `run` and `doctor`: --native is never chosen silently.
NATIVE_HINT = (
    "without a container engine, `kbundle run BUNDLE --native` installs the environment on this machine "
    'instead, where the bundle\'s code runs as you, outside any container (docs/usage.md, "No Docker?")'
)
NATIVE_ENGINE = "none: --native runs the kernel on this machine, outside any container"

# Where NVIDIA's container toolkit writes CDI specs (nvidia-ctk cdi generate), and Podman reads them.
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
CDI_KIND = "nvidia.com/gpu"
CDI_GENERATE = "sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
# Docker (19.03+) offers `--gpus` when this hook is on the daemon's PATH.
NVIDIA_HOOKS = ("nvidia-container-runtime-hook", "nvidia-container-toolkit")
# The capabilities of every GPU request kbundle sends (the kernel's and the probe's). Docker's
# nvidia driver turns those NVIDIA knows into NVIDIA_DRIVER_CAPABILITIES: with `gpu` alone the
# container gets the driver's default, and a base without NVIDIA's ENV (not nvidia/cuda) may get
# `utility` only, i.e. nvidia-smi without CUDA. compute (CUDA) and utility (NVML) are what a
# notebook needs; graphics and video are not asked for.
GPU_CAPABILITIES = ("gpu", "compute", "utility")


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | error
    topic: str  # docker | nvml | driver | gpu | runtime
    message: str


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    capability: str  # "8.6"


@dataclass(frozen=True)
class NvmlFacts:
    available: bool
    reason: str = ""  # why NVML could not be read
    driver_version: Optional[str] = None
    driver_cuda: Optional[str] = None  # highest CUDA the driver supports, e.g. "12.2"
    gpus: tuple[GpuInfo, ...] = ()


@dataclass(frozen=True)
class EngineFacts:
    reachable: bool
    host: str
    version: Optional[str] = None
    runtimes: tuple[str, ...] = ()
    cdi_nvidia: bool = False
    nvidia_hook: bool = False
    local: bool = True  # unix socket: host-side checks speak for the daemon
    error: Optional[str] = None  # why the daemon cannot be used (reachable=False)
    # A throwaway container started with GPUs: None when not tried; else whether it started.
    gpu_probe: Optional[bool] = None
    gpu_probe_error: Optional[str] = None
    # Podman, through its Docker-compatible API: it drops Docker's GPU requests without a word and
    # passes GPUs only by CDI name (kernel/podman.py), so only a CDI spec counts, never a probe.
    podman: bool = False

    @property
    def static_gpu_support(self) -> bool:
        if self.podman:
            return self.cdi_nvidia
        return "nvidia" in self.runtimes or self.cdi_nvidia or self.nvidia_hook

    @property
    def advice(self) -> str:
        """What makes this engine pass GPUs."""
        if self.podman:
            return f"make NVIDIA's CDI spec for Podman ({CDI_GENERATE})"
        return "install the NVIDIA Container Toolkit"

    @property
    def gpu_capable(self) -> bool:
        return self.gpu_probe if self.gpu_probe is not None else self.static_gpu_support

    def describe_gpu_support(self) -> str:
        if self.podman:
            if self.cdi_nvidia:
                return "Podman can pass GPUs through (NVIDIA CDI spec: nvidia.com/gpu)"
            return (
                f"Podman has no NVIDIA CDI spec in {' or '.join(CDI_DIRS)} (its Docker-compatible API "
                "drops Docker's GPU requests)"
            )
        if self.gpu_capable:
            how = [
                n
                for n, on in (
                    ("nvidia runtime", "nvidia" in self.runtimes),
                    ("CDI", self.cdi_nvidia),
                    ("nvidia-container-toolkit hook", self.nvidia_hook),
                    ("a test container got GPUs", bool(self.gpu_probe)),
                )
                if on
            ]
            return "the Docker engine can pass GPUs through (" + ", ".join(how) + ")"
        runtimes = ", ".join(self.runtimes) or "none"
        said = f"; the engine says: {self.gpu_probe_error}" if self.gpu_probe_error else ""
        return (
            f"the Docker engine has no NVIDIA runtime (runtimes: {runtimes}; no NVIDIA CDI spec, "
            f"no nvidia-container-toolkit{said})"
        )


@dataclass(frozen=True)
class GpuRequest:
    mode: str  # auto | all | none | count | devices
    count: Optional[int] = None
    devices: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> GpuRequest:
        value = (text or "auto").strip()
        if value in ("auto", "all", "none"):
            return cls(value)
        if value.isdigit():
            return cls("none") if int(value) == 0 else cls("count", count=int(value))
        if value.startswith("device="):
            ids = tuple(p.strip() for p in value[len("device=") :].split(",") if p.strip())
            if ids:
                return cls("devices", devices=ids)
        raise UsageError(f"--gpus {value!r}: use auto, all, none, a count (e.g. 2) or device=0,1")

    def __str__(self) -> str:
        return {"count": str(self.count), "devices": "device=" + ",".join(self.devices)}.get(self.mode, self.mode)


@dataclass(frozen=True)
class GpuPlan:
    """What the kernel container gets: `gpus` is empty for CPU, else device ids (or "all")."""

    gpus: tuple[str, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)


@dataclass
class Report:
    engine: EngineFacts
    nvml: NvmlFacts
    cuda: Optional[str]
    request: GpuRequest
    plan: GpuPlan
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == WARN]

    def raise_for_errors(self) -> None:
        if self.errors:
            raise MachineError("; ".join(f.message for f in self.errors))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "docker": asdict(self.engine) | {"gpu_capable": self.engine.gpu_capable},
            "nvml": asdict(self.nvml),
            "cuda": self.cuda,
            "gpus_requested": str(self.request),
            "gpus": list(self.plan.gpus),
            "findings": [asdict(f) for f in self.findings],
        }


# ---------------------------------------------------------------- pure decisions


def check_driver(nvml: NvmlFacts, cuda: str, tables: CompatTables) -> Finding:
    """Refuse a driver too old for the environment's CUDA; warn on minor-version compatibility."""
    driver = nvml.driver_version
    need = tables.min_driver(cuda)
    if need is None:
        return Finding(WARN, "driver", f"kbundle's table does not know CUDA {cuda} yet; driver {driver} may be too old")
    _, minimum = need
    have = Version.parse(driver)
    if have >= minimum:
        return Finding(OK, "driver", f"NVIDIA driver {driver} supports CUDA {cuda} (needs >= {minimum})")
    compat = tables.minor_compat.get(Version.parse(cuda).major)
    if compat and have >= compat:
        return Finding(
            WARN,
            "driver",
            f"NVIDIA driver {driver} runs CUDA {cuda} only through minor-version compatibility "
            f"(no PTX JIT); upgrade the driver to >= {minimum} for full support",
        )
    supports = nvml.driver_cuda or str(tables.highest_cuda_for_driver(have) or "none")
    return Finding(
        ERROR,
        "driver",
        f"NVIDIA driver {driver} is too old for this environment's CUDA {cuda} "
        f"(it supports CUDA up to {supports}; CUDA {cuda} needs >= {minimum}): upgrade the driver, "
        f"or pass --gpus none to run on CPU",
    )


def check_arch(gpu: GpuInfo, cuda: str, tables: CompatTables) -> Finding:
    """Warn when the GPU is newer than the env's CUDA compiles for, or older than it still supports."""
    label = f"GPU {gpu.index} ({gpu.name}, sm_{gpu.capability.replace('.', '')})"
    arch = tables.arch(gpu.capability)
    have = Version.parse(cuda).major_minor
    if arch is None:
        return Finding(WARN, "gpu", f"{label}: kbundle's table does not know compute capability {gpu.capability}")
    if have < arch.first:
        return Finding(
            WARN,
            "gpu",
            f"{label} is newer than CUDA {cuda} supports natively (first: CUDA {arch.first}): "
            f"code runs only through PTX JIT, slow to start or failing",
        )
    if arch.last is not None and have > arch.last:
        return Finding(
            WARN,
            "gpu",
            f"{label} is no longer supported by CUDA {cuda} (last: CUDA {arch.last}): "
            f"frameworks built with it will not use this GPU",
        )
    return Finding(OK, "gpu", f"{label} is supported natively by CUDA {cuda}")


def plan_gpus(request: GpuRequest, engine: EngineFacts, nvml: NvmlFacts) -> tuple[GpuPlan, list[Finding]]:
    """Decide which GPUs the kernel gets. Never a silent CPU fallback: auto says so in a warning."""
    if request.mode == "none":
        return GpuPlan(), [Finding(OK, "runtime", "GPUs off (--gpus none): the kernel runs on CPU")]
    visible = [str(g.index) for g in nvml.gpus]
    if request.mode == "auto":
        if not nvml.gpus and not (nvml.reason and _device_nodes()):
            why = nvml.reason or "NVML reports no GPU"
            return GpuPlan(), [Finding(WARN, "runtime", f"no NVIDIA GPU found ({why}): the kernel runs on CPU")]
        if not engine.gpu_capable:
            return GpuPlan(), [
                Finding(
                    WARN,
                    "runtime",
                    f"GPUs found but {engine.describe_gpu_support()}: the kernel runs on CPU; "
                    f"{engine.advice} to use them",
                )
            ]
        gpus = tuple(visible) or ("all",)
        return GpuPlan(gpus), [Finding(OK, "runtime", f"the kernel gets GPUs {', '.join(gpus)}")]
    if not engine.gpu_capable:
        return GpuPlan(), [
            Finding(
                ERROR,
                "runtime",
                f"--gpus {request} needs GPU passthrough but {engine.describe_gpu_support()}: "
                f"{engine.advice}, or pass --gpus none to run on CPU",
            )
        ]
    if request.mode == "all":
        gpus = tuple(visible) or ("all",)
        return GpuPlan(gpus), [Finding(OK, "runtime", f"the kernel gets GPUs {', '.join(gpus)}")]
    return _counted_or_named(request, nvml, visible, "this host", "gets")


def _counted_or_named(request: GpuRequest, nvml, visible: list[str], place: str, verb: str):
    """`--gpus N` or `--gpus device=…`, checked against the GPUs NVML lists (when it can be read):
    the plan and its finding, in the words of the container (`gets`) or native (`sees`) kernel."""
    if request.mode == "count":
        if nvml.available and request.count > len(visible):
            return GpuPlan(), [Finding(ERROR, "runtime", f"--gpus {request.count}: {place} has {len(visible)} GPU(s)")]
        gpus = tuple(visible[: request.count]) if visible else tuple(str(i) for i in range(request.count))
        return GpuPlan(gpus), [Finding(OK, "runtime", f"the kernel {verb} GPUs {', '.join(gpus)}")]
    known = set(visible) | {g.uuid for g in nvml.gpus}
    missing = [d for d in request.devices if nvml.available and d not in known]
    if missing:
        have = ", ".join(visible) or "none"
        return GpuPlan(), [
            Finding(ERROR, "runtime", f"--gpus {request}: no GPU {', '.join(missing)} on {place} (GPUs: {have})")
        ]
    return GpuPlan(request.devices), [Finding(OK, "runtime", f"the kernel {verb} GPUs {', '.join(request.devices)}")]


def evaluate(
    engine: EngineFacts,
    nvml: NvmlFacts,
    cuda: Optional[str],
    request: GpuRequest,
    tables: Optional[CompatTables] = None,
) -> Report:
    tables = tables or load_tables()
    if not engine.reachable:
        findings = [Finding(ERROR, "docker", engine.error or f"cannot reach the Docker daemon at {engine.host}")]
        findings += _nvml_findings(nvml)
        # No engine, no passthrough: still say whether this machine's driver and GPUs fit the
        # environment's CUDA (a GPU machine without Docker yet, `kbundle doctor BUNDLE`).
        every = GpuPlan(tuple(str(g.index) for g in nvml.gpus))
        findings += _cuda_findings(every, nvml, cuda, tables)
        return Report(engine, nvml, cuda, request, GpuPlan(), findings)
    findings = [Finding(OK, "docker", f"Docker engine {engine.version} at {engine.host}")]
    findings += _nvml_findings(nvml)
    findings.append(Finding(OK if engine.gpu_capable else WARN, "engine", engine.describe_gpu_support()))
    plan, gpu_findings = plan_gpus(request, engine, nvml)
    findings += gpu_findings
    findings += _cuda_findings(plan, nvml, cuda, tables)
    if plan.on_gpu and not cuda:
        findings.append(Finding(WARN, "driver", "this environment has no CUDA: the GPUs are passed through unused"))
    return Report(engine, nvml, cuda, request, plan, findings)


def plan_native_gpus(request: GpuRequest, nvml: NvmlFacts) -> tuple[GpuPlan, list[Finding]]:
    """`run --native`: which GPUs the kernel sees, straight from the driver (no passthrough).
    Never a silent CPU: auto says so in a warning; a GPU asked for and absent is an error."""
    if request.mode == "none":
        return GpuPlan(), [Finding(OK, "runtime", "GPUs off (--gpus none): the kernel runs on CPU")]
    visible = [str(g.index) for g in nvml.gpus]
    unread = not nvml.available and _device_nodes()  # a driver here, but NVML cannot be read
    if not visible and not unread:
        why = nvml.reason or "NVML reports no GPU"
        if request.mode == "auto":
            return GpuPlan(), [Finding(WARN, "runtime", f"no NVIDIA GPU found ({why}): the kernel runs on CPU")]
        return GpuPlan(), [
            Finding(ERROR, "runtime", f"--gpus {request}: no NVIDIA GPU found ({why}); pass --gpus none to run on CPU")
        ]
    if request.mode in ("auto", "all"):
        gpus = tuple(visible) or ("all",)
        level = OK if visible else WARN
        said = f"the kernel sees GPUs {', '.join(gpus)}, straight from the driver"
        if not visible:
            said = f"the kernel sees this machine's GPUs, unchecked ({nvml.reason})"
        return GpuPlan(gpus), [Finding(level, "runtime", said)]
    return _counted_or_named(request, nvml, visible, "this machine", "sees")


def _cuda_findings(plan: GpuPlan, nvml, cuda, tables) -> list[Finding]:
    """The driver against the environment's CUDA, and each chosen GPU's architecture against the
    CUDA build, for a kernel on GPUs (container or native alike); a warning when NVML cannot say."""
    if not (plan.on_gpu and cuda):
        return []
    if not nvml.driver_version:
        why = nvml.reason or "NVML gave no driver version"
        return [Finding(WARN, "driver", f"cannot check the NVIDIA driver against CUDA {cuda}: {why}")]
    chosen = [g for g in nvml.gpus if str(g.index) in plan.gpus or g.uuid in plan.gpus or "all" in plan.gpus]
    return [check_driver(nvml, cuda, tables)] + [check_arch(g, cuda, tables) for g in (chosen or nvml.gpus)]


def visible_devices(request: GpuRequest, plan: GpuPlan) -> Optional[str]:
    """`CUDA_VISIBLE_DEVICES` for a native kernel: None leaves the machine's GPUs as they are (pure)."""
    if not plan.on_gpu:
        return "-1" if request.mode == "none" else None
    if request.mode in ("count", "devices"):
        return ",".join(plan.gpus)
    return None


def evaluate_native(
    nvml: NvmlFacts, cuda: Optional[str], request: GpuRequest, tables: Optional[CompatTables] = None
) -> Report:
    """`run --native`: the same findings as `evaluate`, read straight from NVML: the driver against
    the environment's CUDA, each GPU's architecture against the CUDA build (pure)."""
    tables = tables or load_tables()
    engine = EngineFacts(False, NATIVE_ENGINE)
    findings = [Finding(OK, "native", "no container: the kernel runs on this machine, as you")]
    findings += _nvml_findings(nvml)
    plan, gpu_findings = plan_native_gpus(request, nvml)
    findings += gpu_findings
    findings += _cuda_findings(plan, nvml, cuda, tables)
    return Report(engine, nvml, cuda, request, plan, findings)


def _nvml_findings(nvml: NvmlFacts) -> list[Finding]:
    if not nvml.available:
        return []
    return [
        Finding(OK, "nvml", f"NVIDIA driver {nvml.driver_version} (CUDA {nvml.driver_cuda}), {len(nvml.gpus)} GPU(s)")
    ]


# ---------------------------------------------------------------- probes (impure)


def _device_nodes() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def _has_nvidia_cdi(dirs=CDI_DIRS) -> bool:
    """Whether a CDI spec in `dirs` offers NVIDIA GPUs: named so (nvidia-ctk's nvidia.yaml), or of
    kind nvidia.com/gpu whatever its name."""
    for d in dirs:
        try:
            for p in Path(d).iterdir():
                if "nvidia" in p.name or _spec_kind_is_nvidia(p):
                    return True
        except OSError:
            continue
    return False


def _spec_kind_is_nvidia(path: Path) -> bool:
    if path.suffix not in (".yaml", ".yml", ".json"):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return CDI_KIND in fh.read(1 << 20)
    except OSError:
        return False


def probe_engine(client) -> EngineFacts:
    info = client.info()
    host = docker_host()
    local = host.startswith("unix://")
    podman = is_podman(client)
    # CDI counts only for an engine that reads it: Podman (from CDI_DIRS, on this machine when its
    # socket is local), or a Docker that lists its CDISpecDirs (25+); Docker 20.10 ignores /etc/cdi.
    cdi_dirs = (CDI_DIRS if podman else tuple(info.get("CDISpecDirs") or ())) if local else ()
    return EngineFacts(
        reachable=True,
        host=host,
        version=info.get("ServerVersion"),
        runtimes=tuple(sorted((info.get("Runtimes") or {}).keys())),
        podman=podman,
        cdi_nvidia=_has_nvidia_cdi(cdi_dirs) if cdi_dirs else False,
        nvidia_hook=local
        and any(shutil.which(h, path=os.environ.get("PATH", "") + ":/usr/bin:/usr/local/bin") for h in NVIDIA_HOOKS),
        local=local,
    )


def probe_nvml() -> NvmlFacts:
    """Driver, its CUDA and each GPU's compute capability; `available=False` with a reason otherwise."""
    try:
        import pynvml  # from nvidia-ml-py, the optional `gpu` extra
    except ImportError:
        return NvmlFacts(
            False,
            "nvidia-ml-py is not installed; `pip install 'kbundle[gpu]'` lets kbundle read GPUs"
            + (", and /dev/nvidia* exists" if _device_nodes() else ""),
        )
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return NvmlFacts(False, f"NVML unavailable: {exc}")
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        raw = pynvml.nvmlSystemGetCudaDriverVersion()
        driver_cuda = f"{raw // 1000}.{(raw % 1000) // 10}"
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(
                GpuInfo(i, _text(pynvml.nvmlDeviceGetName(h)), _text(pynvml.nvmlDeviceGetUUID(h)), f"{major}.{minor}")
            )
        return NvmlFacts(True, "", driver, driver_cuda, tuple(gpus))
    except Exception as exc:
        return NvmlFacts(False, f"NVML error: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_gpu_run(client, image: str) -> Optional[str]:
    """Start a throwaway container from `image` with all GPUs: None if it started, else the engine's words."""
    import docker

    from kbundle.image import policy

    request = docker.types.DeviceRequest(count=-1, capabilities=[list(GPU_CAPABILITIES)])
    try:  # the bundle's base image: locked down like every container kbundle starts (image/policy.py)
        container = client.containers.create(
            image,
            entrypoint=["true"],
            device_requests=[request],
            labels={contract.LABEL_PROBE: "1"},
            user=policy.invoker().user,
            **policy.SANDBOX.sdk_options(),
        )
    except docker.errors.APIError as exc:
        return first_line(exc.explanation or exc)
    try:
        container.start()
        container.wait(timeout=60)
        return None
    except docker.errors.APIError as exc:
        return first_line(exc.explanation or exc)
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass


def should_probe(engine: EngineFacts, nvml: NvmlFacts, request: GpuRequest) -> bool:
    """Ask the engine itself only when the host-side checks say no and GPUs may be wanted. Never
    Podman: its Docker-compatible API starts a GPU request's container without the GPUs."""
    if engine.static_gpu_support or request.mode == "none" or engine.podman:
        return False
    return request.mode != "auto" or bool(nvml.gpus) or not engine.local


def local_image(client, image: Optional[str]) -> bool:
    import docker

    if not image:
        return False
    try:
        client.images.get(image)
        return True
    except docker.errors.DockerException:
        return False


def image_size(client, image: str) -> Optional[int]:
    """The size of a local image in bytes, or None."""
    import docker

    try:
        return int(client.images.get(image).attrs.get("Size") or 0) or None
    except (docker.errors.DockerException, ValueError, TypeError):
        return None


def run_preflight(
    client, cuda: Optional[str], request: GpuRequest, probe_image: Optional[str] = None, ask_engine: bool = False
) -> Report:
    """The facts, plus the engine's own answer when the static checks cannot decide (needs a local image).

    `ask_engine` (doctor): ask it whenever the host-side checks say no, GPUs wanted or not. Those
    checks read this machine (its PATH, /etc/cdi), while the engine named by DOCKER_HOST may be
    another dockerd with its own PATH: only a container started with a GPU request can tell."""
    engine, nvml = probe_engine(client), probe_nvml()
    wanted = should_probe(engine, nvml, request) or (ask_engine and not (engine.static_gpu_support or engine.podman))
    if wanted and local_image(client, probe_image):
        error = probe_gpu_run(client, probe_image)
        engine = replace(engine, gpu_probe=error is None, gpu_probe_error=error)
    return evaluate(engine, nvml, cuda, request)
