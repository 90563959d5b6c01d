"""`kbundle gc` against the real engine. Only the items these tests create are ever removed."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kbundle import contract
from kbundle.kernel import gc as G
from kbundle.kernel.labels import process_start
from kbundle.kernel.spec import KernelRecord

pytestmark = pytest.mark.docker

KBUNDLE = str(Path(sys.executable).parent / "kbundle")


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def made(docker_client, env_image):
    """Containers and images made by a test, removed afterwards whatever happened."""
    things = {"containers": [], "images": []}
    yield things
    for cid in things["containers"]:
        try:
            docker_client.api.remove_container(cid, force=True)
        except Exception:
            pass
    for tag in things["images"]:
        try:
            docker_client.api.remove_image(tag, force=True)
        except Exception:
            pass


def kernel_container(client, image: str, made, pid: int, start: str, host: str) -> str:
    labels = {
        contract.LABEL_KERNEL: "1",
        contract.LABEL_KERNEL_NAME: "kbundle-gc-test",
        contract.LABEL_LAUNCHER_PID: str(pid),
        contract.LABEL_LAUNCHER_START: start,
        contract.LABEL_LAUNCHER_HOST: host,
        "kbundle.test": "1",
    }
    cid = client.api.create_container(
        image,
        command=["python", "-c", "import time; time.sleep(300)"],
        labels=labels,
        host_config=client.api.create_host_config(init=True),
    )["Id"]
    made["containers"].append(cid)
    client.api.start(cid)
    return cid


def labelled_image(client, base: str, tag: str, made) -> str:
    dockerfile = f"FROM {base}\nLABEL kbundle.bundle_hash=sha256:{tag.replace(':', '-')} kbundle.test=1\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    made["images"].append(tag)
    return tag


def test_plan_lists_only_leftovers_and_apply_removes_them(docker_client, env_image, made, tmp_path):
    host = socket.gethostname()
    me = os.getpid()
    dead = kernel_container(docker_client, env_image, made, dead_pid(), "", host)
    reused = kernel_container(docker_client, env_image, made, me, "1", host)  # pid now someone else's
    alive = kernel_container(docker_client, env_image, made, me, process_start(me), host)
    elsewhere = kernel_container(docker_client, env_image, made, dead_pid(), "", "another-host")

    unused = labelled_image(docker_client, env_image, "kbundle-test/gc-unused:1", made)
    used = labelled_image(docker_client, env_image, "kbundle-test/gc-used:1", made)
    kernels = [KernelRecord("kbundle-gc-used", "used (kbundle)", tmp_path, used, "h", [], str(tmp_path))]

    contexts = tmp_path / "contexts"
    old, fresh = contexts / "old-ctx", contexts / "fresh-ctx"
    for d in (old, fresh):
        (d / "env").mkdir(parents=True)
        (d / "Dockerfile").write_text("FROM x\n")
    day_ago = time.time() - 24 * 3600
    for p in (old / "env", old / "Dockerfile", old):
        os.utime(p, (day_ago, day_ago))

    pycaches = tmp_path / "pycache"
    for image in (used, unused):
        d = pycaches / image.replace("/", "-").replace(":", "-")
        (d / "opt").mkdir(parents=True)
        (d / "image.txt").write_text(image + "\n")
    used_cache, unused_cache = (
        str((pycaches / i.replace("/", "-").replace(":", "-")).resolve()) for i in (used, unused)
    )

    plan = G.plan_gc(docker_client, kernels=kernels, host=host, contexts_dir=contexts, pycache_dir=pycaches)
    refs = {i.ref for i in plan.items}
    assert {dead, reused} <= refs
    assert not {alive, elsewhere, used} & refs
    assert unused in refs
    assert str(old.resolve()) in refs and str(fresh.resolve()) not in refs
    assert next(i for i in plan.items if i.ref == str(old.resolve())).size == len("FROM x\n")
    assert unused_cache in refs and used_cache not in refs

    mine_refs = {dead, reused, unused, str(old.resolve()), unused_cache}
    mine = G.GcPlan([i for i in plan.items if i.ref in mine_refs])
    result = G.apply_gc(mine, docker_client)
    assert not result.failed
    assert {i.ref for i in result.removed} == mine_refs
    assert not Path(unused_cache).exists() and Path(used_cache).exists()
    remaining = {c["Id"] for c in docker_client.api.containers(all=True, filters={"label": "kbundle.test=1"})}
    assert dead not in remaining and reused not in remaining and alive in remaining
    assert not docker_client.api.images(name="kbundle-test/gc-unused")
    assert docker_client.api.images(name="kbundle-test/gc-used")
    assert not old.exists() and fresh.exists()


def test_cli_lists_and_refuses_to_remove_without_yes(docker_client, env_image, made):
    dead = kernel_container(docker_client, env_image, made, dead_pid(), "", socket.gethostname())
    listed = subprocess.run(
        [KBUNDLE, "gc", "--dry-run", "--json"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert dead in {i["ref"] for i in data["items"]} and data["removed"] == [] and data["dry_run"] is True

    refused = subprocess.run([KBUNDLE, "gc"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "--yes" in refused.stderr and "Traceback" not in refused.stderr
    assert docker_client.api.inspect_container(dead)["State"]["Running"]  # nothing removed
