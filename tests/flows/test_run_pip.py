"""`kbundle run` resolves the pip: section on the host, for the image, with pip and the bundle's
indexes: a range, a git requirement (built into a wheel by the env's own Python in a throwaway
container) and a `+cu118` local version from an extra index. The real engine, the world's PEP
503 indexes and git repository on 127.0.0.1, and a real Jupyter client through the kernelspec."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import printed_by_kernel, run_kbundle

pytestmark = pytest.mark.docker


_kbundle = functools.partial(run_kbundle, timeout=900)


@pytest.fixture(scope="module")
def pip_run(world, tmp_path_factory, docker_client):
    root = tmp_path_factory.mktemp("kbundle-pip")
    env = dict(os.environ)
    env.update(
        JUPYTER_DATA_DIR=str(root / "jupyter"),
        KBUNDLE_CACHE_DIR=str(root / "cache"),
        PIP_CONFIG_FILE=os.devnull,  # the world's indexes only: no user pip.conf or find-links
        PIP_FIND_LINKS="",
    )
    env.pop("JUPYTER_PATH", None)
    name = f"kbpip-{uuid.uuid4().hex[:8]}"
    sender = root / "sender"
    sender.mkdir()
    (sender / f"{name}.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    vcs = f"git+{world['git_repo']}@{world['git_tag']}"
    (sender / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - pip:\n    - --index-url {world['pypi_index']}\n"
        f"    - --extra-index-url {world['pypi_extra_index']}\n"
        f"    - kbrange>=1.2,<2\n    - {vcs}\n    - kbdemo==1.0+cu118\n"
    )
    bundle = sender / f"{name}.kbundle"
    # --lock never: the sender leaves every pip line as written, for the recipient to resolve.
    proc = _kbundle(
        [
            "pack",
            f"{name}.ipynb",
            "-e",
            "environment.yml",
            "--lock",
            "never",
            "--base-image",
            world["base_image"],
            "-o",
            bundle,
        ],
        env,
        sender,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    recipient = root / "recipient"
    recipient.mkdir()
    proc = _kbundle(
        ["run", bundle, "--base-image", world["base_image"], "--gpus", "none", "--json", "--yes"], env, recipient
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    yield data, env, vcs
    docker_client.images.remove(data["image"], force=True)


def test_run_resolves_ranges_vcs_and_extra_index_versions(pip_run):
    data, env, vcs = pip_run
    assert data["built"] is True
    resolved = {line.split("==")[0]: line for line in data["pip_resolved"]}
    assert set(resolved) == {"kbrange", "kbdep", "kbgit", "kbdemo"}
    assert resolved["kbrange"].startswith("kbrange==1.5 --hash=sha256:")  # the range, resolved for the image
    assert resolved["kbdep"].startswith("kbdep==0.3 --hash=sha256:")  # and its dependency
    assert resolved["kbdemo"].startswith("kbdemo==1.0+cu118 --hash=sha256:")  # from the extra index
    commit = subprocess.run(
        ["git", "ls-remote", vcs.split("+", 1)[1].rsplit("@", 1)[0], "refs/tags/v0.1"],
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    assert resolved["kbgit"].startswith("kbgit==0.1 --hash=sha256:")
    assert resolved["kbgit"].endswith(f"# built from {vcs.rsplit('@', 1)[0]}@{commit}")
    log = (Path(data["workdir"]) / ".kbundle" / "build.log").read_text()
    assert all(line in log for line in data["pip_resolved"]), log[-3000:]
    spec = json.loads((Path(data["kernelspec"]) / "kernel.json").read_text())
    assert spec["metadata"]["kbundle"]["pip_resolved"] == data["pip_resolved"]


def test_the_kernel_imports_all_three(pip_run, monkeypatch):
    data, env, _ = pip_run
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    code = (
        "import json, kbrange, kbdemo, kbgit, kbdep\n"
        "print(json.dumps({m.__name__: [m.__version__, m.ORIGIN] for m in (kbrange, kbdemo, kbgit, kbdep)}))"
    )
    assert json.loads(printed_by_kernel(data["kernel_name"], code, ready_timeout=90)) == {
        "kbrange": ["1.5", "index"],
        "kbdemo": ["1.0+cu118", "extra-index"],
        "kbgit": ["0.1", "git"],
        "kbdep": ["0.3", "index"],
    }
