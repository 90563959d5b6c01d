"""The user's example on its real framework: examples/warp-speed on pip's tensorflow-gpu 2.3.1 and
Python 3.7, packed and run with `kbundle run --execute` on this GPU-less machine.

The notebook's first cells must run here: TensorFlow imports, says it was built with CUDA, sees no
GPU and falls back to CPU, and times the convolution on the CPU. The reproduction report calls
the timings volatile and the rest same (the notebook's saved outputs come from such a run), and
`run` folds TensorFlow's page of no-GPU dlerrors on the kernel's stderr into one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from frameworkkit import keep_newest_only, pack_and_execute, stripped_mirror

pytestmark = [pytest.mark.heavy, pytest.mark.docker]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "warp-speed" / "warp-speed.ipynb"
NAME = "kbheavy-warp-speed"  # fixed, so that the image keeps its name from one CI run to the next


@pytest.fixture(scope="module")
def warp_speed(world, tmp_path_factory, docker_client):
    if "3.7" not in world["pythons"]:
        pytest.fail(f"the world's channel carries no Python 3.7 (it has {world['pythons']}): see tests/world/")
    environment = (
        f"name: {NAME}\nchannels:\n  - {world['channel']}\ndependencies:\n"
        "  - python=3.7\n  - ipykernel\n  - pip\n  - pip:\n    - tensorflow-gpu==2.3.1\n"
    )
    # Through a mirror whose pages do not say which Python each file needs (issue 17): pip must
    # still pick only wheels Python 3.7 accepts (absl-py 2.x, for one, needs 3.10).
    with stripped_mirror() as mirror:
        root = tmp_path_factory.mktemp("warp-speed")
        executed = pack_and_execute(world, root, NAME, EXAMPLE, environment, index_url=mirror.url)
    assert "tensorflow-gpu" in mirror.projects, mirror.projects
    yield executed
    keep_newest_only(docker_client, executed.data["image"])


def test_the_first_cells_run_on_this_gpu_less_machine(warp_speed):
    assert warp_speed.data["execute"]["errored"] is False
    assert warp_speed.stream(0) == "TensorFlow 2.3.1\nbuilt with CUDA: True\n"
    assert warp_speed.stream(1) == "GPUs: []\nno GPU found: falling back to CPU\n"
    assert warp_speed.stream(2) == "output shape: (64, 58, 58, 32)\n"
    assert re.fullmatch(r"CPU: 20 batches in \d+\.\d{3} s, \d+\.\d ms per batch\n", warp_speed.stream(3))
    assert warp_speed.stream(4) == "GPU: skipped (no GPU)\n"


def test_the_report_calls_the_timings_volatile_and_the_rest_same(warp_speed):
    assert warp_speed.statuses == ["same", "same", "same", "volatile", "same"]
    timing = warp_speed.data["execute"]["cells"][3]
    assert timing["source"].startswith("cpu_total = timeit.timeit(") and "duration" in timing["detail"]


def test_tensorflows_no_gpu_noise_is_one_line_on_run_stderr(warp_speed):
    lines = warp_speed.stderr.splitlines()
    assert lines.count("no GPU here: TensorFlow will run on CPU") == 1
    assert not [line for line in lines if "libcudart" in line or "cuInit" in line or "dlerror" in line]
    # The kernel did say it (ipykernel captures it into the executed copy, which keeps what came) ...
    assert "Could not load dynamic library 'libcudart.so.10.1'" in warp_speed.stream(0, "stderr")
    # ... and the rest of its stderr still reaches the recipient.
    assert re.search(r"tensorflow/core/platform/profile_utils/cpu_utils\.cc:\d+\] ", warp_speed.stderr)
