"""Issue 18 through the real CLI: a stranger's pip: section cannot write outside kbundle's cache,
cannot read this host through a `file://` index, cannot hide the hosts it contacts, and cannot
poison the shared wheel cache for an honest bundle. Real engine, real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import os
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from helpers import answer_on_a_terminal, run_kbundle

pytestmark = pytest.mark.docker

NOTEBOOK = json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode()
kbundle = functools.partial(run_kbundle, timeout=900)


class _Counting(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.server.requests.append(self.path)
        return super().do_GET()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> (base URL, the requests it received); every server stops at the end."""
    servers = []

    def start(folder: Path):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Counting, directory=str(folder)))
        server.requests = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(tmp_path) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "JUPYTER_PATH", "KBUNDLE_DEBUG")}
    out.update(
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),
        KBUNDLE_CACHE_DIR=str(tmp_path / "cache"),
        PIP_CONFIG_FILE=os.devnull,  # the bundles' indexes only
        PIP_FIND_LINKS="",
    )
    return out


def craft(path: Path, world, *, pip: list[str], indexes: dict | None = None, pip_locked: bool = False) -> Path:
    """A bundle sealed by kbundle's own writer: the world's python, ipykernel and pip, and `pip`."""
    from kbundle.bundle import Manifest, content_hash, write_bundle
    from kbundle.bundle.format import DOCKERFILE
    from kbundle.pack.dockerfile import render_for

    manifest = Manifest(
        name=f"dl-{uuid.uuid4().hex[:8]}",
        notebook="work/nb.ipynb",
        python=world["python"],
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image=world["base_image"],
        base_image_reason="the test world's base",
        channels=[world["channel"]],
        dependencies=[f"python={world['python']}", "ipykernel", "pip"],
        pip=list(pip),
        pip_indexes={"index_url": None, "extra_index_urls": [], "find_links": [], **(indexes or {})},
        pip_locked=pip_locked,
        channel_urls=[world["channel"]],
        virtual_packages=["__unix=0", "__linux=5.4", "__glibc=2.36", "__archspec=1=x86_64"],
    )
    members = {"work/nb.ipynb": NOTEBOOK, "env/environment.yml": b"dependencies: []\n"}
    members[DOCKERFILE] = render_for(manifest).encode()
    write_bundle(path, dataclasses.replace(manifest, content_hash=content_hash(members)), members)
    return path


def one_error(proc, *words) -> str:
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------- finding 1: a file outside the cache


def test_a_traversal_url_writes_nothing_outside_and_is_exit_3(world, env, serve, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    url, requests = serve(served)
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "SENTINEL"
    sentinel.write_text("untouched")
    planted = outside / "planted-1.0.tar.gz"
    climb = quote("../" * 40 + str(planted).lstrip("/"), safe="")  # every `/` as %2F
    for target in ("a", "a/b"):
        line = f"evil @ {url}/{target}/{climb}"
        bundle = craft(tmp_path / f"traversal-{len(target)}.kbundle", world, pip=[line])
        proc = kbundle(["run", bundle, "--yes", "--gpus", "none"], env, tmp_path)
        one_error(proc, "climbs out")
    assert sentinel.read_text() == "untouched" and sorted(p.name for p in outside.iterdir()) == ["SENTINEL"]
    assert requests == []  # refused before anything was asked of the network
    assert not list(Path(env["KBUNDLE_CACHE_DIR"]).rglob("planted*"))


# ----------------------------------------------------------------- finding 7a: file:// from a bundle


@pytest.mark.parametrize(
    "indexes, pip",
    [
        ({"index_url": "file:///srv/simple"}, ["kbdemo==1.0"]),
        ({"find_links": ["file:///opt/wheels"]}, ["kbdemo==1.0"]),
        ({}, ["kbdemo @ file:///opt/wheels/kbdemo-1.0-py3-none-any.whl"]),
    ],
)
def test_a_file_index_or_url_in_a_bundle_is_refused(world, env, tmp_path, indexes, pip):
    bundle = craft(tmp_path / "file-index.kbundle", world, pip=pip, indexes=indexes)
    proc = kbundle(["run", bundle, "--yes", "--gpus", "none"], env, tmp_path)
    one_error(proc)
    assert not (Path(env["KBUNDLE_CACHE_DIR"]) / "wheels").exists()


# ----------------------------------------------------------------- the review names every pip host


def test_the_review_names_direct_url_and_git_hosts(world, env, serve, tmp_path):

    served = tmp_path / "served"
    served.mkdir()
    url, requests = serve(served)
    direct = f"kbfile @ http://files.direct.example:8080/f/kbfile-1.0-py3-none-any.whl --hash=sha256:{'a' * 64}"
    git = "kbgit @ git+https://git.example.org/kb/kbgit.git@v0.1"
    bundle = craft(tmp_path / "hosts.kbundle", world, pip=["kbdemo==1.0", direct, git], indexes={"index_url": url})
    proc = answer_on_a_terminal(["run", str(bundle)], env, tmp_path)
    err = proc.stderr
    assert proc.returncode == 1 and "declined" in err, err
    contacts = next(line for line in err.splitlines() if line.startswith("contacts"))
    for host in ("files.direct.example:8080", "git.example.org", url.split("/")[2]):
        assert host in contacts, contacts
    assert requests == []


# ----------------------------------------------------------------- finding 2: the shared wheel cache


def _hostile_index(root: Path) -> None:
    """A PEP 503 index serving its own kbdemo 1.0, whose module says ORIGIN = 'trojan'."""
    from world.pypi import _module, _write_index, wheel_bytes

    data = wheel_bytes("kbdemo", "1.0", _module("kbdemo", "1.0", "trojan"))
    _write_index(root, {"kbdemo": [("kbdemo-1.0-py3-none-any.whl", data)]})


def _origin(docker_client, image: str) -> str:
    out = docker_client.containers.run(
        image, ["python", "-c", "import kbdemo; print(kbdemo.ORIGIN)"], remove=True, user="65534:65534"
    )
    return out.decode().strip()


def _run(bundle: Path, env: dict, cwd: Path) -> dict:
    cwd.mkdir()
    proc = kbundle(["run", bundle, "--yes", "--gpus", "none", "--json"], env, cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_strangers_wheel_never_reaches_an_honest_bundle(world, env, serve, tmp_path, docker_client):
    import urllib.request

    hostile = tmp_path / "hostile"
    _hostile_index(hostile)
    evil_url, evil_requests = serve(hostile)
    honest_url = world["pypi_index"]
    with urllib.request.urlopen(honest_url.rsplit("/", 1)[0] + "/files/kbdemo-1.0-py3-none-any.whl") as resp:
        honest_sha = hashlib.sha256(resp.read()).hexdigest()
    images = []
    try:
        stranger = craft(
            tmp_path / "stranger.kbundle", world, pip=["kbdemo==1.0"], indexes={"index_url": f"{evil_url}/simple"}
        )
        images.append(_run(stranger, env, tmp_path / "s")["image"])
        assert evil_requests and _origin(docker_client, images[-1]) == "trojan"  # the stranger gets its own

        # The honest bundle, unlocked: pip resolves kbdemo==1.0 against the real index.
        honest = craft(tmp_path / "honest.kbundle", world, pip=["kbdemo==1.0"], indexes={"index_url": honest_url})
        data = _run(honest, env, tmp_path / "h1")
        images.append(data["image"])
        assert data["pip_resolved"] == [f"kbdemo==1.0 --hash=sha256:{honest_sha}"]
        assert _origin(docker_client, images[-1]) == "index"

        # The honest bundle, hash-locked: found by its hash, never "no wheel came back from pip".
        locked = craft(
            tmp_path / "locked.kbundle",
            world,
            pip=[f"kbdemo==1.0 --hash=sha256:{honest_sha}"],
            indexes={"index_url": honest_url},
            pip_locked=True,
        )
        images.append(_run(locked, env, tmp_path / "h2")["image"])
        assert _origin(docker_client, images[-1]) == "index"
    finally:
        for image in images:
            docker_client.images.remove(image, force=True)
