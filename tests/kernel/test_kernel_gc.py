"""`kbundle gc` against the real engine. Only the items these tests create are ever removed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kbundle import contract
from kbundle.image import ledger
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


@pytest.fixture
def mine(tmp_path, monkeypatch):
    """This test's user: its own Jupyter data dir (kernels and image ledger) and kbundle cache."""
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    return dict(os.environ)


@contextlib.contextmanager
def kbundle_working(env: dict[str, str]):
    """Another kbundle process of the same user, busy (it holds activity.py's mark) for the block."""
    code = "from kbundle import activity; activity.hold(create=True); print('held', flush=True); import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.kill()
        proc.wait()


def test_plan_lists_only_leftovers_and_apply_removes_them(docker_client, env_image, made, tmp_path, mine):
    host = socket.gethostname()
    me = os.getpid()
    dead = kernel_container(docker_client, env_image, made, dead_pid(), "", host)
    reused = kernel_container(docker_client, env_image, made, me, "1", host)  # pid now someone else's
    alive = kernel_container(docker_client, env_image, made, me, process_start(me), host)
    elsewhere = kernel_container(docker_client, env_image, made, dead_pid(), "", "another-host")

    unused = labelled_image(docker_client, env_image, "kbundle-test/gc-unused:1", made)
    used = labelled_image(docker_client, env_image, "kbundle-test/gc-used:1", made)
    for tag in (unused, used):
        ledger.record(docker_client.api.inspect_image(tag)["Id"], ledger.BUILT, "gc-test", tag)
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

    with kbundle_working(mine):  # a fresh context may be a running build's
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


def _gc_json(env: dict[str, str], *extra: str) -> dict:
    proc = subprocess.run(
        [KBUNDLE, "gc", "--dry-run", "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_gc_under_a_second_users_data_dir_leaves_the_first_users_images(docker_client, env_image, made, tmp_path):
    """A shared engine: what user A made is never a candidate for user B's gc, only for A's."""
    image = labelled_image(docker_client, env_image, "kbundle-test/gc-user-a:1", made)
    users = {}
    for user in ("a", "b"):
        users[user] = dict(
            os.environ, JUPYTER_DATA_DIR=str(tmp_path / user / "jupyter"), KBUNDLE_CACHE_DIR=str(tmp_path / user / "c")
        )
    recorder = (
        "import sys; from kbundle.image import ledger; ledger.record(sys.argv[1], ledger.BUILT, 'a', sys.argv[2])"
    )
    image_id = docker_client.api.inspect_image(image)["Id"]
    subprocess.run([sys.executable, "-c", recorder, image_id, image], env=users["a"], check=True)

    as_b = _gc_json(users["b"])
    assert image not in {i["ref"] for i in as_b["items"]}
    assert any("did not make for this user" in line for line in as_b["kept"])
    as_a = _gc_json(users["a"])
    assert image in {i["ref"] for i in as_a["items"]}

    removed = subprocess.run(
        [KBUNDLE, "gc", "--yes", "--json"], capture_output=True, text=True, timeout=120, env=users["b"]
    )
    assert removed.returncode == 0, removed.stderr
    assert docker_client.api.images(name="kbundle-test/gc-user-a"), "user B's gc removed user A's image"


def test_an_image_with_a_registry_tag_is_kept_unless_asked(docker_client, env_image, made, mine):
    image = labelled_image(docker_client, env_image, "kbundle-test/gc-pushed:1", made)
    pushed_tag = "127.0.0.1:5999/lab/gc-pushed:1"
    docker_client.api.tag(image, "127.0.0.1:5999/lab/gc-pushed", "1")
    made["images"].append(pushed_tag)
    ledger.record(docker_client.api.inspect_image(image)["Id"], ledger.BUILT, "gc-pushed", image)

    plain = _gc_json(mine)
    assert not {image, pushed_tag} & {i["ref"] for i in plain["items"]}
    assert any("registry tag" in line for line in plain["kept"])
    asked = _gc_json(mine, "--pushed")
    assert {image, pushed_tag} <= {i["ref"] for i in asked["items"]}


def _build_quietly(context: Path) -> None:
    import docker

    client = docker.from_env(timeout=600)  # its own connection: the stream must outlive the test's calls
    try:
        for _ in client.api.build(path=str(context), rm=True, decode=True):
            pass
    except Exception:
        pass  # the test kills it


def test_a_killed_builds_step_image_is_found_and_a_running_builds_is_not(docker_client, world, tmp_path):
    """The legacy builder commits each step; killing the build leaves the last one untagged."""
    dockerfile = f"FROM {world['base_image']}\nRUN mkdir -p /opt/kbundle/gc-step && echo {tmp_path.name} > /opt/kbundle/gc-step/x\nRUN sleep 300\n"
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(dockerfile)
    before = {c["Id"] for c in docker_client.api.containers(all=True)}
    build = threading.Thread(target=_build_quietly, args=(tmp_path / "ctx",), daemon=True)
    build.start()
    step_container = None
    try:
        deadline = time.time() + 120
        while step_container is None and time.time() < deadline:
            running = [c for c in docker_client.api.containers() if c["Id"] not in before]
            step_container = next((c for c in running if "sleep 300" in (c.get("Command") or "")), None)
            time.sleep(0.2)
        assert step_container, "the build never reached its sleeping step"
        step_image = step_container["ImageID"]
        later = time.time() + G.STEP_GRACE_S + 1
        busy = G.plan_gc(docker_client, kernels=[], now=later, temp_dir=tmp_path / "none")
        assert step_image not in {i.ref for i in busy.items}, "a running build's step image was planned"

        with contextlib.suppress(Exception):  # the build dies as a killed one does
            docker_client.api.kill(step_container["Id"])
        build.join(timeout=60)
        orphaned = G.plan_gc(docker_client, kernels=[], now=later, temp_dir=tmp_path / "none")
        planned = [i for i in orphaned.items if "interrupted kbundle build" in i.reason]
        assert step_image in {i.ref for i in planned}
        assert {i.ref for i in planned if i.kind == G.CONTAINER} <= {step_container["Id"]}
        result = G.apply_gc(G.GcPlan(planned), docker_client)
        assert not result.failed
        assert not any(i["Id"] == step_image for i in docker_client.api.images(all=True))
        assert not any(c["Id"] == step_container["Id"] for c in docker_client.api.containers(all=True))
    finally:
        if step_container is not None:  # only this build's own: other tests share the engine
            with contextlib.suppress(Exception):  # the builder may remove it first
                docker_client.api.remove_container(step_container["Id"], force=True)


def test_temporary_folders_of_killed_runs_go_once_no_run_is_active(tmp_path, mine):
    temp = tmp_path / "tmp"
    (temp / "kbundle-resolve-abc").mkdir(parents=True)
    (temp / "kbundle-resolve-abc" / "report.json").write_text("{}")
    (temp / "someone-elses").mkdir()
    built = Path(mine["KBUNDLE_CACHE_DIR"]) / "built" / "build-xyz"
    built.mkdir(parents=True)

    with kbundle_working(mine):
        busy = {i.ref for i in G.plan_gc(None, kernels=[], temp_dir=temp).items}
    assert str(temp / "kbundle-resolve-abc") not in busy and str(built) not in busy
    idle = G.plan_gc(None, kernels=[], temp_dir=temp)
    refs = {i.ref for i in idle.items}
    assert {str(temp / "kbundle-resolve-abc"), str(built)} <= refs
    assert str(temp / "someone-elses") not in refs
    G.apply_gc(G.GcPlan([i for i in idle.items if i.ref.startswith(str(tmp_path))]), None)
    assert not (temp / "kbundle-resolve-abc").exists() and (temp / "someone-elses").exists()


def test_throwaway_containers_a_killed_run_left_are_planned_and_working_ones_are_not(
    docker_client, world, made, tmp_path
):
    def throwaway(command: list[str]) -> str:
        cid = docker_client.api.create_container(
            world["base_image"], command=command, labels={contract.LABEL_BYTECODE: "1", "kbundle.test": "1"}
        )["Id"]
        made["containers"].append(cid)
        return cid

    stopped = throwaway(["true"])  # a killed run's byte-compile container, never started or long done
    working = throwaway(["sleep", "120"])
    docker_client.api.start(working)
    plan = G.plan_gc(docker_client, kernels=[], temp_dir=tmp_path / "none")
    reasons = {i.ref: i.reason for i in plan.items}
    assert "bytecode container a killed run left" in reasons.get(stopped, "")
    assert working not in reasons
    later = G.plan_gc(docker_client, kernels=[], now=time.time() + G.STALE_AFTER_S + 60, temp_dir=tmp_path / "none")
    assert working in {i.ref for i in later.items}
