"""A damaged image is recognised by the file list recorded at its build, reported by
`kernels list` and `doctor BUNDLE`, and `run --rebuild` builds it again from scratch."""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import pack_world_bundle, printed_by_kernel, run_env_for, run_kbundle
from kbundle import contract

pytestmark = pytest.mark.docker


def damage(client, image: str) -> None:
    """Cut numpy/__init__.py short inside the image and put the result under the image's own tag
    (labels are inherited, so the recorded file list is the original's)."""
    dockerfile = (
        f"FROM {image}\nUSER root\n"
        f"RUN f=$(ls {contract.PREFIX}/lib/python3.*/site-packages/numpy/__init__.py) && head -c 100 $f > /tmp/x "
        f"&& cat /tmp/x > $f\nUSER {contract.USER}\n"
    )
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=image, rm=True)


def health(env: dict, kernel: str) -> str:
    proc = run_kbundle(["kernels", "list", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    return next(k["health"] for k in json.loads(proc.stdout) if k["name"] == kernel)


def test_a_damaged_image_is_reported_and_rebuild_heals_it(world, tmp_path, docker_client, monkeypatch):
    env = run_env_for(tmp_path)
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])  # printed_by_kernel finds the kernel there
    name = f"kbt-rebuild-{uuid.uuid4().hex[:8]}"
    kernel = f"kbundle-{name}"
    bundle = pack_world_bundle(world, env, tmp_path / "sender", name)
    (tmp_path / "here").mkdir()
    proc = run_kbundle(["run", str(bundle), "--yes", "--json"], env, cwd=tmp_path / "here", timeout=900)
    assert proc.returncode == 0, proc.stderr
    image = json.loads(proc.stdout)["image"]
    images = {image}
    try:
        assert health(env, kernel) == "ok"
        first_id = docker_client.api.inspect_image(image)["Id"]
        damage(docker_client, image)
        images.add(docker_client.api.inspect_image(image)["Id"])

        assert health(env, kernel).startswith("image damaged")
        doctor = run_kbundle(["doctor", str(bundle), "--json"], env)
        findings = json.loads(doctor.stdout)["findings"]
        assert any(
            f["topic"] == "image" and "damaged" in f["message"] and "--rebuild" in f["message"] for f in findings
        )

        rerun = run_kbundle(["run", str(bundle), "--yes", "--json"], env, cwd=tmp_path / "here", timeout=900)
        assert rerun.returncode == 0 and json.loads(rerun.stdout)["built"] is False  # a plain rerun reuses it

        rebuilt = run_kbundle(
            ["run", str(bundle), "--yes", "--json", "--rebuild"], env, cwd=tmp_path / "here", timeout=900
        )
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert json.loads(rebuilt.stdout)["built"] is True
        new_id = docker_client.api.inspect_image(image)["Id"]
        images.add(new_id)
        assert new_id != first_id  # built anew: no cached step was reused
        assert health(env, kernel) == "ok"
        assert printed_by_kernel(kernel, "import numpy; print(numpy.__name__)").strip() == "numpy"
    finally:
        for ref in images:
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)


def test_damaged_cache_entries_are_replaced_with_a_warning_and_never_built_in(world, tmp_path, monkeypatch):
    """A conda package's file, a wheel and a .pyc, each cut short in kbundle's cache after a run:
    the next build removes them, fetches or compiles them again, says so, and its kernel imports
    what they hold."""
    env = run_env_for(tmp_path)
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    name = f"kbt-heal-{uuid.uuid4().hex[:8]}"
    kernel = f"kbundle-{name}"
    bundle = pack_world_bundle(world, env, tmp_path / "sender", name)
    (tmp_path / "here").mkdir()
    # --rebuild: installed even when the engine holds every step image of this environment (image/chain.py),
    # so that the caches fill.
    args = ["run", str(bundle), "--yes", "--json", "--rebuild"]
    proc = run_kbundle(args, env, cwd=tmp_path / "here", timeout=900)
    assert proc.returncode == 0, proc.stderr
    images = {json.loads(proc.stdout)["image"]}
    try:
        cache = Path(env["KBUNDLE_CACHE_DIR"])
        numpy_init = next(cache.glob("pkgs/numpy-*/lib/python3.*/site-packages/numpy/__init__.py"))
        wheel = next(cache.glob("wheels/**/tabulate-*.whl"))
        pyc = max(cache.glob("pyc/*/*.pyc"), key=lambda p: p.stat().st_size)  # some module's bytecode
        for path in (numpy_init, wheel, pyc):
            with open(path, "r+b") as fh:  # what a crash or a full disk leaves
                fh.truncate(path.stat().st_size // 2)

        rebuilt = run_kbundle(
            ["run", str(bundle), "--yes", "--json", "--rebuild"], env, cwd=tmp_path / "here", timeout=900
        )
        assert rebuilt.returncode == 0, rebuilt.stderr
        images.add(json.loads(rebuilt.stdout)["image"])
        warnings = [line for line in rebuilt.stderr.splitlines() if line.startswith("warning:")]
        assert any("conda package numpy" in w and "damaged" in w and "__init__.py" in w for w in warnings), warnings
        assert any("wheel tabulate" in w and "sha256" in w for w in warnings), warnings
        assert any(".pyc file(s) were damaged" in w for w in warnings), warnings
        code = "import numpy, tabulate; print(numpy.__name__, tabulate.__name__)"
        assert printed_by_kernel(kernel, code).strip() == "numpy tabulate"
    finally:
        for ref in images:
            subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)
