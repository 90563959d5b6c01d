"""An interrupted or failed build leaves no intermediate container behind, and its cleanup
touches no container but its own (image/build.py `remove_build_containers`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_run_docker import KBUNDLE, _step_running, pack, rewrite_dockerfile

from kbundle.image.build import BUILD_MARK, remove_build_containers

pytestmark = pytest.mark.docker


@pytest.fixture
def env(tmp_path) -> dict:
    out = dict(os.environ)
    out["JUPYTER_DATA_DIR"] = str(tmp_path / "jupyter")
    out["KBUNDLE_CACHE_DIR"] = str(tmp_path / "cache")
    out.pop("JUPYTER_PATH", None)
    return out


def _marked(docker_client, container_id: str) -> list[str]:
    return docker_client.api.inspect_container(container_id)["HostConfig"].get("ExtraHosts") or []


def test_the_cleanup_removes_its_builds_containers_and_no_other(world, docker_client):
    ours, theirs = BUILD_MARK.format(uuid.uuid4().hex), BUILD_MARK.format(uuid.uuid4().hex)
    made = {}
    for mark in (ours, theirs, None):
        host_config = docker_client.api.create_host_config(extra_hosts={mark: "127.0.0.1"} if mark else None)
        made[mark] = docker_client.api.create_container(world["base_image"], "true", host_config=host_config)["Id"]
    try:
        assert ours in _marked(docker_client, made[ours])[0]
        removed = remove_build_containers(docker_client, ours, settle=5)
        assert removed == [made[ours]]
        left = {c["Id"] for c in docker_client.api.containers(all=True)}
        assert made[ours] not in left
        assert made[theirs] in left and made[None] in left
    finally:
        for container_id in made.values():
            try:
                docker_client.api.remove_container(container_id, force=True)
            except Exception:
                pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_build_leaves_no_created_or_exited_container(sig, world, env, tmp_path, docker_client):
    started = time.time() - 2
    name = f"kbk-{sig.name.lower()}-{uuid.uuid4().hex[:6]}"
    cache = dict(env, KBUNDLE_CACHE_DIR=str(tmp_path / "pack-cache"))
    source = pack(world, cache, tmp_path / "sender", name)
    step = f"RUN sleep 119 && echo {name}"
    bundle = rewrite_dockerfile(source, tmp_path / f"{name}.kbundle", name, step)
    logs = Path(env["KBUNDLE_CACHE_DIR"]) / "logs"
    proc = subprocess.Popen(
        [KBUNDLE, "run", str(bundle), "--base-image", world["base_image"], "--yes", "--use-bundled-dockerfile"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    log = None
    while log is None or not _step_running(docker_client, log, step):
        found = sorted(logs.glob(f"{name}-*.build.log")) if logs.exists() else []
        log = found[0] if found else None
        if proc.poll() is not None:
            pytest.fail(f"kbundle run ended before the RUN step ran: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the RUN step was not running after 180 s")
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    text = log.read_text()
    running_in = re.findall(r"---> Running in ([0-9a-f]+)", text)
    assert running_in, text
    parents = {docker_client.images.get(world["base_image"]).id.split(":")[-1][:12]}
    parents |= {m[:12] for m in re.findall(r"---> ([0-9a-f]{12,64})$", text, re.MULTILINE)}
    left = []
    for summary in docker_client.api.containers(all=True, filters={"status": ["created", "exited"]}):
        if summary["Created"] < started:
            continue
        info = docker_client.api.inspect_container(summary["Id"])
        ours = any(summary["Id"].startswith(c) for c in running_in)
        marked = any(h.startswith("kbundle-build-") for h in info["HostConfig"].get("ExtraHosts") or [])
        from_build = info["Image"].split(":")[-1][:12] in parents and marked
        if ours or from_build:
            left.append((summary["Id"][:12], summary["State"], summary.get("Command")))
    assert not left, f"the interrupted build left containers: {left}"


def _descends_from(docker_client, image_id: str, base_id: str) -> bool:
    import docker

    try:
        return any(h.get("Id") == base_id for h in docker_client.api.history(image_id))
    except docker.errors.DockerException:
        return False


def test_an_interrupted_group_step_leaves_no_container_no_dangling_image_and_no_partial_step(
    world, env, tmp_path, docker_client
):
    """The acceptance test of the chain (image/chain.py): SIGINT while a group's step builds."""
    from helpers import pack_world_bundle, run_kbundle
    from kbundle.image.chain import LABEL_STEP, LABEL_STEPS, STEP_REPO, tags_of

    made: list[str] = []
    token = uuid.uuid4().hex[:8]
    base = f"kbt-intbase:{token}"  # a base of its own: every step is built here, none found
    docker_client.images.build(
        fileobj=__import__("io").BytesIO(f"FROM {world['base_image']}\nLABEL kbt.int={token}\n".encode()), tag=base
    )
    base_id = docker_client.images.get(base).id
    name = f"kbt-intstep-{token}"
    bundle = pack_world_bundle(world, dict(env, KBUNDLE_CACHE_DIR=str(tmp_path / "pack-cache")), tmp_path / "s", name)
    logs = Path(env["KBUNDLE_CACHE_DIR"]) / "logs"
    started = time.time() - 2
    args = [KBUNDLE, "run", str(bundle), "--base-image", base, "--gpus", "none", "--yes"]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while True:  # the python group (numpy, ipykernel ...) is the biggest: interrupt while it is sent or built
            text = "".join(p.read_text() for p in logs.glob(f"{name}-*.build.log")) if logs.exists() else ""
            if re.search(r"# ---- step python: \S+ \(built\)", text):
                break
            if proc.poll() is not None:
                pytest.fail(f"kbundle run ended before the python step was built: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("the python step was not built after 600 s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err

        mine = [
            c
            for c in docker_client.api.containers(all=True, filters={"status": ["created", "exited"]})
            if c["Created"] >= started and _descends_from(docker_client, c["ImageID"], base_id)
        ]
        assert not mine, f"the interrupted step left containers: {mine}"
        dangling = [
            i["Id"]
            for i in docker_client.api.images(filters={"dangling": True})
            if i["Created"] >= started and _descends_from(docker_client, i["Id"], base_id)
        ]
        assert not dangling, f"the interrupted step left untagged images: {dangling}"
        steps = [
            i
            for i in docker_client.api.images()
            if any(t.startswith(STEP_REPO + "/") for t in i.get("RepoTags") or [])
            and _descends_from(docker_client, i["Id"], base_id)
        ]
        assert {(i.get("Labels") or {}).get(LABEL_STEP) for i in steps} <= {"base", "cuda", "framework"}, steps
        # every step tag names a complete step: its labels come with the build's last instruction
        assert all((i.get("Labels") or {}).get(LABEL_STEP) for i in steps), steps

        (tmp_path / "again").mkdir()
        again = run_kbundle(args[1:] + ["--json"], env, cwd=tmp_path / "again", timeout=900)
        assert again.returncode == 0, again.stderr
        made.append(json.loads(again.stdout)["image"])
        assert re.search(r"step cuda: \S+ is on this engine already", again.stderr), again.stderr
        assert re.search(r"step python: built", again.stderr), again.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        for image in made:
            labels = docker_client.api.inspect_image(image)["Config"].get("Labels") or {}
            subprocess.run(
                ["docker", "rmi", "-f", image, *reversed(tags_of(labels.get(LABEL_STEPS, "")))], capture_output=True
            )
        subprocess.run(["docker", "rmi", "-f", base], capture_output=True)
