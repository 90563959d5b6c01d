"""One environment: pip's side sits on conda's side as it did on the sender's machine.

The world's channel publishes kbdep 0.4 (its module says ORIGIN 'conda'); the world's index
serves only kbdep 0.3 ('index'), and kbrange 1.5, which needs kbdep>=0.3. An environment takes
kbdep 0.4 from conda and kbrange==1.5 from pip. On the sender's machine pip saw conda's kbdep
installed and satisfying, and left it alone: the image must do the same, whether pack locked
the conda side or the recipient's run resolved it. The real engine, the world's channel and
index on 127.0.0.1, and the image's own pip for `pip check`.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
import zipfile

import pytest

from helpers import run_kbundle

pytestmark = pytest.mark.docker

_kbundle = functools.partial(run_kbundle, timeout=900)


def _env(root) -> dict:
    env = dict(os.environ)
    env.update(
        JUPYTER_DATA_DIR=str(root / "jupyter"),
        KBUNDLE_CACHE_DIR=str(root / "cache"),
        PIP_CONFIG_FILE=os.devnull,  # the world's index only: no user pip.conf or find-links
        PIP_FIND_LINKS="",
    )
    env.pop("JUPYTER_PATH", None)
    return env


def _pack_and_run(world, root, lock: str) -> tuple[dict, dict, str]:
    """Pack the kbdep/kbrange environment with `--lock LOCK`, run it; (manifest, run's JSON, run's stderr)."""
    env = _env(root)
    name = f"kbone-{uuid.uuid4().hex[:8]}"
    sender = root / "sender"
    sender.mkdir()
    (sender / f"{name}.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    (sender / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - kbdep=0.4\n  - pip:\n    - --index-url {world['pypi_index']}\n"
        "    - kbrange==1.5\n"
    )
    bundle = sender / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--lock", lock, "--base-image", world["base_image"]]
    proc = _kbundle([*args, "-o", bundle], env, sender, timeout=240)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("kbundle.json"))
    recipient = root / "recipient"
    recipient.mkdir()
    proc = _kbundle(
        ["run", bundle, "--base-image", world["base_image"], "--gpus", "none", "--json", "--yes"], env, recipient
    )
    assert proc.returncode == 0, proc.stderr
    return manifest, json.loads(proc.stdout), proc.stderr


def _in_image(docker_client, image: str, code: str) -> str:
    # As root: conda-meta is the image's own record, not the kernel user's to read.
    out = docker_client.containers.run(image, ["python", "-c", code], remove=True, network_disabled=True, user="0")
    return out.decode().strip()


_PROBE = """
import json, subprocess, sys, pathlib, kbdep, kbrange
check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
prefix = pathlib.Path(sys.prefix)
record = next(json.loads(p.read_text()) for p in (prefix / "conda-meta").glob("kbdep-*.json"))
missing = [f for f in record["files"] if not (prefix / f).exists()]
installers = {p.name: p.joinpath("INSTALLER").read_text().strip() for p in prefix.glob("lib/python3*/site-packages/kb*.dist-info")}
print(json.dumps({"kbdep": [kbdep.__version__, kbdep.ORIGIN], "kbrange": [kbrange.__version__, kbrange.ORIGIN],
                  "check": [check.returncode, check.stdout.strip()], "record": [record["version"], missing],
                  "installers": installers}))
"""


def _assert_conda_kept(docker_client, image: str) -> None:
    seen = json.loads(_in_image(docker_client, image, _PROBE))
    assert seen["kbdep"] == ["0.4", "conda"], seen  # conda's, not the index's 0.3
    assert seen["kbrange"] == ["1.5", "index"], seen
    assert seen["check"] == [0, "No broken requirements found."], seen
    assert seen["record"] == ["0.4", []], seen  # conda's record still matches the files on disk
    assert seen["installers"] == {"kbdep-0.4.dist-info": "conda", "kbrange-1.5.dist-info": "pip"}, seen


def test_conda_locked_at_pack_keeps_condas_distribution(world, docker_client, tmp_path):
    manifest, data, stderr = _pack_and_run(world, tmp_path, "auto")
    assert "warning" not in stderr, stderr  # pip check and conda's records: nothing to say
    assert manifest["locked"] is True and manifest["pip_locked"] is True
    # The lock lists only what pip installs: kbrange; kbdep is conda's.
    assert [p.split(" ")[0] for p in manifest["pip"]] == ["kbrange==1.5"], manifest["pip"]
    try:
        _assert_conda_kept(docker_client, data["image"])
    finally:
        docker_client.images.remove(data["image"], force=True)


def test_conda_resolved_at_run_keeps_condas_distribution(world, docker_client, tmp_path):
    manifest, data, stderr = _pack_and_run(world, tmp_path, "never")
    assert "warning" not in stderr, stderr
    assert manifest["locked"] is False and manifest["pip_locked"] is False
    assert manifest["pip"] == ["kbrange==1.5"]
    try:
        _assert_conda_kept(docker_client, data["image"])
        assert [line.split(" ")[0] for line in data["pip_resolved"]] == ["kbrange==1.5"], data["pip_resolved"]
    finally:
        docker_client.images.remove(data["image"], force=True)
