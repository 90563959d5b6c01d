"""One identity for the whole bundle: a copy whose manifest says another pip section is another bundle.

The attack: a stranger takes an honest bundle, keeps every member (so the content hash stays the
same) and edits only the manifest's `pip` list. Everything `run` keyed by the content hash (the
recorded pip resolution, the image's label, the kernel record) was then shared between the two,
so the honest bundle, run after the stranger's copy, installed the stranger's packages. The real
CLI, the real engine and the world's PEP 503 index on 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from pathlib import Path

import pytest

from helpers import run_kbundle

pytestmark = pytest.mark.docker

kbundle = functools.partial(run_kbundle, timeout=900)
NOTEBOOK = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture
def env(tmp_path) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "JUPYTER_PATH")}
    out.update(
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),
        KBUNDLE_CACHE_DIR=str(tmp_path / "cache"),
        PIP_CONFIG_FILE=os.devnull,  # the world's index only
        PIP_FIND_LINKS="",
    )
    return out


def pack_honest(world, env, folder: Path, name: str) -> Path:
    """A bundle whose pip: section (`kbrange==1.0`, left for the recipient: --lock never) is honest."""
    folder.mkdir()
    (folder / f"{name}.ipynb").write_text(json.dumps(NOTEBOOK))
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - pip:\n    - --index-url {world['pypi_index']}\n    - kbrange==1.0\n"
    )
    out = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--lock", "never", "--base-image", world["base_image"]]
    proc = kbundle([*args, "-o", out], env, folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def strangers_copy(honest: Path, out: Path) -> Path:
    """The same members, the manifest's pip section edited (and any stored identity dropped, as an
    older kbundle wrote it, so that the reader must work the identity out from the fields)."""
    from bundle.bundlekit import edit_manifest  # tests/bundle/: real bundles, edited member by member

    def edit(doc: dict) -> None:
        doc["pip"] = ["kbrange==2.0"]
        doc.pop("bundle_hash", None)

    return edit_manifest(honest, out, edit)


def run(env, bundle: Path, cwd: Path, *extra: str) -> dict:
    cwd.mkdir(exist_ok=True)
    proc = kbundle(["run", bundle, "--gpus", "none", "--json", "--yes", *extra], env, cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def kbrange_in(docker_client, image: str) -> str:
    out = docker_client.containers.run(
        image, ["python", "-c", "import kbrange; print(kbrange.__version__)"], network_disabled=True, remove=True
    )
    return out.decode().strip()


def test_a_copy_with_another_pip_section_gets_its_own_identity_image_and_resolution(
    world, env, tmp_path, docker_client
):
    from kbundle.bundle import open_bundle
    from kbundle.errors import KbundleError
    from kbundle.flows.run import bundle_hash
    from kbundle.image.registry import check_labels

    name = f"kbid-{uuid.uuid4().hex[:8]}"
    honest = pack_honest(world, env, tmp_path / "sender", name)
    copy = strangers_copy(honest, tmp_path / "copy.kbundle")
    ours, theirs = open_bundle(honest), open_bundle(copy)
    assert ours.content_hash == theirs.content_hash  # the members are the same: only the manifest differs

    images = []
    try:
        # The honest bundle runs, then the stranger's copy (under another kernel name), then the
        # honest bundle again: its image is reused, and what the kernel records must still be its own.
        good = run(env, honest, tmp_path / "r1")
        images.append(good["image"])
        stranger = run(env, copy, tmp_path / "r2", "--name", f"{name}-copy")
        images.append(stranger["image"])
        again = run(env, honest, tmp_path / "r1")

        # Each gets its own packages, and the record of them.
        assert [line.split(" ")[0] for line in good["pip_resolved"]] == ["kbrange==1.0"]
        assert kbrange_in(docker_client, good["image"]) == "1.0"
        assert [line.split(" ")[0] for line in stranger["pip_resolved"]] == ["kbrange==2.0"]
        assert kbrange_in(docker_client, stranger["image"]) == "2.0"
        assert again["built"] is False and again["image"] == good["image"]
        assert [line.split(" ")[0] for line in again["pip_resolved"]] == ["kbrange==1.0"]

        # Two identities, two images, each labelled with its own bundle's identity: `run --image`
        # (and a Slurm node, which checks the same label) tells them apart.
        assert bundle_hash(ours) != bundle_hash(theirs) and good["image"] != stranger["image"]
        labels = {i: docker_client.images.get(i).labels["org.kbundle.content-hash"] for i in images}
        assert labels[good["image"]] == bundle_hash(ours) and labels[stranger["image"]] == bundle_hash(theirs)
        check_labels({"org.kbundle.content-hash": labels[good["image"]]}, bundle_hash(ours), "honest")
        with pytest.raises(KbundleError, match="was built from another bundle"):
            check_labels({"org.kbundle.content-hash": labels[stranger["image"]]}, bundle_hash(ours), "copy")

        # The kernels record each bundle's identity.
        listed = {k["name"]: k for k in json.loads(kbundle(["kernels", "list", "--json"], env, tmp_path).stdout)}
        assert listed[f"kbundle-{name}"]["bundle_hash"] == bundle_hash(ours)
        assert listed[f"kbundle-{name}-copy"]["bundle_hash"] == bundle_hash(theirs)
    finally:
        for image in images:
            docker_client.images.remove(image, force=True)


def test_the_copy_under_the_honest_kernel_name_is_another_bundle(world, env, tmp_path, docker_client):
    """Without --name, the copy may not silently take over the honest bundle's kernel."""
    name = f"kbid-{uuid.uuid4().hex[:8]}"
    honest = pack_honest(world, env, tmp_path / "sender", name)
    copy = strangers_copy(honest, tmp_path / "copy.kbundle")
    good = run(env, honest, tmp_path / "r1")
    try:
        (tmp_path / "r2").mkdir()
        proc = kbundle(["run", copy, "--gpus", "none", "--yes"], env, tmp_path / "r2")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "already runs another bundle" in errors[0], proc.stderr
    finally:
        docker_client.images.remove(good["image"], force=True)
