"""An image with a real environment for the kernel tests, built through kbundle's own code.

The Dockerfile is kbundle's (``kbundle.pack.dockerfile.render``), the environment is
resolved and installed by ``kbundle.image.env`` from the world's channel, and the build
context is laid out by ``kbundle.image.context``: the kernel tests run on an image as
kbundle makes one (the env at ``contract.PREFIX``, the activating ENTRYPOINT, the
unprivileged default user, WORKDIR ``contract.WORK``). Unlike ``kbundle run``, the env is
not byte-compiled: some launcher tests need an env without ``.pyc`` (like a bare rattler
install).

The tag is a hash of the rendered Dockerfile, the resolved env's content hash, the
activation script and the base image's id, so a later call reuses the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kbundle import contract

from .common import docker_client, log, python_version, world_dir

ENV_PREFIX = contract.PREFIX
# What tests install with the plain-rattler `solve_and_install` (no kbundle code involved).
ENV_SPECS = [f"python {python_version()}.*", "ipykernel", "numpy"]
ENV_NAME = "world-env"
REPOSITORY = "kbundle-world/env"
LABELS = {"kbundle.world": "1"}  # `down` removes every image that carries it


def env_dependencies(python: str) -> tuple[str, ...]:
    return (f"python={python}", "ipykernel", "numpy")


def render_dockerfile(base_image: str, python: str) -> str:
    """kbundle's Dockerfile for a CPU image of the world's env, with nothing in work/ and no pip step."""
    from kbundle import __version__
    from kbundle.bundle.format import FORMAT_VERSION
    from kbundle.pack.dockerfile import DockerfileInputs, render

    return render(
        DockerfileInputs(
            name=ENV_NAME,
            kbundle_version=__version__,
            format_version=FORMAT_VERSION,
            content_hash=ENV_NAME,
            notebook="",
            python=python,
            cuda=None,
            cudnn=None,
            runtime_in_env=False,
            env_libs=False,
            base_image=base_image,
            base_reason="the offline test world's Debian bookworm, standing in for nvidia/cuda",
            require_cuda=None,
            pip=False,
        )
    )


def write_context(context: Path, dockerfile: str) -> None:
    """The parts of the context besides the env: the Dockerfile, the activation script, an empty work/;
    and the installed env/ split into the Dockerfile's layer folders."""
    from kbundle.image.context import stage_layers, write_static

    context.mkdir(parents=True, exist_ok=True)
    write_static(context, dockerfile)
    stage_layers(context)
    (context / contract.CONTEXT_WORK).mkdir(exist_ok=True)


def write_env_context(context: Path, base_image: str, staging_env: Path, python: str | None = None) -> None:
    """A build context of kbundle's layout around an env already installed for ENV_PREFIX in ``staging_env``."""
    from kbundle.image.context import env_dir

    env = env_dir(context)
    if env.exists():
        shutil.rmtree(env)
    shutil.copytree(staging_env, env, symlinks=True)
    write_context(context, render_dockerfile(base_image, python or python_version()))


def build_image(context: Path, tag: str, labels: dict[str, str] | None = None) -> str:
    """Build ``context`` with the docker SDK's low-level API; the tag is applied only when the build succeeds."""
    client = docker_client()
    tail: deque[str] = deque(maxlen=20)
    for event in client.api.build(
        path=str(context), tag=tag, rm=True, forcerm=True, pull=False, decode=True, labels=labels or {}
    ):
        if "stream" in event:
            tail.extend(line for line in event["stream"].splitlines() if line.strip())
        if "error" in event:
            raise RuntimeError(f"building {tag} failed: {event['error'].strip()}\n" + "\n".join(tail))
    client.images.get(tag)  # raises when the build ended without tagging
    return tag


@contextmanager
def _kbundle_cache(root: Path) -> Iterator[None]:
    """kbundle's cache in the world's directory while the env is resolved and installed: its package
    cache is then the one `solve_and_install` fills, and `down` removes it with the rest."""
    saved = os.environ.get("KBUNDLE_CACHE_DIR")
    os.environ["KBUNDLE_CACHE_DIR"] = str(root)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KBUNDLE_CACHE_DIR", None)
        else:
            os.environ["KBUNDLE_CACHE_DIR"] = saved


def image_tag(dockerfile: str, env_hash: str, base_id: str) -> str:
    payload = json.dumps(
        {
            "dockerfile": dockerfile,
            "env": env_hash,
            "base_id": base_id,
            "activate": hashlib.sha256(contract.activate_script().read_bytes()).hexdigest(),
        },
        sort_keys=True,
    )
    return f"{REPOSITORY}:{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def ensure_env_image(info: dict) -> str:
    """An image FROM the world's base with python, ipykernel and numpy at ENV_PREFIX; cached by tag.

    Its ENTRYPOINT activates the env, so ``docker run TAG python ...`` runs the env's interpreter."""
    import docker

    from kbundle.facts import glibc_for
    from kbundle.image import context as contextmod
    from kbundle.image import env as envmod

    base, python = info["base_image"], info["python"]
    client = docker_client()
    dockerfile = render_dockerfile(base, python)
    root = world_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _kbundle_cache(root):
        resolved = envmod.resolve(
            envmod.EnvSpec(
                channels=(info["channel"],),
                dependencies=env_dependencies(python),
                target=tuple(contract.target_virtual_packages(glibc_for(base), None)),
            )
        )
        tag = image_tag(dockerfile, resolved.content_hash, client.images.get(base).id)
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        with contextmod.temporary_context("world-env") as ctx:
            log(f"installing {resolved.count} packages ({' '.join(env_dependencies(python))}) for {ENV_PREFIX}")
            envmod.install(resolved, contextmod.env_dir(ctx))  # not byte-compiled, on purpose
            write_context(ctx, dockerfile)
            log(f"building {tag} from kbundle's Dockerfile")
            build_image(ctx, tag, LABELS)
    return tag
