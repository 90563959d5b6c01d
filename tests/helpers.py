"""Helpers the tests share: the real CLI in a subprocess, and a minimal notebook.

`tests/` is on sys.path (conftest.py), so any test, in any folder, can `from helpers import ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
