"""Shared fixtures: the offline world (the tests/world/ package) and an image with a real env in it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ on the path: `world` is the tests/world/ package (`python -m tests.world` from the root).
sys.path.insert(0, str(Path(__file__).parent))

import world as world_module  # noqa: E402

# The fixtures that stand for the offline world (tests/world/): a test that asks for one, even through
# another fixture, needs the Docker engine and the world, and is marked `docker` for it, so that
# `pytest -m "not docker"` runs without them and a new test cannot forget its marker.
WORLD_FIXTURES = frozenset({"docker_client", "world", "env_image", "registry", "slurm"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if WORLD_FIXTURES.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker("docker"):
            item.add_marker(pytest.mark.docker)


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_client():
    if not _docker_available():
        pytest.fail("no Docker engine answers: start one (scripts/test does) before the integration tests")
    import docker

    return docker.from_env(timeout=600)


@pytest.fixture(scope="session")
def world(docker_client) -> dict:
    """The offline world's JSON: base_image, channel (http URL), channel_path, channel_file_url, python."""
    return world_module.up()


@pytest.fixture(scope="session")
def env_image(world) -> str:
    """Tag of an image FROM the world's base with python, ipykernel and numpy at /opt/kbundle/env.

    kbundle's own Dockerfile, installer and build context make it (tests/world/env_image.py), so
    it is an image as `kbundle run` builds one, except that its env is not byte-compiled. Its
    ENTRYPOINT activates the env, so `docker run TAG python ...` runs the env's interpreter; its
    default user is the unprivileged `kbundle` and its WORKDIR /opt/kbundle/work.
    """
    return world_module.ensure_env_image(world)


@pytest.fixture(scope="session")
def registry(world) -> str:
    """The world's container registry, ``127.0.0.1:PORT`` (plain HTTP, deletes enabled)."""
    return world["registry"]


@pytest.fixture(scope="session")
def slurm(world):
    """The world's Slurm cluster: ``{"conf", "partition", "node", "cpus"}``.

    Sets ``SLURM_CONF`` in os.environ for the session, not through monkeypatch, so that every
    process the tests start (srun, a jupyter_client launcher) inherits it; restored at the end.
    """
    import os

    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = world["slurm"]["conf"]
    yield world["slurm"]
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture
def mount_tmpfs():
    """Mount a small tmpfs (root only; skips where mounting is refused): yields mount(path,
    options). Each is unmounted afterwards, lazily, whatever the test left open on it."""
    import subprocess

    mounted: list = []

    def mount(path, options: str = "size=20m"):
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)
