"""`kbundle run --native --slurm --prefix-root DIR`: a cluster without containers.

The pure tests cover the refusal without --prefix-root, the kernelspec and the node agent's
pieces. The world tests pack a small world bundle (conda's kbdep 0.4, pip's kbrange==1.5), run it
with the real CLI and no engine in reach (DOCKER_HOST pointing nowhere), and start the kernel
with jupyter_client on the world's real one-node Slurm cluster: the node agent runs the prefix's
own python, with no container; `kernels remove` removes the prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import assert_one_error_line, run_kbundle, sleeping, squeue
from kbundle.kernel import node_agent, slurm
from kbundle.kernel.spec import KernelRequest, build_spec, launcher_path

NO_ENGINE = "unix:///nonexistent/docker.sock"
PRINT = (
    "import json, os, sys, kbdep, kbrange\n"
    "print(json.dumps({'prefix': sys.prefix, 'kbdep': kbdep.__version__, 'kbrange': kbrange.__version__,"
    " 'conda_prefix': os.environ.get('CONDA_PREFIX'), 'job': os.environ.get('SLURM_JOB_ID', '')}))"
)


# ----------------------------------------------------------------- pure


def test_without_prefix_root_it_is_refused_in_one_line(tmp_path):
    """Before any work, and before the bundle is even read: the nodes cannot see kbundle's cache."""
    env = dict(os.environ, KBUNDLE_CACHE_DIR=str(tmp_path / "cache"), DOCKER_HOST=NO_ENGINE)
    proc = run_kbundle(["run", tmp_path / "absent.kbundle", "--native", "--slurm"], env, tmp_path)
    assert_one_error_line(proc, "--prefix-root")
    assert proc.returncode == 2 and not (tmp_path / "cache").exists()


def _native_spec(prefix: str, workdir: Path) -> dict:
    job = slurm.SlurmOptions(partition="debug", login_address="127.0.0.1", start_timeout=60)
    env = {"PATH": f"{prefix}/bin:${{PATH}}", "CONDA_PREFIX": prefix}
    request = KernelRequest("kbundle-x-slurm", "x", "", str(workdir), [], "5" * 64, slurm=job, native=prefix, env=env)
    return build_spec(request, launcher_path())


def test_the_spec_runs_the_launcher_with_the_prefix_and_its_activation(tmp_path):
    spec = _native_spec("/shared/envs/0123456789abcdef", tmp_path)
    argv = spec["argv"]
    assert argv[argv.index("--native") + 1] == "/shared/envs/0123456789abcdef" and "--image" not in argv
    assert "--activate=CONDA_PREFIX=/shared/envs/0123456789abcdef" in argv and "--slurm" in argv
    assert spec["display_name"] == "x (kbundle, Slurm, native)"
    # The launcher runs on the login node: the prefix's activation is the node's, not the launcher's.
    assert "CONDA_PREFIX" not in spec["env"] and "PATH" not in spec["env"]
    assert spec["metadata"]["kbundle"]["native"] == "/shared/envs/0123456789abcdef"


def test_activation_arguments_and_the_node_environment(tmp_path):
    assert slurm.parse_activation(["PATH=/p/bin:${PATH}", "A=b=c"]) == {"PATH": "/p/bin:${PATH}", "A": "b=c"}
    with pytest.raises(slurm.SlurmError):
        slurm.parse_activation(["no-equals"])
    request = {"activation": {"PATH": "/p/bin:${PATH}"}, "environment": {"KBUNDLE_BANNER_BUNDLE": "x"}}
    env = node_agent.native_environment(request, {"PATH": "/usr/bin", "HOME": "/h"}, "/tmp/k")
    assert env == {"PATH": "/p/bin:/usr/bin", "HOME": "/h", "KBUNDLE_BANNER_BUNDLE": "x", "TMPDIR": "/tmp/k"}
    with pytest.raises(node_agent.NodeError, match="not visible on node"):
        node_agent.native_python(str(tmp_path / "absent"))


def test_the_review_says_the_kernel_runs_on_a_node_from_this_prefix():
    from kbundle.flows.native import _slurm_words
    from kbundle.flows.review import NativeReview, native_review_lines

    words = _slurm_words(slurm.SlurmOptions(partition="gpu", gres="gpu:1"))
    review = NativeReview("s", "/shared/p", (), "c", 0, slurm=words)
    (line,) = [x for x in native_review_lines(review) if x.startswith("kernel ")]
    assert "a Slurm compute node (partition gpu, gres gpu:1)" in line and "every node must see the prefix" in line
    assert _slurm_words(None) == ""


# ----------------------------------------------------------------- the world's Slurm


def _env(root: Path) -> dict:
    env = dict(os.environ)  # SLURM_CONF from the `slurm` fixture
    env.update(
        JUPYTER_DATA_DIR=str(root / "jupyter"),
        KBUNDLE_CACHE_DIR=str(root / "cache"),
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
        DOCKER_HOST=NO_ENGINE,  # no engine answers, here or on the node
    )
    env.pop("JUPYTER_PATH", None)
    return env


def _pack(world, folder: Path, name: str) -> Path:
    """python, ipykernel, conda's kbdep 0.4 and pip's kbrange==1.5, locked (as tests/flows/test_run_native.py)."""
    folder.mkdir(parents=True)
    nb = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (folder / f"{name}.ipynb").write_text(json.dumps(nb))
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - kbdep=0.4\n  - pip:\n    - --index-url {world['pypi_index']}\n"
        "    - kbrange==1.5\n"
    )
    out = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--base-image", world["base_image"], "-o", out]
    proc = run_kbundle(args, _env(folder), folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def registered(world, slurm, tmp_path_factory):
    """The bundle run with --native --slurm --prefix-root <a shared folder> --yes --json."""
    root = tmp_path_factory.mktemp("native-slurm")
    bundle = _pack(world, root / "sender", f"kbns-{uuid.uuid4().hex[:8]}")
    recipient = root / "recipient"
    recipient.mkdir()
    args = ["run", bundle, "--native", "--slurm", "--prefix-root", root / "shared", "--partition", "debug"]
    proc = run_kbundle([*args, "--yes", "--json"], _env(root), recipient, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), _env(root), root / "shared"


def test_the_prefix_goes_under_the_root_and_the_kernel_is_a_slurm_one(registered):
    data, _, shared = registered
    prefix = Path(data["native"]["prefix"])
    assert prefix.parent == shared and (prefix / "bin" / "python").is_file()
    assert data["kernel_name"].endswith("-slurm") and data["slurm"]["partition"] == "debug"
    spec = json.loads((Path(data["kernelspec"]) / "kernel.json").read_text())
    assert spec["argv"][0] == str(launcher_path()) and spec["argv"][spec["argv"].index("--native") + 1] == str(prefix)


def test_the_kernel_runs_the_prefix_on_the_node_and_interrupts_reach_it(registered, monkeypatch):
    """No container anywhere: the job step runs the prefix's python; the key never reaches argv."""
    from jupyter_client.manager import KernelManager

    data, env, _ = registered
    prefix = data["native"]["prefix"]
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    km = KernelManager(kernel_name=data["kernel_name"])
    km.start_kernel()
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        out: list = []
        reply = kc.execute_interactive(PRINT, timeout=60, output_hook=out.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        seen = json.loads("".join(m["content"]["text"] for m in out if m["msg_type"] == "stream"))
        assert seen["prefix"] == prefix and seen["conda_prefix"] == prefix and seen["job"]
        assert (seen["kbdep"], seen["kbrange"]) == ("0.4", "1.5")
        processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert km.session.key.decode() not in processes
        sleeping(kc)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        km.shutdown_kernel()
        kc.stop_channels()
    deadline = time.monotonic() + 40
    while squeue():  # EOF stopped the kernel and the step ended: nothing stays allocated
        assert time.monotonic() < deadline, squeue()
        time.sleep(0.2)


def test_a_node_that_cannot_see_the_prefix_says_so_in_one_line(slurm, tmp_path):
    from jupyter_client.connect import write_connection_file

    spec = _native_spec(str(tmp_path / "not-shared"), tmp_path)
    connection, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1", key=b"k" * 32)
    argv = [a.replace("{connection_file}", connection) for a in spec["argv"]]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not visible on node" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_kernels_remove_removes_the_prefix(registered):
    data, env, _ = registered
    prefix = Path(data["native"]["prefix"])
    proc = run_kbundle(["kernels", "remove", data["kernel_name"], "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["native_removed"] is True
    assert not prefix.exists()
