"""The VCS/sdist build container (image/sourcebuild.py `ContainerBuilder`) is as locked down as the
other throwaway containers (image/policy.py), and builds a real sdist, whose files sit under a top
folder. A hostile project's own build code (a PEP 517 backend in the sdist: the same code a
setup.py is) probes its container and writes what it found into the wheel it builds. The real
engine, the world's base image (with LD_PRELOAD and PYTHONPATH in its ENV, as a hostile base
could have), an sdist served over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import threading
import zipfile

import pytest

import world as world_module
from kbundle.image import sourcebuild
from kbundle.specs import PipIndexes, parse_pip_line
from sdistkit import backend, pyproject, sdist_bytes, served_folder

pytestmark = pytest.mark.docker

POISONED_BASE = "kbundle-test/poisoned-base:1"

# A hostile build backend: it records what its container lets it do, into the wheel it builds.
PROBE_BACKEND = backend(
    "kbprobe",
    "1.0",
    r"""
import glob, json, socket


def _try(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__ + ":" + str(exc.errno)


def _write(path):
    with open(path, "w") as fh:
        fh.write("pwned")


def _pids_max():
    for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"):
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError:
            pass
    return "unreadable"


def _connect():
    socket.create_connection(("PROBE_HOST", PROBE_PORT), timeout=3).close()


def _facts():
    status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    here = os.getcwd()
    return {
        "root_write": _try(lambda: _write("/kbundle-probe")),
        "etc_write": _try(lambda: _write("/etc/kbundle-probe")),
        "env_write": _try(lambda: _write("/opt/kbundle/env/kbundle-probe")),
        "var_tmp_write": _try(lambda: _write("/var/tmp/kbundle-probe")),
        "tmp_write": _try(lambda: _write("/tmp/kbundle-probe")),
        "pids_max": _pids_max(),
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "cap_eff": status["CapEff"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "uid": os.getuid(),
        "network": _try(_connect),
        "cwd": here,
        "world_writable": sorted(
            p for p in glob.glob("/kbundle/**", recursive=True) if os.lstat(p).st_mode & 0o002
        ),
    }


def _init_source():
    return ("FACTS = " + json.dumps(_facts()) + "\n").encode()
""",
)

PYPROJECT = pyproject("kbprobe", "1.0", "probe_backend")


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 over a folder: (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    with served_folder(folder) as url:
        yield folder, url


@pytest.fixture
def listener():
    """A TCP service on the host that records whoever connects (the build must reach nothing)."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen()
    seen: list = []

    def accept():
        while True:
            try:
                conn, addr = server.accept()
            except OSError:
                return
            seen.append(addr)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], seen
    server.close()


@pytest.fixture(scope="module")
def poisoned_base(world, docker_client):
    """The world's base image with what a hostile base image's ENV could hold."""
    dockerfile = (
        f"FROM {world['base_image']}\n"
        "ENV LD_PRELOAD=/nonexistent/evil.so LD_LIBRARY_PATH=/nonexistent PYTHONPATH=/nonexistent/evil\n"
        "LABEL kbundle.test=1\n"
    )
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=POISONED_BASE, rm=True)
    yield POISONED_BASE
    docker_client.images.remove(POISONED_BASE, force=True)


@pytest.fixture(scope="module")
def env_dir(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("sourcebuild")
    world_module.solve_and_install(world["channel"], world_module.ENV_SPECS + ["pip"], root / "env")
    return root / "env"


def _gateway(docker_client) -> str:
    """The host as a bridge container would reach it."""
    import ipaddress

    config = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    return config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


def test_a_hostile_build_finds_every_lockdown_in_place(
    world, env_dir, poisoned_base, served, listener, docker_client, tmp_path, monkeypatch
):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    port, seen = listener
    folder, base = served
    backend = PROBE_BACKEND.replace("PROBE_HOST", _gateway(docker_client)).replace("PROBE_PORT", str(port))
    data = sdist_bytes("kbprobe-1.0", {"pyproject.toml": PYPROJECT, "probe_backend.py": backend})
    (folder / "kbprobe-1.0.tar.gz").write_bytes(data)
    pin = parse_pip_line(f"kbprobe @ {base}/kbprobe-1.0.tar.gz --hash=sha256:{hashlib.sha256(data).hexdigest()}")
    builder = sourcebuild.ContainerBuilder(docker_client, poisoned_base, env_dir)
    wheel, source = builder.build(pin, world["python"], PipIndexes(), None)
    try:
        with zipfile.ZipFile(wheel) as zf:
            facts = json.loads(zf.read("kbprobe/__init__.py").decode().split("=", 1)[1])
    finally:
        shutil.rmtree(wheel.parent, ignore_errors=True)
    assert source == f"{base}/kbprobe-1.0.tar.gz"
    assert facts["root_write"].startswith("OSError:30") and facts["etc_write"].startswith("OSError:30"), facts
    assert facts["var_tmp_write"].startswith("OSError:30"), facts  # open to all on a writable root
    assert facts["env_write"].startswith("OSError:30"), facts  # the env is mounted read-only
    assert facts["tmp_write"] == "allowed", facts  # a tmpfs /tmp for the build's own scratch
    assert facts["pids_max"].isdigit() and int(facts["pids_max"]) <= 4096, facts
    assert not facts["ld_preload"] and not facts["ld_library_path"], facts
    assert "/nonexistent" not in (facts["pythonpath"] or ""), facts  # pip's build isolation sets its own
    assert facts["cap_eff"] == "0000000000000000" and facts["no_new_privs"] == "1", facts
    assert facts["uid"] != 0, facts
    assert facts["network"] != "allowed" and seen == [], facts
    assert facts["cwd"].startswith("/kbundle/src/kbprobe-1.0") or facts["cwd"].startswith("/tmp"), facts
    assert facts["world_writable"] == [], facts  # no folder opened to every user on the host
    assert not list((tmp_path / "cache").rglob("build-*")), "the build's work folder was left behind"
