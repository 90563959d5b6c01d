"""A normal sdist pip requirement (a .tar.gz whose files sit under `name-version/`, as `python -m
build --sdist` makes it) builds in the sandbox and installs through `kbundle run`: the real CLI, the
real engine, the sdist served over HTTP on 127.0.0.1, and the kernel importing it through
jupyter_client and the registered kernelspec."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from helpers import printed_by_kernel, run_kbundle
from sdistkit import backend, pyproject, sdist_bytes, served_folder

pytestmark = pytest.mark.docker


# The project's own build code: its __init__.py is the one in the sdist.
BACKEND = backend(
    "kbsdist",
    "1.0",
    """
def _init_source():
    with open(os.path.join(NAME, "__init__.py"), "rb") as fh:
        return fh.read()
""",
)


@pytest.fixture
def sdist_server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    data = sdist_bytes(
        "kbsdist-1.0",
        {
            "PKG-INFO": "Metadata-Version: 2.1\nName: kbsdist\nVersion: 1.0\n",
            "pyproject.toml": pyproject("kbsdist", "1.0", "kbsdist_backend"),
            "kbsdist_backend.py": BACKEND,
            "kbsdist/__init__.py": '__version__ = "1.0"\nORIGIN = "sdist"\n',
        },
    )
    (folder / "kbsdist-1.0.tar.gz").write_bytes(data)
    with served_folder(folder) as url:
        yield f"{url}/kbsdist-1.0.tar.gz"


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
