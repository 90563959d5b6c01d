"""`open_lab`: the install hint when JupyterLab is missing, and the command it runs when present."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kbundle.errors import KbundleError, UsageError
from kbundle.kernel import lab


@pytest.fixture
def work(tmp_path) -> tuple[Path, Path]:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    notebook = workdir / "demo.ipynb"
    notebook.write_text("{}")
    return workdir, notebook


def test_missing_jupyterlab_says_how_to_install(work, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))  # hide the JupyterLab of the test venv
    with pytest.raises(KbundleError, match=r"pip install jupyterlab") as info:
        lab.open_lab(*work, "kbundle-demo")
    assert "kbundle-demo" in str(info.value) and "\n" not in str(info.value)


def test_runs_jupyterlab_on_the_workdir_with_the_kernel(work, tmp_path, monkeypatch):
    """A stand-in `jupyter-lab` on PATH records how it was started; kbundle returns its exit code."""
    workdir, notebook = work
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv.json"
    script = bindir / "jupyter-lab"
    script.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(record)!r}, 'w'))\n"
        "sys.exit(3)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))  # the stand-in, not the venv's JupyterLab
    assert lab.open_lab(workdir, notebook, "kbundle-demo") == 3
    seen = json.loads(record.read_text())
    assert seen["cwd"] == str(workdir.resolve())
    root_flag = ["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []
    assert seen["argv"] == [
        f"--ServerApp.root_dir={workdir.resolve()}",
        "--MultiKernelManager.default_kernel_name=kbundle-demo",
        *root_flag,
        str(notebook.resolve()),
    ]


def test_notebook_must_be_inside_the_workdir(work, tmp_path):
    workdir, _ = work
    with pytest.raises(UsageError, match="outside the working directory"):
        lab.open_lab(workdir, tmp_path / "elsewhere.ipynb", "k")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab_bin() -> Path:
    """A JupyterLab in its own venv, cached beside the offline world.

    Not in the test venv: JupyterLab's dependencies make `import nbformat` several times
    slower (jsonschema's format checkers), which would skew bench/bench_pack.py's baseline;
    and users often keep JupyterLab in another environment anyway."""
    import subprocess

    import world

    venv = world.world_dir() / "jupyterlab-venv"
    lab_bin = venv / "bin"
    if not (lab_bin / "jupyter-lab").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(lab_bin / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "jupyterlab>=4"],
            check=True,
            capture_output=True,
        )
    return lab_bin


def test_real_jupyterlab_serves_the_workdir_with_the_kernel_as_default(work, tmp_path, monkeypatch, jupyterlab_bin):
    """JupyterLab itself, started by open_lab: its root is the workdir and kbundle's kernel is the default."""
    import subprocess
    import time
    import urllib.request

    from kbundle.kernel.spec import KernelRequest, install_kernelspec

    monkeypatch.setenv("PATH", f"{jupyterlab_bin}{os.pathsep}{os.environ['PATH']}")
    assert lab.find_jupyterlab() == [str(jupyterlab_bin / "jupyter-lab")]

    workdir, notebook = work
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("BROWSER", "true")  # no browser on a CI machine: the "open" is a no-op
    install_kernelspec(
        KernelRequest("kbundle-demo", "demo (kbundle)", "kbundle-test/none:latest", str(workdir), [], "0" * 64)
    )
    port, token = _free_port(), "kbundle-test-token"
    monkeypatch.setenv("JUPYTER_PORT", str(port))
    monkeypatch.setenv("JUPYTER_TOKEN", token)

    code = (
        "import sys; from kbundle.kernel.lab import open_lab; "
        f"sys.exit(open_lab({str(workdir)!r}, {str(notebook)!r}, 'kbundle-demo'))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/kernelspecs?token={token}", timeout=2) as resp:
                    specs = json.load(resp)
                break
            except OSError:
                assert proc.poll() is None, f"JupyterLab exited early: {proc.stdout.read().decode()[-2000:]}"
                assert time.monotonic() < deadline, "JupyterLab did not answer within 90 s"
                time.sleep(0.5)
        assert specs["default"] == "kbundle-demo"
        assert specs["kernelspecs"]["kbundle-demo"]["spec"]["display_name"] == "demo (kbundle)"
        with urllib.request.urlopen(f"{base}/contents?token={token}", timeout=5) as resp:
            listing = json.load(resp)
        assert notebook.name in {item["name"] for item in listing["content"]}
    finally:
        req = urllib.request.Request(f"{base}/shutdown?token={token}", method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
