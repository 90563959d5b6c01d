"""The pip: section installed into the env before the build (image/pipinstall.py), by the env's own pip in
a throwaway container of the world's base image: offline, hashes checked, the host's files left as
they were. The real engine; a wheel made here."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import world as world_module
from kbundle import contract
from kbundle.errors import KbundleError
from kbundle.image import pipinstall
from world.pypi import wheel_bytes

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def staging(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipinstall")
    world_module.solve_and_install(world["channel"], world_module.ENV_SPECS + ["pip"], root / "env")
    return root / "env"


@pytest.fixture
def env(staging, tmp_path):
    target = tmp_path / "ctx" / "env"
    shutil.copytree(staging, target, symlinks=True)
    return target


def _wheel(folder, name="kbpipinst", version="1.0"):
    data = wheel_bytes(name, version, {f"{name}/__init__.py": "VALUE = 'installed'\n"})
    path = folder / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(data)
    return path, f"{name}=={version} --hash=sha256:{hashlib.sha256(data).hexdigest()}"


def test_the_wheels_land_in_the_env_owned_as_the_host_expects(world, docker_client, env, tmp_path):
    wheel, line = _wheel(tmp_path)
    before = {p: os.lstat(p) for p in env.rglob("*")}
    done = pipinstall.install(docker_client, world["base_image"], env, [wheel], [line])
    site = next(env.glob("lib/python3*/site-packages"))
    assert (site / "kbpipinst" / "__init__.py").read_text() == "VALUE = 'installed'\n"
    assert (site / "kbpipinst-1.0.dist-info" / "RECORD").exists()
    assert not list(site.glob("kbpipinst/__pycache__"))  # --no-compile: bytecode.py compiles, with its cache
    assert "Successfully installed kbpipinst-1.0" in done.log and done.lines == (line,)
    owner = (os.getuid(), os.getgid())
    assert {(os.lstat(p).st_uid, os.lstat(p).st_gid) for p in env.rglob("*")} == {owner}  # nobody's files went back
    assert all(os.lstat(p).st_ino == info.st_ino for p, info in before.items())  # nothing of the env was rewritten
    assert not list(env.parent.glob(".kbundle-wheels-*"))


def test_a_wheel_that_does_not_match_its_hash_is_refused(world, docker_client, env, tmp_path):
    wheel, _ = _wheel(tmp_path)
    with pytest.raises(KbundleError, match="installing the pip: section into the environment failed") as info:
        pipinstall.install(
            docker_client, world["base_image"], env, [wheel], ["kbpipinst==1.0 --hash=sha256:" + "0" * 64]
        )
    assert "HASH" in str(info.value).upper()
    assert not list(env.glob("lib/python3*/site-packages/kbpipinst"))


def test_an_env_without_pip_is_named(world, docker_client, tmp_path):
    (tmp_path / "env" / "bin").mkdir(parents=True)
    wheel, line = _wheel(tmp_path)
    with pytest.raises(KbundleError, match="has no pip"):
        pipinstall.install(docker_client, world["base_image"], tmp_path / "env", [wheel], [line])


def test_the_install_runs_offline_as_an_unprivileged_user(world, docker_client, env, tmp_path):
    """The bundle's pip is the bundle's code: a wheel cannot reach the network or root from there either
    (the wheel's files are data; pip runs with no network and no capabilities, not as root)."""
    probe = (
        f"import os, socket\nPREFIX = {contract.PREFIX!r}\n"
        "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=2); net = 'up'\n"
        "except OSError as exc:\n    net = type(exc).__name__\n"
        "open(PREFIX + '/probe.txt', 'w').write(f'{os.getuid()} {net}')\n"
    )
    # sitecustomize runs inside pip's interpreter: the env's own code, as a hostile bundle could ship it.
    site = next(env.glob("lib/python3*/site-packages"))
    (site / "sitecustomize.py").write_text(probe)
    wheel, line = _wheel(tmp_path)
    pipinstall.install(docker_client, world["base_image"], env, [wheel], [line])
    uid, net = (env / "probe.txt").read_text().split()
    assert int(uid) != 0 and net != "up", (uid, net)
