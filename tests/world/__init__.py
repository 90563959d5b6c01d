"""The offline world: a CUDA-base stand-in image and a real conda channel, built on this machine.

No container registry and no conda channel can be reached from our machines, so the
tests build their own:

* ``base_image``: Debian bookworm from ``debootstrap --variant=minbase``, imported into
  Docker. It stands in for an ``nvidia/cuda`` base (which is also a plain distro image).
* ``channel``: a conda channel indexed with py-rattler: one relocatable CPython per world Python
  (the running one and ``KBUNDLE_WORLD_PYTHONS``, default 3.7, found with pyenv or in
  /usr/bin), and for each the ipykernel, numpy, pip and dependencies that pip picks for it,
  converted from PyPI wheels.
* ``server``: the channel served over HTTP on 127.0.0.1, kept running between calls.
* ``pypi``: two PEP 503 simple indexes of tiny wheels (one with a ``+cu118`` local version)
  and a git repository of a tiny package, served over HTTP on 127.0.0.1.
* ``registry``: a container registry (Debian's ``docker-registry``) on 127.0.0.1, plain HTTP,
  deletes enabled, kept running between calls; ``docker push 127.0.0.1:PORT/name:tag`` works
  without daemon settings.
* ``slurm``: a one-node Slurm cluster (munged, slurmctld, slurmd as root, kept running between
  calls) whose node is this machine, partition ``debug``; Slurm's tools find it through ``SLURM_CONF``.
* ``gpu_box``: a STAND-IN GPU machine: a second Docker engine (its own socket, data root and
  bridge ``kbgpu0``) whose PATH holds a stand-in ``nvidia-container-runtime-hook``, so that
  ``--gpus`` requests take the engine's real NVIDIA path and land on two stand-in GPUs
  (``/dev/nvidia0``, ``/dev/nvidia1``: nodes nothing can open), each logged; it proves the
  requests and plumbing, not CUDA. ``up`` prints its socket as ``gpu_docker_host``.
* ``podman_box``: rootful Podman's Docker-compatible socket (``podman_host``, storage of its own)
  with a STAND-IN NVIDIA CDI spec in /var/run/cdi (``nvidia.com/gpu`` = ``0``, ``1``, ``all``),
  when podman is installed.
* ``podman_rootless``: a plain user's own ROOTLESS Podman service (``podman_rootless_host``, the
  socket under ``/run/user/UID``), with the user's own storage and the same stand-in CDI spec.
* ``env_image``: an image of kbundle's own making (its Dockerfile, installer and build
  context) with python, ipykernel and numpy, for the kernel tests.

Usage, from the repository's root::

    python -m tests.world up     # build or reuse; last stdout line is a JSON object
    python -m tests.world down   # remove what ``up`` made

``up`` is idempotent: a second call only checks that the parts are still there.
Set ``KBUNDLE_WORLD_DIR`` to move the cache (default ``~/.cache/kbundle-world``).
"""

from __future__ import annotations

import shutil

from .base_image import BASE_IMAGE, ensure_base_image, remove_base_image
from .channel import (
    PLACEHOLDER,
    RECIPE_VERSION,
    TOP_LEVEL,
    build_channel,
    ensure_channel,
    fingerprint,
    linux_virtual_packages,
    solve_and_install,
)
from .common import docker_client, log, platform_full, python_version, world_dir, world_python_versions
from .env_image import (
    ENV_PREFIX,
    ENV_SPECS,
    LABELS,
    build_image,
    ensure_env_image,
    render_dockerfile,
    write_env_context,
)
from .gpu_box import ensure_gpu_box, hook_log, stop_gpu_box
from .podman_box import copy_image, ensure_podman, stop_podman
from .podman_rootless import copy_image_rootless, ensure_podman_rootless, stop_podman_rootless
from .pypi import ensure_pypi, stop_pypi
from .registry import ensure_registry, stop_registry
from .server import DEFAULT_PORT, ensure_server, stop_server
from .slurm import ensure_slurm, stop_slurm

__all__ = [
    "BASE_IMAGE",
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "ENV_SPECS",
    "PLACEHOLDER",
    "RECIPE_VERSION",
    "TOP_LEVEL",
    "build_channel",
    "build_image",
    "copy_image",
    "copy_image_rootless",
    "docker_client",
    "down",
    "ensure_base_image",
    "ensure_channel",
    "ensure_env_image",
    "ensure_gpu_box",
    "ensure_podman",
    "ensure_podman_rootless",
    "ensure_pypi",
    "ensure_registry",
    "ensure_server",
    "ensure_slurm",
    "fingerprint",
    "hook_log",
    "linux_virtual_packages",
    "log",
    "platform_full",
    "python_version",
    "render_dockerfile",
    "solve_and_install",
    "stop_gpu_box",
    "stop_podman",
    "stop_podman_rootless",
    "stop_registry",
    "stop_slurm",
    "up",
    "world_dir",
    "write_env_context",
]


def up() -> dict:
    """Build what is missing, reuse the rest; the world as a JSON-able dict."""
    root = world_dir()
    root.mkdir(parents=True, exist_ok=True)
    channel = ensure_channel(root)
    base = ensure_base_image()
    url = ensure_server(root, channel)
    return {
        "base_image": base,
        "channel": url,
        "channel_path": str(channel),
        "channel_file_url": channel.as_uri(),
        "python": python_version(),
        "pythons": world_python_versions(),
        "world_dir": str(root),
        **ensure_pypi(root),
        **ensure_registry(root),
        **ensure_slurm(root),
        **ensure_gpu_box(root),
        **ensure_podman(root),
        **ensure_podman_rootless(root),
    }


def down() -> None:
    """Stop the servers and daemons, remove the world's images and its cached directory."""
    root = world_dir()
    stop_server(root)
    stop_pypi(root)
    stop_slurm(root)
    stop_registry(root)
    stop_gpu_box(root)
    stop_podman(root)
    stop_podman_rootless(root)
    try:
        client = docker_client()
        label = ",".join(f"{k}={v}" for k, v in LABELS.items())
        for image in client.images.list(filters={"label": label}):
            client.images.remove(image.id, force=True)
        remove_base_image(client)
    except Exception:
        pass
    shutil.rmtree(root, ignore_errors=True)
    log(f"removed {BASE_IMAGE} and {root}")
