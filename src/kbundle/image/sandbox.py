"""Throwaway containers in which the bundle's own code does work for the host, locked down.

The environment's interpreter byte-compiles it (image/bytecode.py), its pip installs the
pip: section into it (image/pipinstall.py), and a VCS or sdist project's build code makes a
wheel (image/sourcebuild.py). That is the bundle's code, so it never runs on the host: it
runs in a container of the base image with the env mounted at its final prefix, locked down
as image/policy.py says (no network, no capabilities, no new privileges, a read-only root, a
tmpfs /tmp, a process limit, a cleared environment) as an unprivileged user: the invoking
user, or nobody when kbundle runs as root. The container is removed whatever happens,
Ctrl-C included.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kbundle.image import policy
from kbundle.image.policy import NOBODY

_NOBODY_ID = policy.NOBODY_ID


@dataclass(frozen=True)
class Outcome:
    status: int  # the command's exit status
    stdout: str
    stderr: str


def user() -> str:
    """The container's user (image/policy.py's rule): the invoking uid:gid, or nobody for root."""
    return policy.invoker().user


def run(
    client,
    image: str,
    command: list[str],
    *,
    entrypoint: list[str],
    mounts: Mapping[str, tuple[str, str]],
    environment: Mapping[str, str],
    label: str,
    run_as: Optional[str] = None,
    timeout: Optional[float] = None,
    lockdown: policy.Lockdown = policy.SANDBOX,
) -> Outcome:
    """Run `command` in a locked-down container of `image`; its exit status and output.

    `mounts`: host path -> (path in the container, "ro" or "rw"). Docker's own errors (no such
    image, the engine gone) are raised as docker's exceptions, for the caller to word."""
    container = _create(
        client,
        image,
        command,
        entrypoint=entrypoint,
        user=run_as or user(),
        volumes={host: {"bind": inside, "mode": mode} for host, (inside, mode) in mounts.items()},
        labels={label: "1"},
        **lockdown.sdk_options(environment),
    )
    import requests

    try:
        container.start()
        try:
            status = container.wait(timeout=timeout)
        except requests.exceptions.RequestException:  # the wait timed out: the container goes below
            return Outcome(
                124, "", f"it did not finish within {timeout:.0f} s" if timeout else "the engine stopped answering"
            )
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return Outcome(int(status.get("StatusCode", 1)), stdout, stderr)
    finally:
        try:
            container.remove(force=True)
        except Exception:
            pass  # gone already, or the engine is; its label says what it was


def _create(client, image: str, command: list[str], **kwargs):
    """docker-py's `containers.create`; on the invoker's rootless Podman with keep-id (image/userns.py),
    which docker-py's own keywords cannot say, so its create arguments get it added."""
    from kbundle.image import engine, userns

    if not userns.keep_id(client.api, engine.docker_host()):
        return client.containers.create(image, command, **kwargs)
    from docker.models.containers import _create_container_args

    args = _create_container_args(dict(kwargs, image=image, command=command, version=client.api._version))
    args["host_config"].update(userns.host_config())
    return client.containers.get(client.api.create_container(**args)["Id"])


@contextmanager
def lent(env: Path, run_as: str) -> Iterator[None]:
    """The folders under `env` writable by the container's user while the block runs, and the host's again after.

    Only when kbundle runs as root and the container as nobody: the folders (made for this env
    or this build alone) are handed to nobody, never the files, which may be hard links into
    rattler's cache. Afterwards everything nobody made or was handed goes back to root. A
    non-root invoker is the container's user already, so nothing changes hands (and nothing is
    ever opened to every user)."""
    if run_as != NOBODY:
        yield
        return
    folders = [env, *(p for p in env.rglob("*") if p.is_dir() and not p.is_symlink())]
    for folder in folders:
        os.chown(folder, _NOBODY_ID, _NOBODY_ID)
    try:
        yield
    finally:
        for top, dirnames, filenames in os.walk(env):
            for name in [*dirnames, *filenames, ""]:
                path = os.path.join(top, name) if name else top
                if os.lstat(path).st_uid == _NOBODY_ID:
                    os.lchown(path, 0, 0)
