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
