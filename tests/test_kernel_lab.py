"""`open_lab`: the install hint when JupyterLab is missing, and the command it runs when present."""

from __future__ import annotations

import json
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
    if (Path(sys.executable).parent / "jupyter-lab").exists():
        pytest.skip("JupyterLab is installed beside this interpreter")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(KbundleError, match=r"pip install jupyterlab") as info:
        lab.open_lab(*work, "kbundle-demo")
    assert "kbundle-demo" in str(info.value) and "\n" not in str(info.value)


def test_runs_jupyterlab_on_the_workdir_with_the_kernel(work, tmp_path, monkeypatch):
    """A stand-in `jupyter-lab` on PATH records how it was started; kbundle returns its exit code."""
    if (Path(sys.executable).parent / "jupyter-lab").exists():
        pytest.skip("JupyterLab beside this interpreter would be used instead of the stand-in")
    workdir, notebook = work
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv.json"
    script = bindir / "jupyter-lab"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(record)!r}, 'w'))\n"
                      "sys.exit(3)\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    assert lab.open_lab(workdir, notebook, "kbundle-demo") == 3
    seen = json.loads(record.read_text())
    assert seen["cwd"] == str(workdir.resolve())
    assert seen["argv"] == [f"--ServerApp.root_dir={workdir.resolve()}",
                            "--MultiKernelManager.default_kernel_name=kbundle-demo", str(notebook.resolve())]


def test_notebook_must_be_inside_the_workdir(work, tmp_path):
    workdir, _ = work
    with pytest.raises(UsageError, match="outside the working directory"):
        lab.open_lab(workdir, tmp_path / "elsewhere.ipynb", "k")
