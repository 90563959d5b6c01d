"""`kbundle gc` and `kbundle kernels remove --image` on the engine a kernel was registered against.

A kernel registered while DOCKER_HOST named the world's GPU box records that engine in its
kernelspec (kernel/spec.py). gc, run later from a shell without DOCKER_HOST, must still find that
kernel's image there (and keep it) and the user's unused kbundle image there (and remove it);
`kernels remove --image` must remove the image from the GPU box, not look for it on the default
engine. The images are two tiny kbundle-labelled images built on the box, in this test's own
ledger (image/ledger.py, under its own Jupyter data dir), so nothing else is ever a candidate.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import pytest

from helpers import environ, run_kbundle
from kbundle import contract
from kbundle.image import ledger
from kbundle.kernel.spec import KernelRequest, install_kernelspec


def _build(box, base: str, tag: str) -> str:
    """A kbundle-labelled image (a content hash of its own) on the box: its id."""
    dockerfile = f"FROM {base}\nLABEL {contract.LABEL_CONTENT_HASH}=sha256:{uuid.uuid4().hex}\n"
    image, _ = box.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    return image.id


def test_gc_and_remove_find_a_kernels_image_on_its_recorded_engine(world, tmp_path):
    if "gpu_docker_host" not in world:
        pytest.skip(f"the world has no GPU box: {world.get('gpu_box_error', 'unknown')}")
    import docker

    host = world["gpu_docker_host"]
    box = docker.DockerClient(base_url=host, timeout=600)
    suffix = uuid.uuid4().hex[:8]
    kept, unused = f"kbundle/gc-kept-{suffix}:1", f"kbundle/gc-unused-{suffix}:1"
    data = tmp_path / "jupyter"
    env = dict(os.environ, JUPYTER_DATA_DIR=str(data), KBUNDLE_CACHE_DIR=str(tmp_path / "cache"))
    env.update(TMPDIR=str(tmp_path / "tmp"))  # gc sweeps kbundle's temp folders: only this test's
    (tmp_path / "tmp").mkdir()
    env.pop("DOCKER_HOST", None)
    env.pop("JUPYTER_PATH", None)
    try:
        with environ(JUPYTER_DATA_DIR=str(data), DOCKER_HOST=host):  # as `kbundle run` against the box
            for tag in (kept, unused):
                ledger.record(_build(box, world["base_image"], tag), "built", tag=tag)
            install_kernelspec(KernelRequest("kbundle-gc-box", "gc box", kept, str(tmp_path), [], "h"))

        planned = run_kbundle(["gc", "--dry-run", "--json"], env, cwd=tmp_path)
        assert planned.returncode == 0, planned.stderr
        images = {i["ref"]: i["engine"] for i in json.loads(planned.stdout)["items"] if i["kind"] == "image"}
        assert images.get(unused) == host and kept not in images, images

        swept = run_kbundle(["gc", "--yes", "--json"], env, cwd=tmp_path)
        assert swept.returncode == 0, swept.stderr
        assert unused in [i["ref"] for i in json.loads(swept.stdout)["removed"]]
        assert not box.images.list(name=unused.split(":")[0]) and box.images.get(kept)

        removed = run_kbundle(["kernels", "remove", "kbundle-gc-box", "--image", "--json"], env, cwd=tmp_path)
        assert removed.returncode == 0, removed.stderr
        assert json.loads(removed.stdout)["image_removed"] is True
        assert not box.images.list(name=kept.split(":")[0])
    finally:
        for tag in (kept, unused):
            try:
                box.images.remove(tag, force=True)
            except docker.errors.DockerException:
                pass
