"""`kbundle gc` on an engine two users share, end to end: user A runs a bundle (kbundle builds
its image and records it for A), unregisters its kernel, and then B's gc must not touch the
image while A's gc removes it."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from helpers import pack_world_bundle, run_env_for, run_kbundle

pytestmark = pytest.mark.docker


def gc_plan(env: dict) -> dict:
    proc = run_kbundle(["gc", "--dry-run", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_second_users_gc_leaves_the_first_users_built_image(world, tmp_path, docker_client):
    alice, bob = run_env_for(tmp_path / "alice"), run_env_for(tmp_path / "bob")
    name = f"kbt-gcown-{uuid.uuid4().hex[:8]}"
    bundle = pack_world_bundle(world, alice, tmp_path / "sender", name)
    (tmp_path / "here").mkdir()
    proc = run_kbundle(["run", str(bundle), "--yes", "--json"], alice, cwd=tmp_path / "here", timeout=900)
    assert proc.returncode == 0, proc.stderr
    image = json.loads(proc.stdout)["image"]
    try:
        removed = run_kbundle(["kernels", "remove", f"kbundle-{name}"], alice)
        assert removed.returncode == 0, removed.stderr  # no kernel of A's uses the image now

        as_bob = gc_plan(bob)
        assert image not in {i["ref"] for i in as_bob["items"]}
        assert any("did not make for this user" in line for line in as_bob["kept"])
        swept = run_kbundle(["gc", "--yes", "--json"], bob)
        assert swept.returncode == 0, swept.stderr
        docker_client.api.inspect_image(image)  # still there

        as_alice = gc_plan(alice)
        assert image in {i["ref"] for i in as_alice["items"]}
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)


def _chain(docker_client, image: str) -> list[str]:
    from kbundle.image.chain import LABEL_STEPS, tags_of

    return tags_of((docker_client.api.inspect_image(image)["Config"].get("Labels") or {}).get(LABEL_STEPS, ""))


def _tags(docker_client) -> set[str]:
    return {t for i in docker_client.api.images() for t in i.get("RepoTags") or []}


def test_gc_removes_the_step_images_no_remaining_image_is_built_on(world, tmp_path, docker_client):
    """Two bundles of one environment share every step image; gc removes the steps only with the
    last image built on them, and after it."""
    alice = run_env_for(tmp_path / "alice")
    token = uuid.uuid4().hex[:8]
    # A base of this test's own (one label more), so that no other test's images are built on these steps.
    base = f"kbt-gcbase:{token}"
    docker_client.images.build(
        fileobj=__import__("io").BytesIO(f"FROM {world['base_image']}\nLABEL kbt.gc={token}\n".encode()),
        tag=base,
        rm=True,
    )
    images = []
    try:
        for name in (f"kbt-gcst-a-{token}", f"kbt-gcst-b-{token}"):
            bundle = pack_world_bundle(world, alice, tmp_path / name, name)
            (tmp_path / f"run-{name}").mkdir()
            args = ["run", str(bundle), "--yes", "--json", "--base-image", base, "--gpus", "none"]
            proc = run_kbundle(args, alice, cwd=tmp_path / f"run-{name}", timeout=900)
            assert proc.returncode == 0, proc.stderr
            images.append((name, json.loads(proc.stdout)["image"]))
        steps = _chain(docker_client, images[0][1])
        assert len(steps) == 5 and steps == _chain(docker_client, images[1][1])

        assert run_kbundle(["kernels", "remove", f"kbundle-{images[0][0]}"], alice).returncode == 0
        refs = [i["ref"] for i in gc_plan(alice)["items"]]
        assert images[0][1] in refs and not set(steps) & set(refs), refs  # the other image is built on them

        assert run_kbundle(["kernels", "remove", f"kbundle-{images[1][0]}"], alice).returncode == 0
        plan = gc_plan(alice)
        refs = [i["ref"] for i in plan["items"]]
        assert set(steps) <= set(refs), refs
        assert refs.index(images[1][1]) < min(refs.index(s) for s in steps)  # the image first, then its steps
        assert [r for r in refs if r in steps] == steps[::-1]  # top step first
        swept = run_kbundle(["gc", "--yes", "--json"], alice)
        assert swept.returncode == 0, swept.stderr
        left = _tags(docker_client)
        assert not (set(steps) | {images[0][1], images[1][1]}) & left, left
    finally:
        for ref in [i for _, i in images] + [base]:
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
