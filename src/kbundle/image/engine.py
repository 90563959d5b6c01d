"""The one place kbundle makes Docker clients: the engine the user's DOCKER_HOST names.

`connect` is for work that needs the engine (build, run, push) and turns "no engine" into one
`error:` line; `connect_or_none` is for commands that show what they can without one
(`kernels list`, a Slurm login node); `low_level` is the launcher's bare API client, which
skips the high-level SDK's first round trips on the kernel's start path.
"""

from __future__ import annotations

import os

from kbundle.errors import MachineError

ENGINE_TIMEOUT = 10.0  # seconds an engine may take to answer the first call (--engine-timeout)
BUILD_TIMEOUT = 600  # seconds any later engine call may take (a pull, a build step's output)
API_VERSION = "1.40"  # Docker 19.03, the first with device requests (--gpus); Podman speaks it too


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def describe_docker_error(exc: BaseException, host: str) -> str:
    text = str(exc)
    if isinstance(exc, PermissionError) or "Permission denied" in text or "PermissionError" in text:
        return (
            f"permission denied on the Docker socket {host}: add your user to the 'docker' group "
            f"(sudo usermod -aG docker $USER, then log in again)"
        )
    if any(
        s in text
        for s in (
            "No such file",
            "FileNotFoundError",
            "Connection refused",
            "ConnectionRefused",
            "Connection aborted",
            "Max retries",
            "timed out",
        )
    ):
        return (
            f"cannot reach the Docker daemon at {host}: is it running? "
            f"(start it, e.g. sudo systemctl start docker, or fix DOCKER_HOST)"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"cannot use the Docker daemon at {host}: {first}"


def connect(timeout: float = ENGINE_TIMEOUT, host: str = ""):
    """A docker client for a reachable daemon, or a one-line MachineError saying what to do.

    The engine must answer within `timeout` seconds: one that accepts connections and never
    answers is named as such, not waited on for minutes. `host`: another engine than DOCKER_HOST's
    (the one a kernelspec recorded, kernel/spec.py), with the environment's other DOCKER_* settings."""
    import docker

    environment = dict(os.environ, DOCKER_HOST=host) if host else None
    host = host or docker_host()
    try:
        client = docker.from_env(timeout=timeout, environment=environment)
        client.ping()
    except Exception as exc:  # docker wraps transport errors in several types
        if _timed_out(exc):
            raise MachineError(
                f"the Docker engine at {host} accepted the connection but did not answer within {timeout:g} s "
                f"(is it hung? restart it, or raise --engine-timeout)"
            ) from None
        raise MachineError(describe_docker_error(exc, host)) from None
    client.api.timeout = BUILD_TIMEOUT
    return client


def _timed_out(exc: BaseException) -> bool:
    import socket

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (socket.timeout, TimeoutError)) or "timed out" in str(seen).lower():
            return "Connection refused" not in str(seen)
        seen = seen.__cause__ or seen.__context__
    return False


def connect_or_none(timeout: float = 5.0, host: str = ""):
    """A client for the engine (DOCKER_HOST's, or `host`) when one answers within `timeout`, else None."""
    try:
        return connect(timeout, host)
    except MachineError:
        return None


def low_level(timeout: float = 60):
    """docker's bare APIClient, pinned to API_VERSION (no version probe), for the kernel launcher."""
    import docker

    return docker.APIClient(version=API_VERSION, timeout=timeout, **docker.utils.kwargs_from_env())


def is_podman(api) -> bool:
    """Whether the engine behind a Docker client (high- or low-level) is Podman: its version names
    the component. Podman speaks Docker's API but drops some of it without a word (GPU requests,
    kernel/podman.py) or refuses it (a build's extra hosts, image/build.py)."""
    try:
        components = api.version().get("Components") or []
    except Exception:  # an engine that does not say is taken for Docker
        return False
    return any("podman" in str(c.get("Name", "")).lower() for c in components)


def image_id(client, ref: str):
    """The engine's id of image `ref` (a tag, a digest or an id), or None when it has none: the one
    way kbundle asks "is this image here" (build, kernels, gc, integrity)."""
    import docker

    try:
        return client.api.inspect_image(ref)["Id"]
    except docker.errors.NotFound:  # ImageNotFound too
        return None
