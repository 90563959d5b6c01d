"""The launcher's pure decisions (`launcher.plan_launch` and its helpers), table-driven: no engine."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from kbundle import contract
from kbundle.kernel import launcher as L
from kbundle.kernel.labels import process_start
from kbundle.kernel.spec import launcher_path


def _args(**kw) -> argparse.Namespace:
    base = dict(
        connection_file="/run/user/1/jupyter/kernel-abc.json",
        image="img",
        workdir="",
        gpus="none",
        kernel_name="k",
        network="auto",
    )
    base.update(kw)
    return argparse.Namespace(**base)


INFO = {
    "ip": "127.0.0.1",
    "transport": "tcp",
    "key": "secret-key",
    "shell_port": 5001,
    "iopub_port": 5002,
    "stdin_port": 5003,
    "control_port": 5004,
    "hb_port": 5005,
    "signature_scheme": "hmac-sha256",
}


def _plan(tmp_path, environ=None, platform="linux", info=INFO, **kw):
    return L.plan_launch(
        _args(**kw),
        info,
        cwd=str(tmp_path),
        uid=1000,
        gid=1000,
        groups=[1000, 27, 105],
        pid=os.getpid(),
        environ=environ or {},
        platform=platform,
    )


@pytest.mark.parametrize(
    "requested, environ, platform, expected",
    [
        ("auto", {}, "linux", "bridge"),  # the default: the kernel gets a network of its own
        ("auto", {"DOCKER_HOST": "unix:///var/run/docker.sock"}, "linux", "bridge"),
        ("auto", {}, "darwin", "bridge"),
        ("bridge", {}, "linux", "bridge"),
        ("host", {}, "linux", "host"),  # `kbundle run --network host` wrote it into the kernelspec
        ("auto", {"KBUNDLE_KERNEL_NETWORK": "host"}, "linux", "host"),  # the user's own opt-in
        ("auto", {"KBUNDLE_KERNEL_NETWORK": "bridge"}, "linux", "bridge"),
        ("auto", {"KBUNDLE_KERNEL_NETWORK": "nonsense"}, "linux", "bridge"),
        ("host", {"KBUNDLE_KERNEL_NETWORK": "bridge"}, "darwin", "host"),
        ("bridge", {"KBUNDLE_KERNEL_NETWORK": "host"}, "linux", "bridge"),
    ],
)
def test_network_choice(requested, environ, platform, expected):
    assert L.choose_network(requested, environ, platform) == expected


def test_plan_keeps_the_key_out_and_names_the_container_from_the_connection_file(tmp_path):
    plan = _plan(tmp_path)
    assert "secret-key" not in repr(plan)
    assert plan.name == L.container_name("/run/user/1/jupyter/kernel-abc.json") == _plan(tmp_path).name
    assert plan.name != L.container_name("/run/user/1/jupyter/kernel-def.json")
    assert plan.user == "1000:1000" and plan.group_add == ["27", "105"]
    assert plan.mounts == [plan.working_dir] == [str(tmp_path.resolve())]
    assert plan.network == "bridge" and plan.forward == [5001, 5002, 5003, 5004, 5005] and plan.ports == []
    assert plan.cap_drop == ["ALL"] and plan.security_opt == ["no-new-privileges"]
    assert "JPY_PARENT_PID" not in plan.environment
    assert plan.labels[contract.LABEL_KERNEL] == "1" and plan.labels[contract.LABEL_LAUNCHER_PID] == str(os.getpid())
    assert plan.labels[contract.LABEL_LAUNCHER_START] == process_start(os.getpid()) != ""


def test_host_plan_publishes_nothing(tmp_path):
    plan = _plan(tmp_path, network="host")
    assert plan.network == "host" and plan.ports == [] and plan.forward == []
    assert plan.cap_drop == ["ALL"] and plan.security_opt == ["no-new-privileges"]


@pytest.mark.parametrize(
    "uid, gid, groups, owner, user, group_add",
    [
        (1000, 1000, [1000, 27, 0], (1000, 1000), "1000:1000", ["27"]),  # the invoker; never group 0
        (0, 0, [0], (1000, 100), "1000:100", []),  # root invoker: the notebook folder's owner
        (0, 0, [0, 1], (0, 0), contract.USER, []),  # root owns that too: the image's unprivileged user
        (1000, 1000, [], (0, 0), "1000:1000", []),  # a non-root invoker is never changed
    ],
)
def test_the_kernel_never_runs_as_root(uid, gid, groups, owner, user, group_add):
    assert L.kernel_user(uid, gid, groups, owner) == (user, group_add)


def test_root_plan_asks_who_owns_the_notebook_folder(tmp_path):
    asked = []
    plan = L.plan_launch(
        _args(),
        INFO,
        cwd=str(tmp_path),
        uid=0,
        gid=0,
        groups=[0],
        pid=1,
        environ={},
        platform="linux",
        owner=lambda path: asked.append(path) or (4242, 4243),
    )
    assert plan.user == "4242:4243" and plan.group_add == [] and asked == [str(tmp_path.resolve())]


@pytest.mark.parametrize(
    "environ, platform, forwarded",
    [
        ({}, "linux", True),  # a local engine: the launcher holds the ports (kernel/forward.py)
        ({"DOCKER_HOST": "unix:///var/run/docker.sock"}, "linux", True),
        ({"DOCKER_HOST": "unix:///run/podman/podman.sock"}, "linux", True),  # rootful podman's bridge
        ({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}, "linux", False),  # rootless: its own namespace
        ({"DOCKER_HOST": "unix:///home/u/.docker/desktop/docker.sock"}, "linux", False),  # Desktop's VM
        ({"DOCKER_HOST": "tcp://build-box:2376"}, "linux", False),  # a remote engine publishes them
        ({}, "darwin", False),
    ],
)
def test_bridge_plan_forwards_or_publishes_the_five_ports(tmp_path, environ, platform, forwarded):
    plan = _plan(tmp_path, environ=environ, platform=platform)
    ports = [5001, 5002, 5003, 5004, 5005]
    assert (plan.forward, plan.ports) == ((ports, []) if forwarded else ([], ports))
    assert json.loads(L.kernel_connection(INFO, "bridge"))["ip"] == "0.0.0.0"
    line = L.kernel_connection(INFO, "host")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == dict(INFO, ip="127.0.0.1")


@pytest.mark.parametrize(
    "workdir, cwd, mounts, working",
    [
        ("w", "w/chapter", ["w"], "w/chapter"),  # a notebook in a subfolder of the bundle's files
        ("w", "elsewhere", ["w", "elsewhere"], "elsewhere"),  # another notebook's folder: mounted, and the cwd
        ("w", ".", ["."], "."),  # the notebook's folder holds the workdir: one mount
        ("w", "/", ["w"], "w"),  # Jupyter started from /: never mount it, start in the workdir
        ("", "w", ["w"], "w"),
    ],
)
def test_mounts_and_working_dir(tmp_path, workdir, cwd, mounts, working):
    for d in ("w/chapter", "elsewhere"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)

    def at(p):
        return str((tmp_path / p).resolve())

    plan = L.plan_launch(
        _args(workdir=at(workdir) if workdir else ""),
        INFO,
        cwd=at(cwd),
        uid=1,
        gid=1,
        groups=[],
        pid=1,
        environ={},
        platform="linux",
    )
    assert (plan.mounts, plan.working_dir) == ([at(m) for m in mounts], at(working))


@pytest.mark.parametrize("workdir", ["/", "/usr", "/opt", "/opt/kbundle/env/lib", "/etc"])
def test_refuses_mounts_that_hide_the_image(workdir, tmp_path):
    with pytest.raises(L.LaunchError, match="refusing to mount"):
        _plan(tmp_path, workdir=workdir)


@pytest.mark.parametrize(
    "info, message",
    [
        (dict(INFO, ip="0.0.0.0"), "127.0.0.1 only"),
        (dict(INFO, transport="ipc"), "transport"),
    ],
)
def test_refuses_connections_it_cannot_keep_local(tmp_path, info, message):
    with pytest.raises(L.LaunchError, match=message):
        _plan(tmp_path, info=info)


def test_device_requests():
    assert L.device_requests("none") == []
    (all_gpus,) = L.device_requests("all")
    # compute and utility too: Docker's nvidia driver makes them NVIDIA_DRIVER_CAPABILITIES
    assert all_gpus["Count"] == -1 and all_gpus["Capabilities"] == [["gpu", "compute", "utility"]]
    (some,) = L.device_requests("device=0,2")
    assert some["DeviceIDs"] == ["0", "2"]


def test_bad_connection_file_is_one_error_line(tmp_path):
    import subprocess

    bad = tmp_path / "k.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        [str(launcher_path()), "--image", "img", "-f", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"error: the connection file {bad} is not JSON\n")


def test_pycache_dir_is_per_image_in_kbundles_cache(tmp_path):
    env = {"KBUNDLE_CACHE_DIR": str(tmp_path)}
    a, b = L.pycache_dir("kbundle/demo:abc", env), L.pycache_dir("kbundle/demo:abd", env)
    assert a != b and Path(a).parent == tmp_path / "pycache" and Path(a).name.startswith("kbundle-demo-abc-")
    assert L.pycache_dir("img", dict(env, KBUNDLE_KERNEL_PYCACHE="0")) == ""


def test_prepare_pycache_falls_back_to_none(tmp_path):
    plan = _plan(tmp_path, environ={"KBUNDLE_CACHE_DIR": str(tmp_path / "cache")})
    assert plan.environment["KBUNDLE_PYCACHE"] == L.PYCACHE_IN_CONTAINER
    ready = L.prepare_pycache(plan)
    assert ready == plan and (Path(plan.pycache) / "image.txt").read_text() == "img\n"
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = L.prepare_pycache(_plan(tmp_path, environ={"KBUNDLE_CACHE_DIR": str(blocker)}))
    assert broken.pycache == "" and "KBUNDLE_PYCACHE" not in broken.environment


def test_banner_facts_reach_the_container_environment(tmp_path):
    """The kernelspec's env (spec.banner_env) reaches the launcher; the shim builds the banner from these."""
    plan = _plan(tmp_path, environ={"KBUNDLE_BUNDLE": "demo", "KBUNDLE_CUDA": "12.1"}, image="kbundle/demo:abc")
    assert {k: v for k, v in plan.environment.items() if k.startswith("KBUNDLE_BANNER_")} == {
        "KBUNDLE_BANNER_BUNDLE": "demo",
        "KBUNDLE_BANNER_IMAGE": "kbundle/demo:abc",
        "KBUNDLE_BANNER_CUDA": "12.1",
    }
    older = _plan(tmp_path, kernel_name="kbundle-old")  # a spec written before the banner existed
    assert older.environment["KBUNDLE_BANNER_BUNDLE"] == "kbundle-old"
    assert older.environment["KBUNDLE_BANNER_CUDA"] == "unknown"


def test_the_forwarder_keeps_a_quiet_connection(tmp_path):
    """A kernel channel may be silent for minutes (a long cell): the joined connection must last."""
    import socket
    import threading
    import time

    from kbundle.kernel.forward import Forwarder

    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(1)

    def echo() -> None:
        conn, _ = backend.accept()
        while data := conn.recv(1024):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=echo, daemon=True).start()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    held = probe.getsockname()[1]
    probe.close()
    forwarder = Forwarder([held], None, alive=lambda: True)
    forwarder.start()
    forwarder.route("127.0.0.1", {held: backend.getsockname()[1]})
    try:
        client = socket.create_connection(("127.0.0.1", held), timeout=10)
        client.sendall(b"first")
        assert client.recv(1024) == b"first"
        time.sleep(1.6)  # longer than the connect timeout the forwarder uses
        client.sendall(b"after a quiet while")
        assert client.recv(1024) == b"after a quiet while"
        client.close()
    finally:
        forwarder.close()
        backend.close()
