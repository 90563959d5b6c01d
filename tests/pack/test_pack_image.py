"""The rendered Dockerfile against the real Docker engine, on the offline world's Debian
base image: the image contract of docs/architecture.md (env at /opt/kbundle/env, pip
wheels installed into it offline before the build, the env in its layer folders, activating
ENTRYPOINT, non-root user, labels, env layers cached apart from the notebook)."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

import world as world_module
from helpers import kbundle, notebook
from kbundle.image import pipinstall
from kbundle.image.context import stage_layers, write_static

pytestmark = pytest.mark.docker
LABEL = {"kbundle.test": "1"}


def _wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel, so the pip step has something real to install offline."""
    path = folder / "kbtestwheel-1.0-py3-none-any.whl"
    files = {
        "kbtestwheel/__init__.py": b"VALUE = 'from-the-wheel'\n",
        "kbtestwheel-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: kbtestwheel\nVersion: 1.0\n",
        "kbtestwheel-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "kbtestwheel-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("kbtestwheel-1.0.dist-info/RECORD", record)
    return path


@pytest.fixture(scope="module")
def built(world, docker_client, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image")
    env_file = tmp / "environment.yml"
    env_file.write_text(
        f"name: img\nchannels: [defaults]\ndependencies:\n  - python={world['python']}\n  - numpy\n"
        "  - pip\n  - pip:\n    - kbtestwheel==1.0\n"
    )
    nb = notebook(tmp, name="image-test.ipynb")
    out = tmp / "image-test.kbundle"
    result = kbundle(
        "pack",
        nb,
        "-e",
        env_file,
        "-o",
        out,
        "--channel",
        world["channel"],
        "--base-image",
        world["base_image"],
        "--lock",
        "auto",  # the conda env locks against the world; kbtestwheel is on no index, so pip stays as written
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(zipfile.ZipFile(out).read("kbundle.json"))
    assert manifest["locked"] and manifest["pip"] == ["kbtestwheel==1.0"] and not manifest.get("pip_locked")

    ctx = tmp / "ctx"
    staging = tmp / "stage"
    world_module.solve_and_install(world["channel"], world_module.ENV_SPECS + ["pip"], staging)
    shutil.copytree(staging, ctx / "env", symlinks=True)
    (ctx / "env/etc/conda/activate.d").mkdir(parents=True, exist_ok=True)
    (ctx / "env/etc/conda/activate.d/kbtest.sh").write_text("export KBTEST_ACTIVATED=yes\n")
    nvidia = ctx / f"env/lib/python{world['python']}/site-packages/nvidia/cublas/lib"
    nvidia.mkdir(parents=True)  # an empty folder: it must still be in the image
    wheel = _wheel(tmp)
    line = f"kbtestwheel==1.0 --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}"
    pipinstall.install(docker_client, world["base_image"], ctx / "env", [wheel], [line])  # as run does
    with zipfile.ZipFile(out) as zf:
        write_static(ctx, zf.read("Dockerfile").decode())  # Dockerfile + activation script, as run writes them
        (ctx / "work").mkdir()
        (ctx / "work/image-test.ipynb").write_bytes(zf.read("work/image-test.ipynb"))
    stage_layers(ctx)

    tag = f"kbundle-test/pack-image:{hashlib.sha256((ctx / 'Dockerfile').read_bytes()).hexdigest()[:12]}"
    docker_client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True, labels=LABEL)
    yield {"tag": tag, "ctx": ctx, "manifest": manifest, "nvidia": nvidia}
    for image in docker_client.images.list(
        filters={"label": "kbundle.test=1", "reference": "kbundle-test/pack-image*"}
    ):
        try:
            docker_client.images.remove(image.id, force=True)
        except Exception:
            pass


def _run(docker_client, tag: str, *cmd: str) -> str:
    return docker_client.containers.run(tag, list(cmd), remove=True, labels=LABEL).decode()


PROBE = """
import json, os, sys
import ipykernel, numpy, kbtestwheel
print(json.dumps({"prefix": sys.prefix, "conda_prefix": os.environ.get("CONDA_PREFIX"),
  "activated": os.environ.get("KBTEST_ACTIVATED"), "ld": os.environ.get("LD_LIBRARY_PATH", ""),
  "uid": os.getuid(), "cwd": os.getcwd(), "wheel": kbtestwheel.VALUE,
  "notebook": os.path.exists("/opt/kbundle/work/image-test.ipynb")}))
"""


def test_image_runs_the_envs_python_activated_as_non_root(built, docker_client):
    out = json.loads(_run(docker_client, built["tag"], "python", "-c", PROBE).strip().splitlines()[-1])
    assert out["prefix"] == "/opt/kbundle/env" and out["conda_prefix"] == "/opt/kbundle/env"
    assert out["activated"] == "yes"  # etc/conda/activate.d/*.sh ran
    assert "/opt/kbundle/env/lib/python" in out["ld"] and "nvidia/cublas/lib" in out["ld"]
    assert out["uid"] != 0
    assert out["wheel"] == "from-the-wheel"  # installed into the env before the build, offline
    assert out["notebook"] and out["cwd"] == "/opt/kbundle/work"


def test_image_labels_carry_the_bundle_identity(built, docker_client):
    labels = docker_client.images.get(built["tag"]).labels
    manifest = built["manifest"]
    assert labels["org.kbundle.name"] == manifest["name"] == "image-test"
    assert labels["org.kbundle.format"] == "1"
    # The content hash covers the Dockerfile, so the Dockerfile cannot carry it: `kbundle run`
    # applies that label at build time (tests/flows/test_run_docker.py checks it).
    assert "org.kbundle.content-hash" not in labels


def test_a_new_notebook_reuses_the_environment_layer(built, docker_client):
    ctx = built["ctx"]
    (ctx / "work/image-test.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    tag = built["tag"] + "-nb2"
    logs = docker_client.api.build(path=str(ctx), tag=tag, rm=True, forcerm=True, labels=LABEL, decode=True)
    lines = "".join(chunk.get("stream", "") for chunk in logs)
    steps = lines.split("Step ")
    env_steps = [s for s in steps if "COPY env-layers/" in s]
    work_step = next(s for s in steps if "COPY work/" in s)
    assert len(env_steps) == 4 and all("Using cache" in s for s in env_steps), env_steps
    assert "Using cache" not in work_step
