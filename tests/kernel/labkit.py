"""A real JupyterLab for the tests: its cached venv, and `open_lab` started the way `kbundle run --lab` starts it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jupyterlab_venv() -> Path:
    """The bin dir of a JupyterLab in its own venv, cached beside the offline world.

    Not in the test venv: JupyterLab's dependencies make `import nbformat` several times
    slower (jsonschema's format checkers), which would skew bench/bench_pack.py's baseline;
    and users often keep JupyterLab in another environment anyway."""
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


@contextmanager
def running_lab(workdir: Path, notebook: Path, kernel_name: str, token: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`open_lab` in a child process on a free port of 127.0.0.1; yields (base URL, process), shuts it down after.

    The caller sets PATH (the JupyterLab venv first), the JUPYTER_* dirs and BROWSER=true."""
    port = free_port()
    env = dict(os.environ, JUPYTER_PORT=str(port), JUPYTER_TOKEN=token)
    code = (
        "import sys; from kbundle.kernel.lab import open_lab; "
        f"sys.exit(open_lab({str(workdir)!r}, {str(notebook)!r}, {kernel_name!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_lab(base, token, proc)
        yield base, proc
    finally:
        req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def wait_for_lab(base: str, token: str, proc: subprocess.Popen, timeout: float = 90) -> dict:
    """JupyterLab's kernelspecs, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/kernelspecs?token={token}", timeout=2) as resp:
                return json.load(resp)
        except OSError:
            assert proc.poll() is None, f"JupyterLab exited early: {proc.stdout.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"JupyterLab did not answer within {timeout:.0f} s"
            time.sleep(0.5)
