"""The user's example without a container engine: examples/warp-speed on pip's tensorflow-gpu
2.3.1 and Python 3.7, run with `kbundle run --native --execute` on this GPU-less machine whose
DOCKER_HOST points nowhere. The environment is a prefix on this host; the notebook's first cells
run there, TensorFlow says it was built with CUDA and finds no GPU, and run says the kernel runs
on CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from frameworkkit import pack_and_execute

pytestmark = [pytest.mark.heavy, pytest.mark.docker]  # the world's base image needs Docker; run does not

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "warp-speed" / "warp-speed.ipynb"
NAME = "kbheavy-warp-speed-native"


@pytest.fixture(scope="module")
def native(world, tmp_path_factory):
    if "3.7" not in world["pythons"]:
        pytest.fail(f"the world's channel carries no Python 3.7 (it has {world['pythons']}): see tests/world/")
    environment = (
        f"name: {NAME}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        "  - python=3.7\n  - ipykernel\n  - pip\n  - pip:\n    - tensorflow-gpu==2.3.1\n"
    )
    return pack_and_execute(world, tmp_path_factory.mktemp("warp-native"), NAME, EXAMPLE, environment, native=True)


def test_the_first_cells_run_natively_on_cpu(native):
    assert native.data["execute"]["errored"] is False
    assert native.data["native"]["prefix"] and native.data["image"] in ("", None)
    assert native.stream(0) == "TensorFlow 2.3.1\nbuilt with CUDA: True\n"
    assert native.stream(1) == "GPUs: []\nno GPU found: falling back to CPU\n"
    assert re.fullmatch(r"CPU: 20 batches in \d+\.\d{3} s, \d+\.\d ms per batch\n", native.stream(3))
    assert native.stream(4) == "GPU: skipped (no GPU)\n"


def test_run_says_the_kernel_has_no_gpu(native):
    assert "the kernel runs on CPU" in native.stderr, native.stderr[-3000:]
