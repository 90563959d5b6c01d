"""Nothing half-done: a run that fails, is declined or is interrupted leaves nothing on disk or in the engine.

Each test packs a small bundle against the offline world, runs it in a fresh cwd, kbundle cache
and Jupyter data dir, and checks afterwards: no `./<name>/`, no build context, no kernel, no
image tagged for it, and no untagged image its build committed.
"""

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
from test_run_docker import KBUNDLE, _step_running, assert_clean_error, kbundle, pack, rewrite_dockerfile

from helpers import answer_on_a_terminal

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def source_bundle(world, tmp_path_factory) -> Path:
    """One locked bundle of the world's channel; tests rename or rewrite it."""
    env = dict(os.environ, KBUNDLE_CACHE_DIR=str(tmp_path_factory.mktemp("pack-cache")))
    return pack(world, env, tmp_path_factory.mktemp("sender"), f"kbc-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def env(tmp_path) -> dict:
    out = dict(os.environ)
    out["JUPYTER_DATA_DIR"] = str(tmp_path / "jupyter")
    out["KBUNDLE_CACHE_DIR"] = str(tmp_path / "cache")
    out.pop("JUPYTER_PATH", None)
    return out


def assert_nothing_left(cwd: Path, name: str, env: dict, docker_client, log_text: str = "") -> None:
    assert not (cwd / name).exists(), f"./{name}/ was left behind"
    contexts = Path(env["KBUNDLE_CACHE_DIR"]) / "contexts"
    assert not (contexts.exists() and list(contexts.iterdir())), "a build context was left behind"
    assert not docker_client.images.list(name=f"kbundle/{name}"), "an image was tagged"
    kernels = Path(env["JUPYTER_DATA_DIR"]) / "kernels"
    assert not (kernels.exists() and list(kernels.iterdir())), "a kernel was registered"
    for image_id in committed_layers(log_text):
        import docker

        try:
            image = docker_client.images.get(image_id)
        except docker.errors.ImageNotFound:
            continue
        assert image.tags, f"the build's untagged image {image_id} was left in the engine"


def committed_layers(log: str) -> list[str]:
    """Images a legacy build committed (`---> <id>` lines), leaving out cache hits."""
    lines = [ln.strip() for ln in log.splitlines()]
    return [
        m.group(1)
        for prev, ln in zip(["", *lines], lines, strict=False)
        if (m := re.fullmatch(r"---> ([0-9a-f]{12,64})", ln)) and prev != "---> Using cache"
    ]


def test_failed_preflight_leaves_nothing(world, source_bundle, env, tmp_path, docker_client):
    proc = kbundle(["run", source_bundle, "--gpus", "all", "--yes", "--json"], env, cwd=tmp_path)
    line = assert_clean_error(proc, "--gpus all", "NVIDIA")
    assert proc.returncode == 4
    assert json.loads(proc.stdout) == {"error": {"code": 4, "message": line.removeprefix("error: ")}}
    assert_nothing_left(tmp_path, source_bundle.stem, env, docker_client)


def test_declined_without_a_terminal_leaves_nothing(source_bundle, env, tmp_path, docker_client):
    proc = kbundle(["run", source_bundle], env, cwd=tmp_path)
    assert_clean_error(proc, "--yes")
    assert_nothing_left(tmp_path, source_bundle.stem, env, docker_client)


def test_a_no_on_the_terminal_leaves_nothing_and_the_question_keeps_its_brackets(
    source_bundle, env, tmp_path, docker_client
):
    proc = answer_on_a_terminal(["run", str(source_bundle)], env, tmp_path)
    err = proc.stderr
    assert proc.returncode == 1 and "declined" in err, err
    assert "register the kernel? [y/N]" in err, err
    assert re.search(r"disk +about [\d.]+ (?:[KMG]iB|B) for the image", err), err
    assert re.search(r"[KMG]iB to download at most", err), err
    assert_nothing_left(tmp_path, source_bundle.stem, env, docker_client)


def test_an_existing_workdir_is_kept(source_bundle, env, tmp_path, docker_client):
    mine = tmp_path / source_bundle.stem
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = kbundle(["run", source_bundle], env, cwd=tmp_path)
    assert_clean_error(proc, "--yes")
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_read_only_jupyter_dir_is_named_before_any_download(source_bundle, env, tmp_path, docker_client, mount_tmpfs):
    ro = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    env["JUPYTER_DATA_DIR"] = str(ro / "jupyter")
    proc = kbundle(["run", source_bundle, "--yes"], env, cwd=tmp_path)
    line = assert_clean_error(proc, str(ro / "jupyter" / "kernels"), "read-only", "EROFS")
    assert proc.returncode == 4, line
    pkgs = Path(env["KBUNDLE_CACHE_DIR"]) / "pkgs"
    assert not (pkgs.exists() and list(pkgs.iterdir())), "packages were downloaded before the check"
    assert not (tmp_path / source_bundle.stem).exists()


def test_a_full_cache_disk_is_named_before_any_download(source_bundle, env, tmp_path, docker_client, mount_tmpfs):
    small = mount_tmpfs(tmp_path / "small", "size=256k")
    env["KBUNDLE_CACHE_DIR"] = str(small / "cache")
    proc = kbundle(["run", source_bundle, "--yes"], env, cwd=tmp_path)
    line = assert_clean_error(proc, "ENOSPC", str(small / "cache"))
    assert proc.returncode == 4, line
    assert not (tmp_path / source_bundle.stem).exists()


def test_an_unlocked_bundle_too_big_for_the_disk_is_named_once_solved(world, env, tmp_path, docker_client, mount_tmpfs):
    """Its sizes are unknown before consent; once solved (the channel's index fits in 16 MiB),
    the estimate is checked before the first package is fetched."""
    name = f"kbc-unlocked-{uuid.uuid4().hex[:6]}"
    bundle = pack(world, dict(env), tmp_path / "sender", name, "--lock", "never")
    small = mount_tmpfs(tmp_path / "small", "size=16m")
    env["KBUNDLE_CACHE_DIR"] = str(small / "cache")
    proc = kbundle(["run", bundle, "--yes"], env, cwd=tmp_path)
    line = assert_clean_error(proc, "ENOSPC ahead", str(small / "cache"), "needs about")
    assert proc.returncode == 4, line
    pkgs = Path(env["KBUNDLE_CACHE_DIR"]) / "pkgs"
    assert not (pkgs.exists() and list(pkgs.glob("*.conda"))), "packages were downloaded before the check"
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_mid_build_leaves_nothing(sig, source_bundle, world, env, tmp_path, docker_client):
    name = f"kbc-{sig.name.lower()}-{uuid.uuid4().hex[:6]}"
    bundle = rewrite_dockerfile(source_bundle, tmp_path / f"{name}.kbundle", name, "RUN sleep 120")
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
    while log is None or not _step_running(docker_client, log, "RUN sleep 120"):
        found = sorted(logs.glob(f"{name}-*.build.log")) if logs.exists() else []
        log = found[0] if found else None
        if proc.poll() is not None:
            pytest.fail(f"kbundle run ended before the RUN step ran: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the RUN sleep 120 step was not running after 180 s")
        time.sleep(0.2)
    assert (tmp_path / name).is_dir()  # the run had placed its workdir
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    assert_nothing_left(tmp_path, name, env, docker_client, log.read_text())
    deadline = time.monotonic() + 30  # the engine cancels the step and removes its container
    while [c for c in docker_client.api.containers(all=True) if "sleep 120" in c.get("Command", "")]:
        assert time.monotonic() < deadline, "the interrupted build's container kept running"
        time.sleep(0.5)
