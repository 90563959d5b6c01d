"""A rootless engine's decisions, pure: who owns the socket says whether the engine is the user's own,
and a rootless Podman kernel keeps the user themselves inside (image/userns.py, kernel/podman.py).
tests/gpu/test_podman_rootless.py proves the same with a user's real rootless Podman."""

from __future__ import annotations

import argparse
import os
import socket

import pytest

from kbundle.image import userns
from kbundle.kernel import launch_plan, podman

INFO = {"ip": "127.0.0.1", "transport": "tcp", "key": "k", **{k: 6000 + i for i, k in enumerate(launch_plan.PORT_KEYS)}}


def _plan(tmp_path, uid: int, owner, gpus: str = "none", platform: str = "linux"):
    args = argparse.Namespace(
        connection_file=str(tmp_path / "k.json"), image="img", workdir="", gpus=gpus, kernel_name="k", network="auto"
    )
    return launch_plan.plan_launch(
        args,
        INFO,
        cwd=str(tmp_path),
        uid=uid,
        gid=uid,
        groups=[uid, 27, 105],
        pid=1,
        environ={"DOCKER_HOST": f"unix:///run/user/{uid}/podman/podman.sock"},
        platform=platform,
        owner=lambda _: (1000, 1000),
        socket_owner=lambda _: owner,
    )


@pytest.mark.parametrize(
    ("owner", "uid", "rootless"),
    [
        (1000, 1000, True),  # the user's own service, wherever its socket is
        (0, 1000, False),  # a root engine (a docker group lets the user in)
        (None, 1000, False),  # a remote engine, or no socket to look at
        (0, 0, False),  # root is never rootless
    ],
)
def test_an_engine_is_rootless_when_its_socket_is_the_invokers(owner, uid, rootless):
    assert userns.is_rootless(owner, uid) is rootless


def test_the_socket_owner_is_read_from_the_socket(tmp_path):
    path = tmp_path / "engine.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        assert userns.engine_owner(f"unix://{path}") == os.getuid()
    assert userns.engine_owner("tcp://10.0.0.1:2375") is None
    assert userns.engine_owner(f"unix://{tmp_path}/none.sock") is None


def test_a_rootless_plan_publishes_its_ports_and_drops_the_hosts_other_groups(tmp_path):
    plan = _plan(tmp_path, 1000, 1000)
    assert plan.rootless and plan.user == "1000:1000" and plan.group_add == []
    # slirp4netns keeps the container's bridge out of the host's reach: the engine publishes the ports.
    assert plan.forward == [] and sorted(plan.ports) == sorted(INFO[k] for k in launch_plan.PORT_KEYS)
    rootful = _plan(tmp_path, 1000, 0)
    assert not rootful.rootless and rootful.group_add == ["27", "105"]


def test_a_rootless_gpu_kernel_asks_libpod_for_keep_id(tmp_path):
    plan = _plan(tmp_path, 1000, 1000, gpus="0")
    spec = podman.spec_generator(plan, launch_plan._binds(plan), plan.environment)
    assert spec["userns"] == {"nsmode": "keep-id"} and spec["devices"] == [{"path": "nvidia.com/gpu=0"}]
    assert "userns" not in podman.spec_generator(*_rootful(tmp_path))
    assert userns.host_config() == {"UsernsMode": "keep-id"}


def _rootful(tmp_path):
    plan = _plan(tmp_path, 1000, 0, gpus="0")
    return plan, launch_plan._binds(plan), plan.environment


def test_keep_id_is_asked_only_of_the_users_own_podman(tmp_path, monkeypatch):
    """A root engine costs no round trip; a user's own engine one, and keep-id only when it is Podman."""
    asked = []

    class Api:
        def __init__(self, name):
            self.name = name

        def version(self):
            asked.append(self.name)
            return {"Components": [{"Name": self.name}]}

    mine = tmp_path / "mine.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(mine))
        monkeypatch.setattr(userns.os, "getuid", lambda: os.stat(mine).st_uid or 1000)
        monkeypatch.setattr(userns, "engine_owner", lambda host: 1000 if host.endswith("mine.sock") else 0)
        monkeypatch.setattr(userns, "_asked", {})
        assert userns.keep_id(Api("Podman Engine"), f"unix://{mine}") is True
        assert userns.keep_id(Api("Podman Engine"), f"unix://{mine}") is True  # remembered
        assert userns.keep_id(Api("Engine"), "unix:///var/run/docker.sock") is False
        monkeypatch.setattr(userns, "_asked", {})
        assert userns.keep_id(Api("Engine"), f"unix://{mine}") is False  # Docker's rootless engine: no keep-id
    assert asked == ["Podman Engine", "Engine"]
