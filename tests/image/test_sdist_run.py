"""A normal sdist pip requirement (a .tar.gz whose files sit under `name-version/`, as `python -m
build --sdist` makes it) builds in the sandbox and installs through `kbundle run`: the real CLI, the
real engine, the sdist served over HTTP on 127.0.0.1, and the kernel importing it through
jupyter_client and the registered kernelspec."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import tarfile
import threading
import uuid

import pytest

from helpers import printed_by_kernel, run_kbundle

pytestmark = pytest.mark.docker


def sdist_bytes(top: str, files: dict[str, str]) -> bytes:
    """A .tar.gz as `python -m build --sdist` makes one: every file under one top folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


BACKEND = r'''
"""kbsdist's in-tree PEP 517 backend (the standard library alone: the world has no setuptools)."""
import base64, hashlib, os, zipfile

NAME, VERSION = "kbsdist", "1.0"
DIST = NAME + "-" + VERSION + ".dist-info"


def get_requires_for_build_wheel(config_settings=None):
    return []


def _hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(os.path.join(NAME, "__init__.py"), "rb") as fh:
        files = {NAME + "/__init__.py": fh.read()}
    files[DIST + "/METADATA"] = ("Metadata-Version: 2.1\nName: " + NAME + "\nVersion: " + VERSION + "\n").encode()
    files[DIST + "/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: kbsdist\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(p + "," + _hash(d) + "," + str(len(d)) + "\n" for p, d in files.items())
    files[DIST + "/RECORD"] = (record + DIST + "/RECORD,,\n").encode()
    filename = NAME + "-" + VERSION + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return filename
'''

PYPROJECT = """[build-system]
requires = []
build-backend = "kbsdist_backend"
backend-path = ["."]

[project]
name = "kbsdist"
version = "1.0"
"""


@pytest.fixture
def sdist_server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    data = sdist_bytes(
        "kbsdist-1.0",
        {
            "PKG-INFO": "Metadata-Version: 2.1\nName: kbsdist\nVersion: 1.0\n",
            "pyproject.toml": PYPROJECT,
            "kbsdist_backend.py": BACKEND,
            "kbsdist/__init__.py": '__version__ = "1.0"\nORIGIN = "sdist"\n',
        },
    )
    (folder / "kbsdist-1.0.tar.gz").write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/kbsdist-1.0.tar.gz"
    server.shutdown()


def test_an_sdist_with_a_top_folder_builds_and_installs_through_run(world, sdist_server, tmp_path, docker_client):
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), KBUNDLE_CACHE_DIR=str(tmp_path / "cache"))
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="")
    env.pop("JUPYTER_PATH", None)
    name = f"kbsdist-{uuid.uuid4().hex[:8]}"
    sender = tmp_path / "sender"
    sender.mkdir()
    (sender / f"{name}.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    (sender / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - pip:\n    - --index-url {world['pypi_index']}\n"
        f"    - kbsdist @ {sdist_server}\n"
    )
    bundle = sender / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--lock", "never"]
    proc = run_kbundle([*args, "--base-image", world["base_image"], "-o", bundle], env, sender, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recipient = tmp_path / "recipient"
    recipient.mkdir()
    proc = run_kbundle(
        ["run", bundle, "--base-image", world["base_image"], "--gpus", "none", "--json", "--yes"],
        env,
        recipient,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    try:
        resolved = {line.split("==")[0]: line for line in data["pip_resolved"]}
        assert resolved["kbsdist"].startswith("kbsdist==1.0 --hash=sha256:"), resolved
        assert resolved["kbsdist"].endswith(f"# built from {sdist_server}"), resolved
        os.environ["JUPYTER_DATA_DIR"], saved = env["JUPYTER_DATA_DIR"], os.environ.get("JUPYTER_DATA_DIR")
        try:
            printed = printed_by_kernel(
                data["kernel_name"], "import kbsdist; print(kbsdist.__version__, kbsdist.ORIGIN)"
            )
        finally:
            if saved is None:
                os.environ.pop("JUPYTER_DATA_DIR", None)
            else:
                os.environ["JUPYTER_DATA_DIR"] = saved
        assert printed.split() == ["1.0", "sdist"]
    finally:
        docker_client.images.remove(data["image"], force=True)
