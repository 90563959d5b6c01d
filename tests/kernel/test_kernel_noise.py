"""The kernel's stderr during `run --execute`: a GPU-less machine's TensorFlow dlerrors fold into one line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml

from kbundle import facts
from kbundle.kernel.noise import NoiseFilter, folded_stderr
from kbundle.resources import data_dir

SUMMARY = "no GPU here: TensorFlow will run on CPU\n"

# What tensorflow-gpu 2.3.1 printed in a container without a GPU (tests/frameworks/), word for word.
TF231_NO_GPU = [
    "2026-11-29 21:22:53.667440: W tensorflow/stream_executor/platform/default/dso_loader.cc:59] Could not load "
    "dynamic library 'libcudart.so.10.1'; dlerror: libcudart.so.10.1: cannot open shared object file: No such file or directory\n",
    "2026-11-29 21:22:53.667487: I tensorflow/stream_executor/cuda/cudart_stub.cc:29] Ignore above cudart dlerror "
    "if you do not have a GPU set up on your machine.\n",
    "2026-11-29 21:22:54.601422: W tensorflow/stream_executor/platform/default/dso_loader.cc:59] Could not load "
    "dynamic library 'libcuda.so.1'; dlerror: libcuda.so.1: cannot open shared object file: No such file or directory\n",
    "2026-11-29 21:22:54.601466: W tensorflow/stream_executor/cuda/cuda_driver.cc:312] failed call to cuInit: "
    "UNKNOWN ERROR (303)\n",
    "2026-11-29 21:22:54.601492: I tensorflow/stream_executor/cuda/cuda_diagnostics.cc:156] kernel driver does not "
    "appear to be running on this host (8e1695aca53f): /proc/driver/nvidia/version does not exist\n",
]
# ... and what it printed next, which says something else and must pass.
TF231_CPU = [
    "2026-11-29 21:22:54.615039: I tensorflow/core/platform/cpu_feature_guard.cc:142] This TensorFlow binary is "
    "optimized with oneAPI Deep Neural Network Library (oneDNN)to use the following CPU instructions in "
    "performance-critical operations:  AVX2 AVX512F FMA\n",
    "To enable them in other operations, rebuild TensorFlow with the appropriate compiler flags.\n",
    "2026-11-29 21:22:54.622059: I tensorflow/core/platform/profile_utils/cpu_utils.cc:104] CPU Frequency: 2596130000 Hz\n",
]


@pytest.mark.parametrize(
    "lines, printed",
    [
        (TF231_NO_GPU, [SUMMARY, "", "", "", ""]),  # one line for the whole page
        (TF231_CPU, TF231_CPU),  # not about the GPU: passes unchanged
        (
            [TF231_NO_GPU[0], TF231_CPU[0], TF231_NO_GPU[3]],  # interleaved: the summary once, the rest in order
            [SUMMARY, TF231_CPU[0], ""],
        ),
        (
            [
                "2020-10-20 14:03:22.1: W tensorflow/core/common_runtime/gpu/gpu_device.cc:1753] Cannot dlopen some "
                "GPU libraries. Please make sure the missing libraries mentioned above are installed properly.\n",
                "Skipping registering GPU devices...\n",  # the same message's second line
            ],
            [SUMMARY, ""],
        ),
        (  # TensorRT's libraries (TensorFlow 2.4 and later), and TensorFlow 2.14's wording
            [
                "2021-01-01 00:00:00.1: W tensorflow/stream_executor/platform/default/dso_loader.cc:60] Could not load "
                "dynamic library 'libnvinfer.so.7'; dlerror: libnvinfer.so.7: cannot open shared object file\n",
                "2023-09-01 00:00:00.1: I tensorflow/tsl/cuda/cudart_stub.cc:28] Could not find cuda drivers on your "
                "machine, GPU will not be used.\n",
            ],
            [SUMMARY, ""],
        ),
        (  # a library that is not CUDA's, and a user's own words about cuInit: not noise
            [
                "W dso_loader.cc:59] Could not load dynamic library 'libfoo.so.1'; dlerror: libfoo.so.1: missing\n",
                "my notebook mentions failed call to cuInit without a colon\n",
                "Traceback (most recent call last):\n",
            ],
            [
                "W dso_loader.cc:59] Could not load dynamic library 'libfoo.so.1'; dlerror: libfoo.so.1: missing\n",
                "my notebook mentions failed call to cuInit without a colon\n",
                "Traceback (most recent call last):\n",
            ],
        ),
    ],
)
def test_noise_filter(lines, printed):
    noise = NoiseFilter(facts.kernel_noise())
    assert [noise.line(line) for line in lines] == printed


def test_the_summary_is_said_once_per_filter():
    first, second = NoiseFilter(facts.kernel_noise()), NoiseFilter(facts.kernel_noise())
    assert [first.line(TF231_NO_GPU[0]), first.line(TF231_NO_GPU[0])] == [SUMMARY, ""]
    assert second.line(TF231_NO_GPU[0]) == SUMMARY  # a new run says it again


def test_folded_stderr_copies_a_real_process_stderr():
    """A child process writes to the fd as a kernel would: in pieces, with a stray byte and no last newline."""
    out = io.StringIO()
    script = (
        "import sys, time\n"
        "w = sys.stderr.buffer\n"
        f"w.write({TF231_NO_GPU[0][:40].encode()!r}); w.flush(); time.sleep(0.2)\n"  # half a line, then the rest
        f"w.write({TF231_NO_GPU[0][40:].encode()!r} + {TF231_NO_GPU[3].encode()!r})\n"
        "w.write(b'plain \\xff line\\n'); w.write(b'last words')\n"
    )
    with folded_stderr(out) as fd:
        subprocess.run([sys.executable, "-c", script], stderr=fd, check=True)
    assert out.getvalue() == SUMMARY + "plain \ufffd line\nlast words"


def test_folded_stderr_ends_when_nothing_was_started():
    out = io.StringIO()
    with folded_stderr(out):
        pass
    assert out.getvalue() == ""


# ----------------------------------------------------------------- the table


def test_the_table_names_its_source_and_loads():
    table = yaml.safe_load((data_dir() / "kernel_noise.yaml").read_text())
    assert "dso_loader.cc" in table["source"]
    assert [g.summary for g in facts.kernel_noise().groups] == [SUMMARY.strip()]


@pytest.mark.parametrize(
    "change, complaint",
    [
        (lambda d: d["groups"][0].pop("summary"), "groups[0].summary is missing"),
        (lambda d: d["groups"][0]["patterns"].append("(unclosed"), "groups[0].patterns[8] is not a regular expression"),
        (lambda d: d["groups"][0].update(patterns=[]), "groups[0].patterns must list at least one pattern"),
        (lambda d: d.pop("source"), "source is missing"),
    ],
)
def test_a_broken_table_names_its_file_and_key(change, complaint):
    data = yaml.safe_load((data_dir() / "kernel_noise.yaml").read_text())
    change(data)
    with pytest.raises(facts.DataError) as caught:
        facts.kernel_noise_from(data)
    assert "kernel_noise.yaml" in str(caught.value) and complaint in str(caught.value)
