"""A lock the recipient cannot install is never written: pip's choice is checked against the
image's Python from each wheel's own metadata, not only from the index page, since a mirror
whose pages carry no `data-requires-python` (the world's index, like many corporate ones)
would let pip pick a wheel that refuses the image's Python."""

from __future__ import annotations

import json
import os
import zipfile

import pytest

from helpers import kbundle, notebook
from kbundle.pipplatform import python_refusals


def _report(*items: tuple[str, str, str | None]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v, "requires_python": rp}} for n, v, rp in items]}


@pytest.mark.parametrize(
    "needs, python, refused",
    [
        (">=3.10", "3.7", True),
        (">=3.10", "3.11", False),
        (">=3.6", "3.7", False),
        (">=2.7, !=3.0.*, !=3.1.*", "3.7", False),
        ("<3.8", "3.11.7", True),
        (None, "3.7", False),
        ("not a specifier", "3.7", False),  # pip would refuse such metadata itself
    ],
)
def test_python_refusals_reads_each_wheels_metadata(needs, python, refused):
    found = python_refusals(_report(("absl-py", "2.5.0", needs)), python)
    assert bool(found) is refused
    if refused:
        assert "absl-py 2.5.0" in found[0] and needs in found[0] and python in found[0]


def _pack(world, tmp_path, python: str, lock: str = "auto"):
    nb = notebook(tmp_path)
    env = tmp_path / "environment.yml"
    env.write_text(
        f"name: p\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={python}\n  - ipykernel\n"
        f"  - pip\n  - pip:\n    - --index-url {world['pypi_index']}\n    - kbpy\n"
    )
    out = tmp_path / f"p{python}.kbundle"
    pip_env = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    args = ["pack", nb, "-e", env, "-o", out, "--base-image", world["base_image"], "--lock", lock]
    proc = kbundle(*args, env=pip_env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(out) as zf:
        return out, json.loads(zf.read("kbundle.json"))


@pytest.mark.docker
def test_pack_locks_only_what_the_images_python_accepts(world, tmp_path):
    if "3.7" not in world["pythons"]:
        pytest.skip("the world has no Python 3.7")
    _out, manifest = _pack(world, tmp_path, "3.7")
    assert manifest["pip_locked"] is True
    assert [p.split(" ")[0] for p in manifest["pip"]] == ["kbpy==1.0"]
    # The same index, for the world's newer Python: 2.0 is there and taken.
    _out, manifest = _pack(world, tmp_path, world["python"])
    assert [p.split(" ")[0] for p in manifest["pip"]] == ["kbpy==2.0"]


@pytest.mark.docker
def test_run_resolves_only_what_the_images_python_accepts(world, docker_client, tmp_path):
    """--lock never: the recipient's resolution for Python 3.7 meets the same index, and builds."""
    if "3.7" not in world["pythons"]:
        pytest.skip("the world has no Python 3.7")
    bundle, _manifest = _pack(world, tmp_path, "3.7", lock="never")
    env = dict(
        os.environ,
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),
        KBUNDLE_CACHE_DIR=str(tmp_path / "cache"),
    )
    recipient = tmp_path / "recipient"
    recipient.mkdir()
    proc = kbundle(
        "run",
        bundle,
        "--base-image",
        world["base_image"],
        "--gpus",
        "none",
        "--json",
        "--yes",
        env=env,
        cwd=recipient,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    try:
        assert [line.split(" ")[0] for line in data["pip_resolved"]] == ["kbpy==1.0"]
        out = docker_client.containers.run(
            data["image"],
            ["python", "-c", "import kbpy, sys; print(kbpy.__version__, sys.version_info[:2])"],
            remove=True,
            network_disabled=True,
        )
        assert out.decode().split()[0] == "1.0"
    finally:
        docker_client.images.remove(data["image"], force=True)
