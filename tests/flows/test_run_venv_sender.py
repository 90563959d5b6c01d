"""Every sender, end to end: a notebook whose kernel is a plain venv (`python -m venv`, `pip
install ipykernel six`, `ipykernel install`) is packed with no `-e`, and the friend's `run`
gives a kernel where every distribution of that venv imports at the venv's version.

The real parts: a venv made here and filled by pip from this machine's own pip configuration,
its kernelspec in a private Jupyter folder, the world's conda channel for the Python, the real
engine, and a real Jupyter client on the registered kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from helpers import printed_by_kernel, run_kbundle

pytestmark = pytest.mark.docker


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def sent(world, tmp_path_factory, docker_client):
    root = tmp_path_factory.mktemp("venv-sender")
    venv = root / "venv"
    assert _run([sys.executable, "-m", "venv", venv]).returncode == 0
    made = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "ipykernel", "six==1.16.0"], timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    jupyter = root / "jupyter"
    name = f"kbvenv-{uuid.uuid4().hex[:6]}"
    added = _run([venv / "bin" / "python", "-m", "ipykernel", "install", "--prefix", jupyter, "--name", name])
    assert added.returncode == 0, added.stderr
    listed = _run([venv / "bin" / "python", "-m", "pip", "list", "--format", "json"])
    dists = {d["name"]: d["version"] for d in json.loads(listed.stdout)}

    sender = root / "sender"
    sender.mkdir()
    nb = {"cells": [], "metadata": {"kernelspec": {"name": name, "display_name": name}}, "nbformat": 4}
    (sender / f"{name}.ipynb").write_text(json.dumps({**nb, "nbformat_minor": 5}))
    env = dict(os.environ, JUPYTER_PATH=str(jupyter / "share" / "jupyter"), JUPYTER_DATA_DIR=str(root / "jd"))
    env.pop("CONDA_PREFIX", None)
    packed = run_kbundle(
        ["pack", f"{name}.ipynb", "--channel", world["channel"], "--base-image", world["base_image"]],
        env,
        sender,
        timeout=600,
    )
    assert packed.returncode == 0, packed.stderr
    recipient = root / "recipient"
    recipient.mkdir()
    env.update(JUPYTER_DATA_DIR=str(root / "recipient-jupyter"), KBUNDLE_CACHE_DIR=str(root / "cache"))
    env.pop("JUPYTER_PATH")
    ran = run_kbundle(
        ["run", sender / f"{name}.kbundle", "--base-image", world["base_image"], "--gpus", "none", "--yes", "--json"],
        env,
        recipient,
        timeout=1200,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = json.loads(ran.stdout)
    yield data, env, dists, packed
    docker_client.images.remove(data["image"], force=True)


def test_pack_says_it_read_the_venv_and_what_it_left_out(sent):
    _data, _env, _dists, packed = sent
    said = packed.stdout + packed.stderr
    assert "the venv" in said and "left out" in said, said


def test_the_kernel_has_the_venvs_distributions_at_their_versions(sent, monkeypatch):
    data, env, dists, _packed = sent
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    code = (
        "import json, importlib.metadata as md, six, ipykernel\n"
        "print(json.dumps({d.metadata['Name']: d.version for d in md.distributions()}))"
    )
    seen = json.loads(printed_by_kernel(data["kernel_name"], code))
    tools = {"pip", "setuptools", "wheel"}
    wanted = {n: v for n, v in dists.items() if n.lower() not in tools}
    assert {n: seen.get(n) for n in wanted} == wanted
