"""Helpers the tests share: the real CLI in a subprocess, and a minimal notebook.

`tests/` is on sys.path (conftest.py), so any test, in any folder, can `from helpers import ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def kbundle(
    *args, cwd: Path | None = None, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "KBUNDLE_DEBUG")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kbundle.cli", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


KBUNDLE = str(Path(sys.executable).parent / "kbundle")


def run_kbundle(args, env, cwd=None, timeout=300, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """The installed `kbundle` console script, with exactly `env` (a recipient's or a sender's
    whole environment, as the caller built it) and, by default, no standard input."""
    return subprocess.run(
        [KBUNDLE, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=stdin
    )


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def notebook(folder: Path, kernel: str | None = None, name: str = "nb.ipynb") -> Path:
    meta = {"kernelspec": {"name": kernel, "display_name": kernel, "language": "python"}} if kernel else {}
    path = folder / name
    path.write_text(
        json.dumps(
            {
                "cells": [
                    {"cell_type": "code", "source": "print(1)", "metadata": {}, "outputs": [], "execution_count": None}
                ],
                "metadata": meta,
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )
    return path


# ----------------------------------------------------------------- bundles from the offline world

WORLD_NOTEBOOK_SOURCE = "from tabulate import tabulate\nprint(1 + 2)"


def pack_world_bundle(world: dict, env: dict, folder: Path, name: str, source: str = WORLD_NOTEBOOK_SOURCE) -> Path:
    """A bundle `name` of a one-cell notebook over the world's channel (python, numpy, ipykernel,
    tabulate from pip). Another `source` gives another bundle (content hash) with the same env."""
    folder.mkdir(parents=True, exist_ok=True)
    cell = {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [], "source": source}
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nb = {"cells": [cell], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}
    (folder / f"{name}.ipynb").write_text(json.dumps(nb))
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        f"  - python={world['python']}\n  - numpy\n  - ipykernel\n  - pip\n  - pip:\n    - tabulate==0.9.0\n"
    )
    out = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--channel", world["channel"]]
    proc = kbundle(*args, "--base-image", world["base_image"], "-o", out, cwd=folder, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def run_env_for(root: Path) -> dict:
    """Environment for `kbundle run` subprocesses: a private Jupyter data dir and kbundle cache under `root`."""
    env = dict(os.environ, JUPYTER_DATA_DIR=str(root / "jupyter"), KBUNDLE_CACHE_DIR=str(root / "cache"))
    env.pop("JUPYTER_PATH", None)
    return env


def printed_by_kernel(kernel_name: str, code: str, ready_timeout: float = 120, timeout: float = 60) -> str:
    """Start the registered kernel `kernel_name` as Jupyter does (jupyter_client's KernelManager,
    the caller's JUPYTER_DATA_DIR), run `code`, and return what it printed; the kernel is shut
    down whatever happens."""
    return banner_and_printed(kernel_name, code, ready_timeout=ready_timeout, timeout=timeout)[1]


def banner_and_printed(kernel_name: str, code: str, on_ready=None, ready_timeout: float = 120, timeout: float = 60):
    """(the kernel's banner, what `code` printed), for the registered kernel `kernel_name`
    started as Jupyter does; `on_ready()` runs once it answers (to look at its container)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=ready_timeout)
            if on_ready is not None:
                on_ready()
            kc.kernel_info()
            info = kc.get_shell_msg(timeout=timeout)
            while info["msg_type"] != "kernel_info_reply":
                info = kc.get_shell_msg(timeout=timeout)
            out: list = []
            reply = kc.execute_interactive(code, timeout=timeout, output_hook=out.append)
            assert reply["content"]["status"] == "ok", reply["content"]
            printed = "".join(m["content"]["text"] for m in out if m["msg_type"] == "stream")
            return info["content"]["banner"], printed
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def sleeping(kc) -> None:
    """Start `time.sleep(60)` in the kernel behind client `kc` and return once it runs it (a loaded
    machine may take a while), for a test that interrupts or stops a busy kernel."""
    msg_id = kc.execute("import time; time.sleep(60)")
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            break
    time.sleep(0.5)


def squeue() -> str:
    """The Slurm queue as `id name state` lines ("" when it is empty)."""
    return subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout.strip()


@contextmanager
def environ(**values):
    """os.environ with `values` for the block (None removes a variable), restored afterwards:
    this process as a Jupyter started elsewhere (a desktop launcher without DOCKER_HOST, say)."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def answer_on_a_terminal(args: list, env: dict, cwd, answer: bytes = b"n\n", timeout: float = 120):
    """Run `kbundle ARGS` with stdin a terminal (a pty), as a person at a shell: kbundle shows its
    review and asks, and `answer` is typed. The finished process (stdout, stderr as text)."""
    import pty

    kbundle_exe = str(Path(sys.executable).parent / "kbundle")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [kbundle_exe, *map(str, args)],
            env=env,
            cwd=cwd,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(master, answer)
        out, err = proc.communicate(timeout=timeout)
    finally:
        os.close(master)
        os.close(slave)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
