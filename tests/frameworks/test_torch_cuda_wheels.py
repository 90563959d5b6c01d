"""A modern pip PyTorch: python 3.11 and pip's torch, whose Linux wheel pulls in the nvidia-* CUDA
wheels (cuBLAS, cuDNN, NCCL, ...: about 4 GB), packed and run with `kbundle run --execute` here.

In the kernel, torch knows its CUDA and finds cuDNN through the loader path that the image's
activation (templates/kbundle-activate.sh) builds from the wheels' `nvidia/*/lib` folders, and
`torch.cuda.is_available()` is plainly False on a machine without a GPU.
"""

from __future__ import annotations

import ast
import json
import re

import pytest
from frameworkkit import keep_newest_only, pack_and_execute

pytestmark = [pytest.mark.heavy, pytest.mark.docker]

NAME = "kbheavy-torch"
TORCH = "2.9.1"  # the current release when this was written: manylinux_2_28 wheels, CUDA 12.8

CELLS = [
    "import torch\nprint(torch.__version__)\nprint(torch.version.cuda)",
    "print(torch.backends.cudnn.version())",
    # Where the loader looks (the activation's doing), and where libcudnn really came from.
    "import os\n"
    "print([p for p in os.environ.get('LD_LIBRARY_PATH', '').split(':') if p.endswith('/nvidia/cudnn/lib')])\n"
    "print(sorted({line.split()[-1] for line in open('/proc/self/maps') if '/libcudnn.so' in line}))",
    "print(torch.cuda.is_available())",
]


@pytest.fixture(scope="module")
def torch_run(world, tmp_path_factory, docker_client):
    root = tmp_path_factory.mktemp("torch")
    notebook = root / "torch-check.ipynb"
    notebook.write_text(
        json.dumps(
            {
                "cells": [
                    {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}
                    for source in CELLS
                ],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "nbformat": 4,
                "nbformat_minor": 4,
            }
        )
    )
    environment = (
        f"name: {NAME}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        f"  - python={world['python']}\n  - ipykernel\n  - pip\n  - pip:\n    - torch=={TORCH}\n"
    )
    executed = pack_and_execute(world, root, NAME, notebook, environment)
    yield executed
    keep_newest_only(docker_client, executed.data["image"])


def test_the_bundle_carries_torchs_cuda_wheels(torch_run):
    resolved = [line.split("==")[0] for line in torch_run.data["pip_resolved"]]
    assert "torch" in resolved
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= set(resolved)


def test_torch_knows_its_cuda_and_finds_cudnn_through_the_activation(torch_run):
    assert torch_run.data["execute"]["errored"] is False
    version, cuda = torch_run.stream(0).split()
    assert version.startswith(TORCH) and re.fullmatch(r"\d+\.\d+", cuda)
    assert re.fullmatch(r"\d{4,6}\n", torch_run.stream(1))  # e.g. 91002: cuDNN 9.10.2
    search_path, loaded = (ast.literal_eval(line) for line in torch_run.stream(2).splitlines())
    assert len(search_path) == 1 and search_path[0].startswith("/opt/kbundle/env/lib/python3.")
    assert loaded and all(path.startswith(search_path[0] + "/") for path in loaded)


def test_no_gpu_is_false_and_no_crash(torch_run):
    assert torch_run.stream(3) == "False\n"
    assert torch_run.statuses == ["no-reference"] * len(CELLS)
