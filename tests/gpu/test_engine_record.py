"""A kernel remembers the engine it was registered against, and asks for GPUs in the form CUDA needs.

No engine here: the kernelspec kbundle writes, and the launcher started from it by a process
without DOCKER_HOST (as a Jupyter started from a desktop launcher is), which must then look for
the engine the kernelspec names. tests/gpu/test_gpu_box.py proves the same with a running kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kbundle.kernel import launch_plan
from kbundle.kernel.spec import KernelRequest, build_spec, install_kernelspec, list_kernelspecs

ENGINE = "unix:///run/user/1000/podman/podman.sock"


def request(tmp_path: Path, **kw) -> KernelRequest:
    return KernelRequest("kbundle-gpu", "gpu", "img:1", str(tmp_path), ["all"], "sha256:x", **kw)


def test_the_spec_names_the_engine_only_when_one_was_named(tmp_path):
    named = build_spec(request(tmp_path, docker_host=ENGINE), launcher=Path("/bin/true"))
    argv = named["argv"]
    assert argv[argv.index("--docker-host") + 1] == ENGINE and argv[-2:] == ["-f", "{connection_file}"]
    assert named["metadata"]["kbundle"]["docker_host"] == ENGINE
    for default in ("", None):
        plain = build_spec(request(tmp_path, docker_host=default), launcher=Path("/bin/true"))
        assert "--docker-host" not in plain["argv"] and "docker_host" not in plain["metadata"]["kbundle"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    return tmp_path / "data"


def test_install_records_the_docker_host_of_the_registering_shell(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", ENGINE)
    spec = json.loads((install_kernelspec(request(tmp_path)) / "kernel.json").read_text())
    assert spec["argv"][spec["argv"].index("--docker-host") + 1] == ENGINE
    monkeypatch.delenv("DOCKER_HOST")
    (record,) = list_kernelspecs()  # read back without the variable
    assert record.docker_host == ENGINE and record.to_dict()["docker_host"] == ENGINE
    again = json.loads((install_kernelspec(request(tmp_path)) / "kernel.json").read_text())
    assert "--docker-host" not in again["argv"]  # the default engine: nothing pinned
    assert list_kernelspecs()[0].docker_host == ""


def test_the_launcher_looks_for_the_engine_its_spec_names(tmp_path):
    """Started without DOCKER_HOST, the launcher tries the kernelspec's engine, and says which in one line."""
    engine = f"unix://{tmp_path}/recorded-engine.sock"
    conn = tmp_path / "kernel.json"
    ports = {k: 5000 + i for i, k in enumerate(launch_plan.PORT_KEYS)}
    conn.write_text(json.dumps({"ip": "127.0.0.1", "transport": "tcp", "key": "k", **ports}))
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    argv = ["--image", "img:1", "--gpus", "all", "--docker-host", engine, "-f", str(conn)]
    proc = subprocess.run(
        [sys.executable, "-m", "kbundle.kernel.launcher", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the Docker engine at " + engine), proc.stderr


def test_gpu_requests_ask_for_compute_and_utility():
    """Docker's nvidia driver turns the NVIDIA capabilities of a request into NVIDIA_DRIVER_CAPABILITIES."""
    for gpus, count, ids in (("all", -1, []), ("0", 0, ["0"]), ("device=0,1", 0, ["0", "1"])):
        (req,) = launch_plan.device_requests(gpus)
        assert req["Capabilities"] == [["gpu", "compute", "utility"]]
        assert req["Count"] == count and req["DeviceIDs"] == ids
    assert launch_plan.device_requests("none") == []


@pytest.mark.parametrize("gpus", ["none", "all", "1"])
def test_the_banner_learns_what_was_asked(tmp_path, gpus):
    """The shim's banner says 'asked for GPUs X' when none arrived (an engine that drops requests)."""
    args = argparse.Namespace(
        connection_file=str(tmp_path / "k.json"), image="img", workdir="", gpus=gpus, kernel_name="k", network="auto"
    )
    info = {"ip": "127.0.0.1", "transport": "tcp", "key": "k", **{k: 1 for k in launch_plan.PORT_KEYS}}
    plan = launch_plan.plan_launch(
        args, info, cwd=str(tmp_path), uid=1000, gid=1000, groups=[], pid=1, environ={}, platform="linux"
    )
    assert plan.environment[launch_plan.GPUS_VARIABLE] == gpus
