"""GPU kernels on Podman, through its Docker-compatible socket, with the world's STAND-IN CDI spec.

Podman 4.x's Docker-compatible API drops a Docker GPU request without a word; it passes GPUs
only by CDI name. kbundle's launcher therefore creates a GPU kernel's container through
Podman's own API (kernel/podman.py) with `nvidia.com/gpu=…` devices, which Podman resolves
from the world's stand-in spec (/var/run/cdi/kbundle-world-standin.yaml: stand-in nodes
/dev/nvidia0, /dev/nvidia1 and NVIDIA_VISIBLE_DEVICES, as NVIDIA's generated spec gives).
It proves the requests and Podman's plumbing, not CUDA.

Rootful Podman only (the world's service runs as root); the kernels run the world's env image,
copied into Podman, registered while DOCKER_HOST names Podman's socket and started by a process
without it. What Podman decides without a spec is table-tested at the end (the stand-in spec is
in a directory every rootful Podman of this machine reads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import world as world_module
from helpers import banner_and_printed, environ, pack_world_bundle, run_kbundle
from kbundle.image import preflight
from kbundle.kernel import podman
from kbundle.kernel.spec import KernelRequest, install_kernelspec

# What the kernel sees: its GPUs, and the lockdown (image/policy.py) that libpod's create must keep.
PROBE = (
    "import glob, json, os\n"
    "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
    "try:\n    open('/kbundle-probe', 'w'); root_rw = True\nexcept OSError:\n    root_rw = False\n"
    "print(json.dumps({'devices': sorted(glob.glob('/dev/nvidia[0-9]*')), "
    "'visible': os.environ.get('NVIDIA_VISIBLE_DEVICES'), 'uid': os.getuid(), 'root_rw': root_rw, "
    "'nnp': status['NoNewPrivs'].strip(), 'caps': status['CapEff'].strip()}))"
)


@pytest.fixture(scope="module")
def on_podman(world, env_image):
    """(Podman's socket, the env image there, a Jupyter data dir and a workdir under /tmp)."""
    if "podman_host" not in world:
        pytest.skip(f"the world has no Podman socket: {world.get('podman_error', 'unknown')}")
    world_module.copy_image(Path(world["world_dir"]), env_image)
    data = Path(tempfile.mkdtemp(prefix="kbundle-test-podman-"))
    work = Path(tempfile.mkdtemp(prefix="kbundle-test-podman-work-"))
    yield world["podman_host"], env_image, data, work
    subprocess.run(["rm", "-rf", str(data), str(work)])


def start(data: Path, kernel: str) -> tuple[str, dict]:
    """The kernel started by jupyter_client from a process without DOCKER_HOST: (banner's last line, PROBE)."""
    cache = str(data / "cache")
    with environ(JUPYTER_DATA_DIR=str(data), JUPYTER_PATH=str(data), KBUNDLE_CACHE_DIR=cache, DOCKER_HOST=None):
        banner, printed = banner_and_printed(kernel, PROBE)
    return banner.strip().splitlines()[-1], json.loads(printed)


def register(host: str, image: str, data: Path, work: Path, name: str, gpus: list[str]) -> None:
    with environ(JUPYTER_DATA_DIR=str(data), DOCKER_HOST=host):  # as `kbundle run` with DOCKER_HOST set
        install_kernelspec(KernelRequest(name, name, image, str(work), gpus, "h"))


@pytest.mark.parametrize(
    ("gpus", "nodes", "visible"),
    [
        (["all"], ["/dev/nvidia0", "/dev/nvidia1"], "all"),
        (["1"], ["/dev/nvidia1"], "1"),
        (["0", "1"], ["/dev/nvidia0", "/dev/nvidia1"], None),  # two CDI devices: each sets its own index
        ([], [], None),
    ],
)
def test_a_gpu_kernel_on_podman_gets_its_cdi_devices(on_podman, gpus, nodes, visible):
    host, image, data, work = on_podman
    name = "kbundle-pod-" + ("-".join(gpus) or "cpu")
    register(host, image, data, work, name, gpus)
    banner, seen = start(data, name)
    # The lockdown holds on either path (libpod's create for GPUs, Docker's API without).
    assert seen["uid"] != 0 and seen["nnp"] == "1" and int(seen["caps"], 16) == 0 and not seen["root_rw"], seen
    assert seen["devices"] == nodes
    if visible is not None:
        assert seen["visible"] == visible
    if nodes:
        assert seen["visible"] in ("0", "1", "all")  # Podman injected the spec's environment
        assert banner.endswith(f"| GPU visible: {len(nodes)} ({', '.join(Path(n).name for n in nodes)})"), banner
    else:
        assert seen["visible"] is None and banner.endswith("| no GPU visible (CPU only)"), banner


def test_a_gpu_podman_has_no_spec_for_is_one_error_line(on_podman, tmp_path):
    host, image, _, _ = on_podman
    conn = tmp_path / "kernel.json"
    ports = {k: 0 for k in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
    conn.write_text(json.dumps({"ip": "127.0.0.1", "transport": "tcp", "key": "k", **ports}))
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    argv = ["--image", image, "--gpus", "7", "--docker-host", host, "-f", str(conn)]
    proc = subprocess.run(
        [sys.executable, "-m", "kbundle.kernel.launcher", *argv],
        env=dict(env, KBUNDLE_CACHE_DIR=str(tmp_path / "cache")),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: this kernel asks for GPUs (7) but Podman has no CDI spec for them")
    assert "nvidia-ctk cdi generate" in lines[0]


def test_kbundle_run_builds_on_podman_and_its_gpu_kernel_gets_the_devices(world, on_podman, tmp_path):
    """The whole path through the CLI: pack, `run --gpus all` against Podman's socket (its build
    API refuses the legacy builder's extra hosts, which kbundle only sends to Docker), and the
    kernel, started without DOCKER_HOST, gets both stand-in GPUs by CDI name."""
    host, _, data, _ = on_podman
    env = dict(os.environ, KBUNDLE_CACHE_DIR=str(tmp_path / "cache"), JUPYTER_DATA_DIR=str(data))
    env.pop("DOCKER_HOST", None)
    bundle = pack_world_bundle(world, env, tmp_path / "sender", f"kbpodrun-{uuid.uuid4().hex[:8]}")  # a new image
    proc = run_kbundle(["run", bundle, "--yes", "--gpus", "all", "--json"], dict(env, DOCKER_HOST=host), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(proc.stdout)
    assert ran["built"] is True and ran["gpus"] == ["all"], ran
    banner, seen = start(data, ran["kernel_name"])
    assert seen["devices"] == ["/dev/nvidia0", "/dev/nvidia1"] and seen["uid"] != 0, seen
    assert banner.endswith("| GPU visible: 2 (nvidia0, nvidia1)"), banner


def test_doctor_on_podman_reads_the_cdi_spec_and_never_probes(on_podman):
    host = on_podman[0]
    proc = run_kbundle(["doctor", "--json"], dict(os.environ, DOCKER_HOST=host))
    assert proc.returncode == 0, proc.stderr
    engine = json.loads(proc.stdout)["docker"]
    assert engine["podman"] is True and engine["cdi_nvidia"] is True and engine["gpu_capable"] is True
    assert engine["gpu_probe"] is None  # a probe through Podman's Docker API would "succeed" without GPUs


# ------------------------------------------------------------------ Podman's decisions, without a spec

PODMAN = preflight.EngineFacts(True, "unix:///run/podman/podman.sock", "4.3.1", ("crun", "runc"), podman=True)
PODMAN_CDI = preflight.EngineFacts(
    True, "unix:///run/podman/podman.sock", "4.3.1", ("runc",), cdi_nvidia=True, podman=True
)
NO_NVML = preflight.NvmlFacts(False, "NVML unavailable: no driver")
ONE_GPU = preflight.NvmlFacts(True, "", "550.54", "12.4", (preflight.GpuInfo(0, "H100", "GPU-a", "9.0"),))


@pytest.mark.parametrize("gpus", ["all", "1", "device=0"])
def test_podman_without_a_cdi_spec_refuses_gpus_naming_nvidia_ctk(gpus):
    report = preflight.evaluate(PODMAN, ONE_GPU, "12.1", preflight.GpuRequest.parse(gpus))
    (error,) = report.errors
    assert error.message.startswith(f"--gpus {gpus} needs GPU passthrough but Podman has no NVIDIA CDI spec")
    assert "nvidia-ctk cdi generate" in error.message and "--gpus none" in error.message
    assert not report.plan.on_gpu


def test_podman_auto_without_a_spec_says_cpu_and_why():
    report = preflight.evaluate(PODMAN, ONE_GPU, "12.1", preflight.GpuRequest.parse("auto"))
    (runtime,) = [f for f in report.findings if f.topic == "runtime"]
    assert runtime.level == preflight.WARN and "the kernel runs on CPU" in runtime.message
    assert "nvidia-ctk cdi generate" in runtime.message


def test_podman_with_a_spec_gets_the_gpus_and_is_never_probed():
    report = preflight.evaluate(PODMAN_CDI, ONE_GPU, "12.1", preflight.GpuRequest.parse("all"))
    assert report.plan.gpus == ("0",) and not report.errors
    for engine in (PODMAN, PODMAN_CDI):
        assert not preflight.should_probe(engine, ONE_GPU, preflight.GpuRequest.parse("all"))


def test_a_docker_engine_ignores_cdi_specs_it_cannot_read():
    """Docker 20.10 reads no CDI spec: one in /etc/cdi is no GPU support for it (a probe decides)."""
    docker_engine = preflight.EngineFacts(True, "unix:///var/run/docker.sock", "20.10", ("runc",))
    assert not docker_engine.static_gpu_support
    assert preflight.should_probe(docker_engine, NO_NVML, preflight.GpuRequest.parse("all"))


@pytest.mark.parametrize(
    ("gpus", "names"),
    [
        ("none", []),
        ("all", ["nvidia.com/gpu=all"]),
        ("0,1", ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]),
        ("device=GPU-a", ["nvidia.com/gpu=GPU-a"]),
    ],
)
def test_cdi_names(gpus, names):
    assert podman.cdi_devices(gpus) == names


def test_the_spec_generator_keeps_the_plan_and_its_lockdown(tmp_path):
    """Pure: the libpod form of the kernel's container says what Docker's create says, plus CDI devices."""
    import argparse

    from kbundle.kernel import launch_plan

    args = argparse.Namespace(
        connection_file=str(tmp_path / "k.json"), image="img", workdir="", gpus="0,1", kernel_name="k", network="auto"
    )
    info = {
        "ip": "127.0.0.1",
        "transport": "tcp",
        "key": "k",
        **{k: 5000 + i for i, k in enumerate(launch_plan.PORT_KEYS)},
    }
    environ = {"DOCKER_HOST": "tcp://podman-box:8080"}  # an engine elsewhere: it publishes the ports
    plan = launch_plan.plan_launch(
        args, info, cwd=str(tmp_path), uid=1000, gid=1000, groups=[], pid=1, environ=environ, platform="linux"
    )
    spec = podman.spec_generator(plan, launch_plan._binds(plan), plan.environment)
    assert spec["devices"] == [{"path": "nvidia.com/gpu=0"}, {"path": "nvidia.com/gpu=1"}]
    assert (spec["user"], spec["init"], spec["remove"], spec["stdin"], spec["terminal"]) == (
        "1000:1000",
        True,
        True,
        True,
        False,
    )
    assert spec["cap_drop"] == ["ALL"] and spec["no_new_privileges"] and spec["read_only_filesystem"]
    assert spec["netns"] == {"nsmode": "bridge"} and spec["resource_limits"]["pids"]["limit"] == plan.lockdown.pids
    assert {m["destination"] for m in spec["mounts"] if m["type"] == "tmpfs"} == {"/tmp"}
    assert sorted(p["container_port"] for p in spec["portmappings"]) == plan.ports
    assert all(p["host_ip"] == "127.0.0.1" for p in spec["portmappings"])
    assert spec["env"]["KBUNDLE_GPUS_ASKED"] == "0,1" and spec["labels"] == plan.labels
