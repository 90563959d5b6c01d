"""Building and running a stranger's bundle: one test per attack, through the real CLI and engine.

The bundles are crafted from the offline world's channel plus a second, "evil" channel
served from this test on 127.0.0.1; each is sealed with kbundle's own writer so that it
verifies, and the attack sits in what it names (packages, paths, a Dockerfile).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import http.server
import json
import os
import threading
import uuid
from pathlib import Path

import pytest

from helpers import answer_on_a_terminal, run_kbundle
from kbundle.bundle.format import DOCKERFILE, LOCK

pytestmark = pytest.mark.docker

NOTEBOOK = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode()


# ----------------------------------------------------------------- servers


class _Counting(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.server.requests.append(self.path)
        return super().do_GET()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def serve(directory: Path):
    """An HTTP server for `directory` on 127.0.0.1 that records every request; (url, requests, stop)."""
    handler = functools.partial(_Counting, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server.requests, server.shutdown


@pytest.fixture(scope="module")
def evil_channel(tmp_path_factory):
    """A second channel: a `.pth` package, a symlink to a host file, an absolute path in paths.json."""
    from rattler.index import index_fs

    from world.channel import CondaPackage, PackageFile, write_conda_package

    root = tmp_path_factory.mktemp("evil-channel")
    sentinel = root / "SENTINEL-pth-ran"
    secret = root / "secret.py"
    secret.write_text("SECRET = 'the host user's secret'\n")
    pth = f"import os; open({str(sentinel)!r}, 'w').write('ran on the host')\n"
    packages = [
        CondaPackage(
            "evilpth",
            "1.0",
            "0",
            "noarch",
            ["python"],
            [PackageFile("site-packages/zz_evil.pth", pth.encode())],
            noarch="python",
        ),
        CondaPackage(
            "evillink",
            "1.0",
            "0",
            "noarch",
            [],
            [PackageFile("lib/stolen.py", b"", link_target=str(secret))],
            noarch="generic",
        ),
        CondaPackage(
            "evilabs", "1.0", "0", "noarch", [], [PackageFile(str(root / "planted.txt"), b"x")], noarch="generic"
        ),
    ]
    for package in packages:
        write_conda_package(package, root / "noarch")
    (root / "linux-64").mkdir(exist_ok=True)
    result = index_fs(root, write_zst=False, write_shards=False)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    url, requests, stop = serve(root)
    yield {"url": url, "root": root, "sentinel": sentinel, "secret": secret, "requests": requests}
    stop()


# ----------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trust")
    out = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "JUPYTER_PATH")}
    out.update(JUPYTER_DATA_DIR=str(root / "jupyter"), KBUNDLE_CACHE_DIR=str(root / "cache"))
    return out


kbundle = functools.partial(run_kbundle, timeout=600)


def one_error(proc, *words) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def lock_for(channels: list[str], specs: list[str]) -> str:
    from kbundle import solve

    target = ["__unix=0", "__linux=5.4", "__glibc=2.36", "__archspec=1=x86_64"]
    records = asyncio.run(solve.solve(channels, specs, target, cache_dir=None))
    return solve.lock_text(records, channels, target)


def craft(
    path: Path,
    world,
    *,
    name: str,
    channels: list[str],
    specs: list[str],
    lock: str | None,
    dockerfile: str | None = None,
) -> Path:
    """A bundle kbundle's writer seals, with kbundle's own Dockerfile unless `dockerfile` replaces it."""
    from kbundle.bundle import Manifest, write_bundle
    from kbundle.pack.dockerfile import render_for

    manifest = Manifest(
        name=name,
        notebook="work/nb.ipynb",
        python=world["python"],
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image=world["base_image"],
        base_image_reason="the test world's base",
        channels=list(channels),
        dependencies=list(specs),
        pip=[],
        channel_urls=list(channels),
        locked=lock is not None,
        lock=LOCK if lock is not None else None,
        virtual_packages=["__unix=0", "__linux=5.4", "__glibc=2.36", "__archspec=1=x86_64"],
    )
    members = {"work/nb.ipynb": NOTEBOOK, "env/environment.yml": b"dependencies: []\n"}
    if lock is not None:
        members[LOCK] = lock.encode()
    members[DOCKERFILE] = (dockerfile or render_for(manifest)).encode()
    write_bundle(path, dataclasses.replace(manifest, content_hash=_content_hash(members)), members)
    return path


def _content_hash(members: dict[str, bytes]) -> str:
    from kbundle.bundle import content_hash

    return content_hash(members)


def no_build_leftovers(env: dict) -> None:
    cache = Path(env["KBUNDLE_CACHE_DIR"])
    contexts = cache / "contexts"
    assert not (contexts.exists() and list(contexts.iterdir())), "a build context was left behind"
    assert not list(cache.glob("kbundle-archives-*")), "downloaded archives were left behind"


def kernels(env) -> list[str]:
    return [k["name"] for k in json.loads(kbundle(["kernels", "list", "--json"], env, None).stdout)]


# ----------------------------------------------------------------- attacks


def test_a_pth_file_in_the_env_runs_nothing_on_the_host(world, evil_channel, env, tmp_path, docker_client):
    """Byte-compiling used to run the env's python on the host, which read every .pth file."""
    name = f"trust-pth-{uuid.uuid4().hex[:6]}"
    channels = [world["channel"], evil_channel["url"]]
    bundle = craft(
        tmp_path / "pth.kbundle",
        world,
        name=name,
        channels=channels,
        specs=["python", "evilpth"],
        lock=lock_for(channels, ["python", "evilpth"]),
    )
    proc = kbundle(["run", bundle, "--yes", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    try:
        assert not evil_channel["sentinel"].exists(), "a .pth file of the bundle ran on the host"
        # The env was byte-compiled all the same (in a container), and the .pth is really there.
        out = docker_client.containers.run(
            data["image"],
            [
                "python",
                "-c",
                "import json, os, sys, importlib.util as u, json as j; "
                "print(json.dumps([os.path.exists(u.cache_from_source(j.__file__)), "
                "any(os.path.exists(os.path.join(p, 'zz_evil.pth')) for p in sys.path)]))",
            ],
            entrypoint=None,
            network_disabled=True,
            remove=True,
        )
        assert json.loads(out) == [True, True]
    finally:
        docker_client.images.remove(data["image"], force=True)


def test_a_symlink_to_a_host_file_is_refused(world, evil_channel, env, tmp_path, docker_client):
    name = f"trust-link-{uuid.uuid4().hex[:6]}"
    channels = [world["channel"], evil_channel["url"]]
    bundle = craft(
        tmp_path / "link.kbundle",
        world,
        name=name,
        channels=channels,
        specs=["evillink"],
        lock=lock_for(channels, ["evillink"]),
    )
    proc = kbundle(["run", bundle, "--yes"], env, tmp_path)
    line = one_error(proc, "symlink", "lib/stolen.py", str(evil_channel["secret"]))
    assert proc.returncode == 3, line
    assert not docker_client.images.list(name=f"kbundle/{name}")
    assert f"kbundle-{name}" not in kernels(env)
    no_build_leftovers(env)


def test_a_lock_url_outside_the_declared_channels_is_a_damaged_bundle(world, evil_channel, env, tmp_path):
    both = [world["channel"], evil_channel["url"]]
    bundle = craft(
        tmp_path / "outside.kbundle",
        world,
        name=f"trust-outside-{uuid.uuid4().hex[:6]}",
        channels=[world["channel"]],  # declares only the world's channel
        specs=["python", "evilpth"],
        lock=lock_for(both, ["python", "evilpth"]),
    )
    before = len(evil_channel["requests"])
    proc = kbundle(["run", bundle, "--yes"], env, tmp_path)
    line = one_error(proc, "outside the bundle's channels", evil_channel["url"] + "noarch/evilpth-1.0-0.tar.bz2")
    assert proc.returncode == 3, line
    assert len(evil_channel["requests"]) == before, "the undeclared channel was contacted"


@pytest.mark.parametrize("where", ["paths.json", "lock"])
def test_an_absolute_path_is_one_line_and_no_panic(world, evil_channel, env, tmp_path, where):
    channels = [world["channel"], evil_channel["url"]]
    if where == "paths.json":
        lock = lock_for(channels, ["evilabs"])
        words = ["installs a file outside the environment", str(evil_channel["root"] / "planted.txt")]
    else:  # a lock whose package is a path on the recipient's disk
        lock = lock_for(channels, ["evillink"]).replace(evil_channel["url"] + "noarch/", "/tmp/")
        words = ["the lock names a package at /tmp/evillink-1.0-0.tar.bz2"]
    bundle = craft(
        tmp_path / "abs.kbundle",
        world,
        name=f"trust-abs-{uuid.uuid4().hex[:6]}",
        channels=channels,
        specs=["x"],
        lock=lock,
    )
    proc = kbundle(["run", bundle, "--yes"], env, tmp_path)
    line = one_error(proc, *words)
    assert proc.returncode == 3, line
    assert not (evil_channel["root"] / "planted.txt").exists()
    no_build_leftovers(env)


TAMPERED = "FROM evil/backdoor\nRUN cp /bin/sh /opt/rootsh && chmod 4755 /opt/rootsh\nUSER root\n"


def test_a_tampered_dockerfile_is_shown_and_not_built(world, env, tmp_path, docker_client):
    """kbundle builds its own rendering of the manifest; the review shows the diff."""

    name = f"trust-df-{uuid.uuid4().hex[:6]}"
    channels = [world["channel"]]
    bundle = craft(
        tmp_path / "df.kbundle",
        world,
        name=name,
        channels=channels,
        specs=["python"],
        lock=lock_for(channels, ["python"]),
        dockerfile=TAMPERED,
    )
    # The review, on a terminal: the diff, escaped, and a "no" builds nothing.
    proc = answer_on_a_terminal(["run", str(bundle)], env, tmp_path)
    err = proc.stderr
    assert proc.returncode == 1 and "declined" in err, err
    assert "-FROM evil/backdoor" in err and "+FROM " + world["base_image"] in err and "differs" in err
    # --yes alone builds kbundle's rendering: no backdoor base, no setuid shell.
    proc = kbundle(["run", bundle, "--yes", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "differs from kbundle's rendering" in proc.stderr
    data = json.loads(proc.stdout)
    try:
        image = docker_client.images.get(data["image"])
        assert image.labels["org.kbundle.base-image"] == world["base_image"]
        out = docker_client.containers.run(data["image"], ["sh", "-c", "ls /opt/rootsh 2>&1; id -u"], remove=True)
        assert b"No such file" in out and out.split()[-1] != b"0"
        assert (tmp_path / name / ".kbundle" / "Dockerfile").read_text() != TAMPERED
    finally:
        docker_client.images.remove(data["image"], force=True)


@pytest.mark.parametrize("how", ["pty-no", "not-a-terminal"])
def test_nothing_touches_the_network_before_consent(world, env, tmp_path, how):
    """An unlocked bundle whose channel is a server that counts requests: none arrive before the answer."""

    url, requests, stop = serve(Path(world["channel_path"]))
    try:
        bundle = craft(
            tmp_path / "quiet.kbundle",
            world,
            name=f"trust-quiet-{uuid.uuid4().hex[:6]}",
            channels=[url],
            specs=["python", "tzdata"],
            lock=None,
        )
        if how == "pty-no":
            proc = answer_on_a_terminal(["run", str(bundle)], env, tmp_path)
            err = proc.stderr
            assert proc.returncode == 1 and "declined" in err, err
            host = url.split("/")[2]
            assert host in err and "not locked" in err and "unsigned" in err, err
        else:
            proc = kbundle(["run", bundle], env, tmp_path)
            one_error(proc, "--yes")
        assert requests == [], f"requests before consent: {requests}"
    finally:
        stop()
