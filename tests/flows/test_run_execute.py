"""`kbundle run BUNDLE --execute`: the whole path, from a packed bundle to the reproduction report."""

from __future__ import annotations

import functools
import json
import os
import uuid
from pathlib import Path

import pytest

from helpers import run_kbundle

pytestmark = pytest.mark.docker


def code_cell(source: str, text: str, count: int) -> dict:
    return {
        "cell_type": "code",
        "execution_count": count,
        "id": f"c{count}",
        "metadata": {},
        "source": source,
        "outputs": [{"name": "stdout", "output_type": "stream", "text": text}],
    }


# What the sender saved: one deterministic cell, one timing cell.
NOTEBOOK = {
    "cells": [
        code_cell("import numpy as np\nprint(int(np.arange(10).sum()))", "45\n", 1),
        code_cell(
            "import time\nt0 = time.perf_counter()\nsum(i * i for i in range(10000))\n"
            "print(f'took {time.perf_counter() - t0:.6f} s')",
            "took 0.001234 s\n",
            2,
        ),
    ],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


kbundle = functools.partial(run_kbundle, timeout=600)


def test_run_execute_reports_same_and_volatile(world, tmp_path, docker_client):
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), KBUNDLE_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("JUPYTER_PATH", None)
    name = f"kbx-{uuid.uuid4().hex[:8]}"
    sender = tmp_path / "sender"
    sender.mkdir()
    (sender / f"{name}.ipynb").write_text(json.dumps(NOTEBOOK))
    (sender / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        f"  - python={world['python']}\n  - numpy\n  - ipykernel\n"
    )
    bundle = sender / f"{name}.kbundle"
    packed = kbundle(
        [
            "pack",
            f"{name}.ipynb",
            "-e",
            "environment.yml",
            "--channel",
            world["channel"],
            "--base-image",
            world["base_image"],
            "-o",
            bundle,
        ],
        env,
        sender,
    )
    assert packed.returncode == 0, packed.stderr

    recipient = tmp_path / "recipient"
    recipient.mkdir()
    image = None
    try:
        proc = kbundle(
            ["run", bundle, "--base-image", world["base_image"], "--gpus", "none", "--yes", "--json", "--execute"],
            env,
            recipient,
        )
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        image = data["image"]
        report = data["execute"]
        assert [c["status"] for c in report["cells"]] == ["same", "volatile"]
        assert report["errored"] is False
        executed = json.loads(Path(report["output"]).read_text())
        assert "".join(executed["cells"][0]["outputs"][0]["text"]) == "45\n"
        assert executed["metadata"]["kernelspec"]["name"] == data["kernel_name"]
    finally:
        if image:
            for c in docker_client.containers.list(all=True, filters={"ancestor": image}):
                c.remove(force=True)
            docker_client.images.remove(image, force=True)
