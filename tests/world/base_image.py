"""The base image: Debian bookworm from ``debootstrap --variant=minbase``, imported into Docker.

It stands in for an ``nvidia/cuda`` base (which is also a plain distro image). Cached by
its tag: an engine that has the tag is not asked to build it again.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .common import docker_client, log

BASE_IMAGE = "kbundle-world/base:bookworm"
SUITE = "bookworm"


def ensure_base_image() -> str:
    client = docker_client()
    try:
        client.images.get(BASE_IMAGE)
        return BASE_IMAGE
    except Exception:
        pass
    if not shutil.which("debootstrap"):
        raise SystemExit("error: debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="kbundle-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap --variant=minbase {SUITE} (about 40 s)")
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs)], check=True, stdout=subprocess.DEVNULL)
        # Keep the image small: package lists and docs are not needed to run a kernel.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / sub, ignore_errors=True)
        log(f"docker import → {BASE_IMAGE}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        data = tar.stdout.read()
        tar.wait()
        client.api.import_image_from_data(
            data, repository=BASE_IMAGE.split(":")[0], tag=BASE_IMAGE.split(":")[1], changes=['CMD ["/bin/bash"]']
        )
    return BASE_IMAGE


def remove_base_image(client) -> None:
    client.images.remove(BASE_IMAGE, force=True)
