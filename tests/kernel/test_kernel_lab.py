"""`open_lab`: the install hint when JupyterLab is missing, and the command it runs when present."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import labkit  # tests/kernel/labkit.py
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


@pytest.fixture(scope="module")
def jupyterlab_bin() -> Path:
    return labkit.jupyterlab_venv()


def test_real_jupyterlab_serves_the_workdir_with_the_kernel_as_default(work, tmp_path, monkeypatch, jupyterlab_bin):
    """JupyterLab itself, started by open_lab: its root is the workdir and kbundle's kernel is the default."""
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
    token = "kbundle-test-token"
    with labkit.running_lab(workdir, notebook, "kbundle-demo", token) as (base, proc):
        specs = labkit.wait_for_lab(base, token, proc)
        assert specs["default"] == "kbundle-demo"
        assert specs["kernelspecs"]["kbundle-demo"]["spec"]["display_name"] == "demo (kbundle)"
        with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=5) as resp:
            listing = json.load(resp)
        assert notebook.name in {item["name"] for item in listing["content"]}
    assert proc.returncode == 0


def test_run_lab_checks_for_jupyterlab_before_anything_else(tmp_path):
    """`kbundle run --lab` without JupyterLab stops at once with one line: no review, no build."""
    import subprocess

    kbundle = Path(sys.executable).parent / "kbundle"
    bundle = tmp_path / "not-read.kbundle"  # never opened: the check comes first
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # the test venv itself has no JupyterLab
    proc = subprocess.run(
        [str(kbundle), "run", str(bundle), "--lab", "--yes"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: JupyterLab is not installed"), proc.stderr
    assert "pip install jupyterlab" in lines[0] and "without --lab" in lines[0]
