"""The GPU path end to end, on the world's STAND-IN GPU box (tests/world/gpu_box.py).

The box is a real second dockerd whose PATH holds a stand-in ``nvidia-container-runtime-hook``
(tests/world/standin_nvidia_hook.py): its GPU requests take Docker's own nvidia device driver,
which sets NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES and runs the hook, and the hook
makes stand-in nodes (/dev/nvidia0, /dev/nvidia1) and logs what it was asked. It proves
kbundle's requests and the engine's plumbing, not CUDA.

The real CLI, in subprocesses: one bundle of the world, packed once and built once on the box;
then `kbundle run --gpus all | 1 | device=0 | device=1 | auto`, each registered under its own
name and started with jupyter_client from a process WITHOUT DOCKER_HOST, as a Jupyter started
from a desktop launcher would be (the kernelspec must name the box itself).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from helpers import assert_one_error_line, banner_and_printed, environ, pack_world_bundle, run_env_for, run_kbundle
from kbundle import contract

pytestmark = pytest.mark.docker

PROBE = (
    "import glob, json, os; print(json.dumps({'devices': sorted(glob.glob('/dev/nvidia*')), "
    "'visible': os.environ.get('NVIDIA_VISIBLE_DEVICES'), 'caps': os.environ.get('NVIDIA_DRIVER_CAPABILITIES')}))"
)

# --gpus, what run records, what the engine sets, which stand-in nodes the container gets
CASES = {
    "all": (["all"], "all", ["/dev/nvidia0", "/dev/nvidia1"]),
    "1": (["0"], "0", ["/dev/nvidia0"]),
    "device=0": (["0"], "0", ["/dev/nvidia0"]),
    "device=1": (["1"], "1", ["/dev/nvidia1"]),
}


def slug(gpus: str) -> str:
    return "gpu-" + gpus.replace("=", "")


@pytest.fixture(scope="module")
def box(world):
    import docker

    client = docker.DockerClient(base_url=world["gpu_docker_host"], timeout=600)
    yield client
    client.close()


@pytest.fixture(scope="module")
def shipped(world, tmp_path_factory):
    """(recipient's env with DOCKER_HOST = the box, bundle, cwd): one small world bundle."""
    root = tmp_path_factory.mktemp("gpu-box")
    env = run_env_for(root)
    env.pop("DOCKER_HOST", None)
    bundle = pack_world_bundle(world, env, root / "sender", f"kbt-gpu-{uuid.uuid4().hex[:8]}")
    (root / "here").mkdir()
    return dict(env, DOCKER_HOST=world["gpu_docker_host"]), bundle, root / "here"


@pytest.fixture(scope="module")
def runs(shipped, box):
    """`kbundle run --gpus X --name gpu-X --yes --json` on the box for every case and auto: {X: (json, stderr)}."""
    env, bundle, cwd = shipped
    done = {}
    try:
        for gpus in [*CASES, "auto"]:  # the first builds, the others reuse the image
            proc = run_kbundle(["run", bundle, "--gpus", gpus, "--name", slug(gpus), "--yes", "--json"], env, cwd, 900)
            assert proc.returncode == 0, proc.stderr
            done[gpus] = (json.loads(proc.stdout), proc.stderr)
        yield done
    finally:
        for image in {data["image"] for data, _ in done.values()}:
            box.images.remove(image, force=True)


def records(world, container_id: str) -> list[dict]:
    """The stand-in hook's records of one container."""
    lines = Path(world["gpu_box_hook_log"]).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["id"] == container_id]


def in_kernel(env: dict, kernel: str, box) -> tuple[str, dict, str]:
    """Start `kernel` with jupyter_client, as a Jupyter started from a desktop launcher (the
    recipient's data dir, no DOCKER_HOST); (its banner's last line, PROBE's answer, its container's id)."""
    found = []

    def container() -> None:
        found.extend(box.containers.list(filters={"label": f"{contract.LABEL_KERNEL_NAME}={kernel}"}))

    data, cache = env["JUPYTER_DATA_DIR"], env["KBUNDLE_CACHE_DIR"]
    with environ(JUPYTER_DATA_DIR=data, KBUNDLE_CACHE_DIR=cache, DOCKER_HOST=None, JUPYTER_PATH=None):
        banner, printed = banner_and_printed(kernel, PROBE, on_ready=container)
    (one,) = found
    return banner.strip().splitlines()[-1], json.loads(printed), one.id


@pytest.mark.parametrize("gpus", list(CASES))
def test_the_kernel_gets_exactly_the_gpus_asked_through_the_engine(gpus, runs, shipped, box, world):
    recorded, visible, nodes = CASES[gpus]
    data, _ = runs[gpus]
    env = shipped[0]
    assert data["gpus"] == recorded  # run: what preflight planned and the kernelspec holds
    spec = json.loads((Path(data["kernelspec"]) / "kernel.json").read_text())
    argv = spec["argv"]
    assert argv[argv.index("--gpus") + 1] == ",".join(recorded)  # the launcher's request
    # The kernelspec names the box: the kernel below is started without DOCKER_HOST.
    assert argv[argv.index("--docker-host") + 1] == world["gpu_docker_host"]
    assert spec["metadata"]["kbundle"]["docker_host"] == world["gpu_docker_host"]

    banner, seen, container_id = in_kernel(env, data["kernel_name"], box)

    # The engine's own nvidia path: it set the variables and ran the (stand-in) hook, once.
    (hook,) = records(world, container_id)
    assert hook["NVIDIA_VISIBLE_DEVICES"] == visible and hook["devices"] == nodes
    assert set(hook["NVIDIA_DRIVER_CAPABILITIES"].split(",")) >= {"compute", "utility"}
    # The container saw exactly those devices and that environment.
    assert [d for d in seen["devices"] if d != "/dev/nvidiactl"] == nodes
    assert seen["visible"] == visible
    assert set(seen["caps"].split(",")) >= {"compute", "utility"}
    # The banner says which.
    names = ", ".join(Path(n).name for n in nodes)
    assert banner.endswith(f"| GPU visible: {len(nodes)} ({names})"), banner


def test_gpus_auto_without_nvml_says_it_runs_on_cpu(runs, shipped, box, world):
    data, stderr = runs["auto"]
    assert data["gpus"] == []
    assert any("no NVIDIA GPU found" in w and "the kernel runs on CPU" in w for w in data["warnings"]), data
    assert "the kernel runs on CPU" in stderr
    banner, seen, container_id = in_kernel(shipped[0], data["kernel_name"], box)
    assert banner.endswith("| no GPU visible (CPU only)"), banner
    assert seen["devices"] == [] and seen["visible"] is None
    assert records(world, container_id) == []  # no GPU request: the engine never ran the hook


def test_kernels_list_says_which_gpus_from_a_shell_without_docker_host(runs, shipped):
    env = {k: v for k, v in shipped[0].items() if k != "DOCKER_HOST"}
    proc = run_kbundle(["kernels", "list", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    listed = {k["name"]: k for k in json.loads(proc.stdout)}
    for data, _ in runs.values():
        kernel = listed[data["kernel_name"]]
        assert kernel["gpus"] == data["gpus"]
        assert kernel["docker_host"] == shipped[0]["DOCKER_HOST"]
        assert kernel["health"] == "ok", kernel  # its image is looked for on its own engine
    table = run_kbundle(["kernels", "list"], env).stdout.splitlines()
    gpu_column = {line.split()[0]: line.split()[2] for line in table[1:]}
    assert gpu_column == {
        runs["all"][0]["kernel_name"]: "all",
        runs["1"][0]["kernel_name"]: "0",
        runs["device=0"][0]["kernel_name"]: "0",
        runs["device=1"][0]["kernel_name"]: "1",
        runs["auto"][0]["kernel_name"]: "cpu",
    }


def test_doctor_reads_gpu_support_from_the_engine_itself(runs, shipped, world):
    env, bundle, _ = shipped
    on_box = run_kbundle(["doctor", bundle, "--json"], env)
    assert on_box.returncode == 0, on_box.stderr
    report = json.loads(on_box.stdout)
    # This machine's PATH has no NVIDIA hook; the box's dockerd has one: only its answer counts.
    assert report["docker"]["nvidia_hook"] is False
    assert report["docker"]["gpu_probe"] is True and report["docker"]["gpu_capable"] is True
    engine = next(f for f in report["findings"] if f["topic"] == "engine")
    assert engine["level"] == "ok" and "a test container got GPUs" in engine["message"]

    main = {k: v for k, v in env.items() if k != "DOCKER_HOST"}
    on_main = json.loads(run_kbundle(["doctor", bundle, "--json"], main).stdout)
    assert on_main["docker"]["gpu_probe"] is False and on_main["docker"]["gpu_capable"] is False
    assert "could not select device driver" in on_main["docker"]["gpu_probe_error"]


def test_the_main_engine_still_refuses_gpus_all_with_todays_advice(shipped, tmp_path):
    env, bundle, _ = shipped
    main = {k: v for k, v in env.items() if k != "DOCKER_HOST"}
    proc = run_kbundle(["run", bundle, "--gpus", "all", "--name", "gpu-main", "--yes"], main, tmp_path)
    assert_one_error_line(proc, "--gpus all", "no NVIDIA runtime", "NVIDIA Container Toolkit", "--gpus none")
    assert proc.returncode == 4
