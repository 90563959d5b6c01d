"""`kbundle run` against the real engine and the offline world's channel, with real Jupyter clients.

One bundle is packed and built once per session (`built_run`); the other tests reuse it.
Kernels go to a temporary JUPYTER_DATA_DIR and packages to a temporary kbundle cache.
Images built here are removed at the end of the session.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import docker
import pytest

from helpers import KBUNDLE, answer_on_a_terminal, run_kbundle

pytestmark = pytest.mark.docker


NOTEBOOK = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": 1,
            "id": "c1",
            "metadata": {},
            "outputs": [{"name": "stdout", "output_type": "stream", "text": "3\n"}],
            "source": "from tabulate import tabulate\nprint(1 + 2)",
        }
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


@pytest.fixture(scope="session")
def run_env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kbundle-run")
    env = dict(os.environ)
    env["JUPYTER_DATA_DIR"] = str(root / "jupyter")
    env["KBUNDLE_CACHE_DIR"] = str(root / "cache")
    env.pop("JUPYTER_PATH", None)
    return env


kbundle = run_kbundle


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def pack(world, env, folder: Path, name: str, *extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.ipynb").write_text(json.dumps(NOTEBOOK))
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        f"  - python={world['python']}\n  - numpy\n  - ipykernel\n  - pip\n  - pip:\n    - tabulate==0.9.0\n"
    )
    out = folder / f"{name}.kbundle"
    proc = kbundle(
        [
            "pack",
            f"{name}.ipynb",
            "-e",
            "environment.yml",
            "--channel",
            world["channel"],
            "--base-image",
            world["base_image"],
            "-o",
            out,
            *extra,
        ],
        env,
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def session_tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def built_run(world, run_env, tmp_path_factory, docker_client, session_tag):
    """Pack → `kbundle run --gpus auto --json --yes`, once; yields (json, stderr, bundle path, cwd)."""
    cwd = tmp_path_factory.mktemp("recipient")
    bundle = pack(world, run_env, tmp_path_factory.mktemp("sender"), f"kbt-{session_tag}")
    proc = kbundle(
        ["run", bundle, "--base-image", world["base_image"], "--gpus", "auto", "--json", "--yes"],
        run_env,
        cwd=cwd,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    yield data, proc.stderr, bundle, cwd
    for container in docker_client.api.containers(all=True, filters={"ancestor": data["image"]}):
        try:
            docker_client.api.remove_container(container["Id"], force=True)
        except docker.errors.NotFound:
            pass  # auto-removed meanwhile
    docker_client.images.remove(data["image"], force=True)


def test_run_reports_the_built_kernel(built_run, world, run_env):
    data, stderr, bundle, cwd = built_run
    assert data["built"] is True
    assert data["gpus"] == []
    assert data["kernel_name"] == f"kbundle-kbt-{bundle.stem.split('-')[-1]}"
    assert data["image"].startswith(f"kbundle/{bundle.stem}:")
    assert Path(data["workdir"]) == cwd / bundle.stem  # default ./<name>/
    assert isinstance(data["seconds"], float) and data["seconds"] > 0
    notebook = json.loads((Path(data["workdir"]) / f"{bundle.stem}.ipynb").read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == data["kernel_name"]
    listed = json.loads(kbundle(["kernels", "list", "--json"], run_env).stdout)
    assert [k["image"] for k in listed if k["name"] == data["kernel_name"]] == [data["image"]]


def test_auto_gpus_on_this_engine_is_cpu_with_a_warning(built_run):
    data, stderr, _, _ = built_run
    assert data["gpus"] == []
    assert any(ln.startswith("warning:") and "runs on CPU" in ln for ln in stderr.splitlines()), stderr


def test_image_is_labelled_with_bundle_and_kbundle_version(built_run, docker_client):
    from kbundle import __version__

    data, _, bundle, _ = built_run
    labels = docker_client.images.get(data["image"]).labels
    assert labels["org.kbundle.kbundle-version"] == __version__
    from kbundle.bundle import open_bundle

    assert labels["org.kbundle.content-hash"] == open_bundle(bundle).identity


def test_kernel_runs_inside_the_image_and_leaves_no_container(built_run, run_env, docker_client, monkeypatch):
    from jupyter_client.manager import KernelManager

    data = built_run[0]
    monkeypatch.setenv("JUPYTER_DATA_DIR", run_env["JUPYTER_DATA_DIR"])
    km = KernelManager(kernel_name=data["kernel_name"])
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        out = []
        code = (
            "import json, os, sys, importlib.util, numpy, tabulate, ipykernel.kernelapp as ka\n"
            "print(json.dumps({'prefix': sys.prefix, 'numpy': numpy.__file__, 'tab': tabulate.__version__,\n"
            "                  'pyc': os.path.exists(importlib.util.cache_from_source(ka.__file__))}))"
        )
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda m: out.append(m))
        assert reply["content"]["status"] == "ok"
        text = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
        facts = json.loads(text)
        assert facts["prefix"] == "/opt/kbundle/env"
        assert facts["numpy"].startswith("/opt/kbundle/env/lib/python")
        assert facts["tab"] == "0.9.0"
        assert facts["pyc"], "the env was not byte-compiled: every kernel start recompiles it"
        kc.stop_channels()
    finally:
        km.shutdown_kernel()
    deadline = time.monotonic() + 20
    # The low-level list: the high-level one inspects each container and trips over one that
    # auto-remove deletes in between.
    while docker_client.api.containers(all=True, filters={"ancestor": data["image"]}):
        assert time.monotonic() < deadline, "a kernel container outlived shutdown"
        time.sleep(0.5)


def test_warm_run_starts_no_build(built_run, world, run_env, docker_client):
    data, _, bundle, cwd = built_run
    # Events are filtered by whole seconds: start at the next one, so earlier tests' containers stay out.
    since = int(time.time()) + 1
    while time.time() < since:
        time.sleep(0.05)
    proc = kbundle(["run", bundle, "--base-image", world["base_image"], "--json", "--yes"], run_env, cwd=cwd)
    until = int(time.time()) + 1
    assert proc.returncode == 0, proc.stderr
    warm = json.loads(proc.stdout)
    assert warm["built"] is False
    assert warm["image"] == data["image"] and warm["image_id"] == data["image_id"]
    events = list(docker_client.events(since=since, until=until, decode=True))
    # The legacy builder creates a container per RUN step and tags the result: neither happened.
    assert not [e for e in events if e.get("Type") == "container" and e.get("Action") == "create"], events
    assert not [e for e in events if e.get("Type") == "image" and e.get("Action") == "tag"], events


def test_unlocked_bundle_solves_on_this_host_to_the_lock(built_run, world, run_env, monkeypatch):
    """Without a lock, run solves for linux-64 here; against the same channel it finds the same packages."""
    from kbundle.image import env as envmod

    monkeypatch.setenv("KBUNDLE_CACHE_DIR", run_env["KBUNDLE_CACHE_DIR"])
    from kbundle.bundle import open_bundle

    b = open_bundle(built_run[2])
    locked = envmod.resolve(envmod.EnvSpec(tuple(b.channels), tuple(b.dependencies), b.lock_text))
    solved = envmod.resolve(envmod.EnvSpec(tuple(b.channels), tuple(b.dependencies), None))
    assert locked.locked and not solved.locked
    assert solved.content_hash == locked.content_hash and solved.python_version() == world["python"]


def test_a_second_env_links_packages_and_bytecode_from_the_shared_cache(
    built_run, world, run_env, tmp_path, monkeypatch, docker_client
):
    """After the session's build, installing the same lock again downloads and compiles nothing."""
    from kbundle.bundle import open_bundle
    from kbundle.image import bytecode
    from kbundle.image import env as envmod

    monkeypatch.setenv("KBUNDLE_CACHE_DIR", run_env["KBUNDLE_CACHE_DIR"])
    base = world["base_image"]
    pkgs = envmod.package_cache_dir()
    b = open_bundle(built_run[2])
    resolved = envmod.resolve(envmod.EnvSpec(tuple(b.channels), tuple(b.dependencies), b.lock_text))
    # The session's run installs nothing when the engine holds every step image of its environment
    # (image/chain.py): a first install fills the caches.
    envmod.install(resolved, tmp_path / "first")
    bytecode.compile_env(
        tmp_path / "first", envmod.cache_root() / "pyc", resolved.interpreter_id(), client=docker_client, image=base
    )
    before = {p.name for p in pkgs.iterdir()}
    envmod.install(resolved, tmp_path / "env")
    stats = bytecode.compile_env(
        tmp_path / "env", envmod.cache_root() / "pyc", resolved.interpreter_id(), client=docker_client, image=base
    )
    assert {p.name for p in pkgs.iterdir()} == before, "packages were fetched again"
    assert stats.compiled == 0 and stats.linked > 1000 and stats.skipped is None
    numpy_init = next((tmp_path / "env" / "lib").glob("python3.*/site-packages/numpy/__init__.py"))
    assert bytecode._pyc_path(numpy_init, bytecode._cache_tag(tmp_path / "env")).stat().st_nlink > 1


def test_gpus_all_names_the_missing_nvidia_runtime(built_run, world, run_env):
    _, _, bundle, cwd = built_run
    proc = kbundle(["run", bundle, "--base-image", world["base_image"], "--gpus", "all", "--yes"], run_env, cwd=cwd)
    assert_clean_error(proc, "NVIDIA runtime", "--gpus none")
    assert proc.returncode == 4  # this machine cannot run it (docs/usage.md)


def test_unreachable_daemon_is_one_line(built_run, run_env):
    _, _, bundle, cwd = built_run
    env = dict(run_env, DOCKER_HOST="unix:///nonexistent.sock")
    assert_clean_error(kbundle(["run", bundle, "--yes"], env, cwd=cwd), "/nonexistent.sock", "Docker daemon")
    assert_clean_error(kbundle(["doctor"], env), "/nonexistent.sock")


def test_doctor_json_matches_this_engine(run_env):
    proc = kbundle(["doctor", "--json"], run_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["docker"]["reachable"] is True and report["docker"]["gpu_capable"] is False
    assert report["gpus"] == [] and any(f["level"] == "warn" for f in report["findings"])


def test_without_yes_and_no_terminal_it_asks_for_yes(world, run_env, tmp_path, session_tag):
    bundle = pack(world, run_env, tmp_path / "s", f"kbt-ask-{session_tag}")
    proc = kbundle(["run", bundle, "--base-image", world["base_image"]], run_env, cwd=tmp_path)
    assert_clean_error(proc, "--yes")
    listed = json.loads(kbundle(["kernels", "list", "--json"], run_env).stdout)
    assert f"kbundle-kbt-ask-{session_tag}" not in [k["name"] for k in listed]
    assert not (tmp_path / bundle.stem).exists()  # a run that stops leaves nothing behind (review: on a terminal)


def test_on_a_terminal_it_asks_and_a_no_builds_nothing(world, run_env, tmp_path, session_tag):
    bundle = pack(world, run_env, tmp_path / "s", f"kbt-tty-{session_tag}")
    proc = answer_on_a_terminal(["run", str(bundle), "--base-image", world["base_image"]], run_env, tmp_path)
    err = proc.stderr
    assert proc.returncode == 1 and "declined" in err, err
    assert "Build it and register the kernel?" in err and world["base_image"] in err and "Dockerfile" in err
    channel_host = urllib.parse.urlsplit(world["channel"]).netloc  # the world's port: 18765 unless it was taken
    assert "unsigned" in err and channel_host in err and "package(s), locked" in err
    listed = json.loads(kbundle(["kernels", "list", "--json"], run_env).stdout)
    assert f"kbundle-kbt-tty-{session_tag}" not in [k["name"] for k in listed]


def rewrite_dockerfile(bundle: Path, target: Path, name: str, extra_step: str) -> Path:
    """The bundle under another name, with `extra_step` after FROM and a tiny unlocked env (tzdata
    only, so the context uploads fast), resealed so that it verifies."""
    import dataclasses

    from kbundle.bundle import open_bundle, write_bundle

    b = open_bundle(bundle)
    members = {k: b.read(k) for k in b.members if k != b.manifest.lock}
    lines = b.dockerfile_text.splitlines(keepends=True)
    at = next(i for i, ln in enumerate(lines) if ln.startswith("FROM ")) + 1
    members["Dockerfile"] = "".join(lines[:at] + [extra_step + "\n"] + lines[at:]).encode()
    manifest = dataclasses.replace(
        b.manifest, name=name, files=[], content_hash="", dependencies=["tzdata"], pip=[], locked=False, lock=None
    )
    write_bundle(target, manifest, members)
    return target


def build_log(run_env, name: str):
    """The build log of bundle `name` in kbundle's cache (found once the build starts)."""

    class Log:
        def _path(self) -> Path:
            found = sorted((Path(run_env["KBUNDLE_CACHE_DIR"]) / "logs").glob(f"{name}-*.build.log"))
            return found[-1] if found else Path(run_env["KBUNDLE_CACHE_DIR"]) / "logs" / f"{name}-none.build.log"

        def exists(self) -> bool:
            return self._path().exists()

        def read_text(self) -> str:
            return self._path().read_text()

    return Log()


def _no_trace(docker_client, run_env, name: str, log: Path) -> None:
    assert not [i for i in docker_client.images.list(name=f"kbundle/{name}")], "a half-built image was tagged"
    listed = json.loads(kbundle(["kernels", "list", "--json"], run_env).stdout)
    assert f"kbundle-{name}" not in [k["name"] for k in listed]
    cache = Path(run_env["KBUNDLE_CACHE_DIR"]) / "contexts"
    assert not list(cache.iterdir()) if cache.exists() else True, "the build context was left behind"


def _step_running(docker_client, log: Path, step: str) -> bool:
    """Whether the container of the build step `step` (a Dockerfile line) is running, per the build log."""
    import docker

    text = log.read_text() if log.exists() else ""
    found = re.search(re.escape(step) + r"\s*\n\s*---> Running in ([0-9a-f]+)", text)
    if not found:
        return False
    try:
        return docker_client.api.inspect_container(found.group(1))["State"]["Running"]
    except docker.errors.NotFound:
        return False


def test_failed_build_leaves_no_image_and_no_kernel(built_run, world, run_env, docker_client, tmp_path, session_tag):
    name = f"kbt-fail-{session_tag}"
    bundle = rewrite_dockerfile(built_run[2], tmp_path / "fail.kbundle", name, "RUN echo failing-on-purpose && false")
    args = ["run", bundle, "--base-image", world["base_image"], "--yes", "--use-bundled-dockerfile"]
    proc = kbundle(args, run_env, cwd=tmp_path)
    line = assert_clean_error(proc, "build failed", "build.log")
    log = Path(re.search(r"full log: (\S+?build\.log)", line).group(1))  # in kbundle's cache: the workdir is gone
    assert "failing-on-purpose" in log.read_text(), line
    assert not (tmp_path / name).exists()
    _no_trace(docker_client, run_env, name, log)


def test_interrupted_build_leaves_no_image_and_no_kernel(
    built_run, world, run_env, docker_client, tmp_path, session_tag
):
    name = f"kbt-int-{session_tag}"
    bundle = rewrite_dockerfile(built_run[2], tmp_path / "int.kbundle", name, "RUN sleep 120")
    log = build_log(run_env, name)
    proc = subprocess.Popen(
        [KBUNDLE, "run", str(bundle), "--base-image", world["base_image"], "--yes", "--use-bundled-dockerfile"],
        env=run_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Interrupt once the RUN step's container runs: the build log names it ("---> Running in <id>").
    deadline = time.monotonic() + 120
    while not _step_running(docker_client, log, "RUN sleep 120"):
        if proc.poll() is not None:
            pytest.fail(f"kbundle run ended before the RUN step ran: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                "the RUN sleep 120 step's container was not running after 120 s; build log:\n"
                + (log.read_text()[-2000:] if log.exists() else "(none)")
            )
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "error: interrupted" in err and not (tmp_path / name).exists()
    _no_trace(docker_client, run_env, name, log)
    deadline = time.monotonic() + 30  # the engine cancels the step and removes its container
    while [
        c for c in docker_client.containers.list(all=True) if "sleep 120" in " ".join(c.attrs["Config"]["Cmd"] or [])
    ]:
        assert time.monotonic() < deadline, "the interrupted build's container kept running"
        time.sleep(0.5)


def test_kernels_remove(built_run, run_env):
    data = built_run[0]
    proc = kbundle(["kernels", "remove", data["kernel_name"]], run_env)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(kbundle(["kernels", "list", "--json"], run_env).stdout)
    assert data["kernel_name"] not in [k["name"] for k in listed]
    assert_clean_error(kbundle(["kernels", "remove", data["kernel_name"]], run_env), data["kernel_name"])


def test_a_damaged_cached_pyc_is_compiled_again_not_linked(
    built_run, world, run_env, tmp_path, monkeypatch, docker_client
):
    """A .pyc in the shared cache whose body was cut short (a crash, a full disk) would make
    `import` fail in every image built from it; it is recognised by its digest, removed and
    compiled again."""
    from kbundle.bundle import open_bundle
    from kbundle.image import bytecode
    from kbundle.image import env as envmod

    monkeypatch.setenv("KBUNDLE_CACHE_DIR", run_env["KBUNDLE_CACHE_DIR"])
    base = world["base_image"]
    b = open_bundle(built_run[2])
    resolved = envmod.resolve(envmod.EnvSpec(tuple(b.channels), tuple(b.dependencies), b.lock_text))
    cache = envmod.cache_root() / "pyc"
    first = tmp_path / "first" / "env"
    envmod.install(resolved, first)
    bytecode.compile_env(first, cache, resolved.interpreter_id(), client=docker_client, image=base)
    tag = bytecode._cache_tag(first)
    numpy_init = next((first / "lib").glob("python3.*/site-packages/numpy/__init__.py"))
    pyc = bytecode._pyc_path(numpy_init, tag)
    whole = pyc.read_bytes()
    assert pyc.stat().st_nlink > 1, "the env's .pyc is not the cache's file"
    with open(pyc, "r+b") as fh:  # the same inode as the cached file: the cache is damaged too
        fh.truncate(len(whole) // 2)

    second = tmp_path / "second" / "env"
    envmod.install(resolved, second)
    stats = bytecode.compile_env(second, cache, resolved.interpreter_id(), client=docker_client, image=base)
    rel = numpy_init.relative_to(first).as_posix()
    assert stats.damaged == (rel,) and stats.compiled >= 1
    healed = bytecode._pyc_path(second / rel, tag).read_bytes()
    assert healed == whole
