"""`kbundle run --lab`: open JupyterLab on the bundle's working directory.

Public function (the `run` command calls it):

    open_lab(workdir, notebook_path, kernel_name) -> int
    require_jupyterlab(otherwise) -> list[str]   # `run --lab` checks before it builds

It runs JupyterLab in the foreground with the working directory as its root, opens the
notebook (whose `metadata.kernelspec` already names the kernel) and makes the kernel the
default for new notebooks too. It returns JupyterLab's exit code. When JupyterLab is not
installed it raises a KbundleError that says how to install it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from kbundle.errors import KbundleError, UsageError


def find_jupyterlab() -> Optional[list[str]]:
    """The command that starts JupyterLab: kbundle's own environment first, then PATH."""
    beside = Path(sys.executable).parent / "jupyter-lab"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("jupyter-lab")
    return [found] if found else None


def require_jupyterlab(otherwise: str) -> list[str]:
    """JupyterLab's command, or a KbundleError that says how to install it and what else to do."""
    lab = find_jupyterlab()
    if lab is None:
        raise KbundleError(
            f"JupyterLab is not installed; install it with `pip install jupyterlab` (or `pipx install jupyterlab`), "
            f"or {otherwise}"
        )
    return lab


def lab_command(lab: list[str], workdir: Path, notebook: Path, kernel_name: str, *, as_root: bool = False) -> list[str]:
    command = [*lab, f"--ServerApp.root_dir={workdir}", f"--MultiKernelManager.default_kernel_name={kernel_name}"]
    if as_root:
        # JupyterLab refuses to start as root unless told; the user already chose to run kbundle as root,
        # and the kernel itself still runs in a container as the invoking user.
        command.append("--ServerApp.allow_root=True")
    return [*command, str(notebook)]


def open_lab(workdir: os.PathLike | str, notebook_path: os.PathLike | str, kernel_name: str) -> int:
    workdir, notebook = Path(workdir).resolve(), Path(notebook_path).resolve()
    if not workdir.is_dir():
        raise UsageError(f"no working directory at {workdir}")
    if notebook != workdir and workdir not in notebook.parents:
        raise UsageError(f"the notebook {notebook} is outside the working directory {workdir}")
    lab = require_jupyterlab(f"open {notebook} in VS Code or Notebook and pick the kernel {kernel_name!r}")
    # Ctrl-C reaches JupyterLab too (same process group); it asks before it stops, so we wait for it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        command = lab_command(lab, workdir, notebook, kernel_name, as_root=os.geteuid() == 0)
        proc = subprocess.Popen(command, cwd=workdir, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
