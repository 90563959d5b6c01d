"""The Slurm node agent's GPU arguments (kernel/node_agent.py), run for real by the engines' own CLIs.

On a compute node the agent runs `docker run` or `podman run` itself. Here the command it builds
for a step Slurm gave GPU 1 (SLURM_STEP_GPUS) is run as built, with only the kernel's shim
swapped for a probe: by Docker's CLI against the world's STAND-IN GPU box (its NVIDIA device
path: `--gpus` with the capabilities CUDA needs), and by Podman's CLI against the world's rootful
Podman with its STAND-IN CDI spec (`--device nvidia.com/gpu=1`). It proves the arguments and
the engines' plumbing, not CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kbundle.image import policy, preflight
from kbundle.kernel import node_agent

PROBE = (
    "import glob, json, os; print(json.dumps({'devices': sorted(glob.glob('/dev/nvidia[0-9]*')), "
    "'visible': os.environ.get('NVIDIA_VISIBLE_DEVICES'), 'caps': os.environ.get('NVIDIA_DRIVER_CAPABILITIES'), "
    "'uid': os.getuid()}))"
)


def test_the_agent_asks_for_the_capabilities_the_launcher_does():
    assert node_agent.GPU_CAPABILITIES == preflight.GPU_CAPABILITIES


@pytest.mark.parametrize(
    ("engine", "uid", "expected"),
    [
        ("/usr/bin/podman", 1000, ["--userns", "keep-id"]),  # the job's user's own (rootless) Podman
        ("/usr/bin/podman", 0, []),  # rootful Podman refuses keep-id
        ("/usr/bin/docker", 1000, []),  # Docker has no keep-id
    ],
)
def test_a_rootless_podman_on_the_node_keeps_the_user(engine, uid, expected):
    assert node_agent.userns_arguments(engine, uid) == expected


def _probe_command(engine: str, image: str, folder: Path) -> list[str]:
    """The agent's command for a step with GPU 1, its shim swapped for PROBE."""
    request = {
        "name": f"kbundle-node-gpu-{os.getpid()}",
        "image": image,
        "shim": "unused",
        "user": "1000:1000",
        "mounts": [str(folder)],
        "working_dir": str(folder),
        "labels": {"org.kbundle.test": "node-agent-gpus"},
        "policy": policy.kernel("host").request({"HOME": "/tmp"}),
    }
    cmd = node_agent.container_command(engine, request, "127.0.0.1", {"SLURM_STEP_GPUS": "1"})
    assert cmd[-3:] == ["python", "-c", "unused"]
    return [a for a in cmd[:-3] if a != "-i"] + ["python", "-c", PROBE]


def _seen(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_docker_path_gives_the_step_its_gpu_with_compute_and_utility(world, env_image, tmp_path):
    if "gpu_docker_host" not in world:
        pytest.skip(f"the world has no GPU box: {world.get('gpu_box_error', 'unknown')}")
    host = world["gpu_docker_host"]
    import docker

    box = docker.DockerClient(base_url=host, timeout=600)
    try:
        box.images.get(env_image)
    except docker.errors.ImageNotFound:
        box.images.load(b"".join(docker.from_env(timeout=600).images.get(env_image).save(named=True)))
    cmd = _probe_command("/usr/bin/docker", env_image, tmp_path)
    assert cmd[cmd.index("--gpus") + 1] == '"device=1","capabilities=gpu,compute,utility"'
    seen = _seen(cmd, dict(os.environ, DOCKER_HOST=host))
    assert seen["devices"] == ["/dev/nvidia1"] and seen["visible"] == "1", seen
    assert set(seen["caps"].split(",")) == {"compute", "utility"} and seen["uid"] == 1000, seen


def test_the_podman_path_gives_the_step_its_gpu_by_cdi_name(world, env_image, tmp_path):
    if "podman_host" not in world:
        pytest.skip(f"the world has no Podman: {world.get('podman_error', 'unknown')}")
    import world as world_module

    world_module.copy_image(Path(world["world_dir"]), env_image)
    # The node's `podman`: here the world's service, through Podman's own remote client.
    podman = tmp_path / "bin" / "podman"
    podman.parent.mkdir()
    podman.write_text(f'#!/bin/sh\nexec /usr/bin/podman --remote --url {world["podman_host"]} "$@"\n')
    podman.chmod(0o755)
    cmd = _probe_command(str(podman), env_image, tmp_path)
    assert cmd[cmd.index("--device") : cmd.index("--device") + 2] == ["--device", "nvidia.com/gpu=1"]
    seen = _seen(cmd, dict(os.environ))
    assert seen["devices"] == ["/dev/nvidia1"] and seen["visible"] == "1" and seen["uid"] == 1000, seen
