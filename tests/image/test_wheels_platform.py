"""pip wheels for the image's real platform: every manylinux_2_X its glibc allows (specs.py,
image/wheels.py), and a glibc too old for a package's wheels said as such, not in pip's words."""

from __future__ import annotations

import pytest

from kbundle import pipplatform
from kbundle.errors import KbundleError
from kbundle.image import wheels
from kbundle.pack.piplock import pip_target_args
from kbundle.specs import cpython_abis, manylinux_platforms

LEGACY = ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]


@pytest.mark.parametrize(
    "python, own",
    [
        ("3.6", "cp36m"),
        ("3.7", "cp37m"),  # TensorFlow 2.3.1's wheel is cp37-cp37m: without the m pip finds none
        ("3.7.16", "cp37m"),
        ("3.8", "cp38"),  # pymalloc's m left the ABI tag in 3.8
        ("3.11", "cp311"),
        ("3.13", "cp313"),
    ],
)
def test_cpython_abis_pack_and_run_ask_pip_for(python, own):
    assert cpython_abis(python) == [own, "abi3", "none"]
    for args in (pip_target_args(python, "2.36"), pipplatform.target_args(python, "2.36")):
        abis = [args[i + 1] for i, a in enumerate(args) if a == "--abi"]
        assert abis == [own, "abi3", "none"]


@pytest.mark.parametrize(
    "glibc, newest",
    [
        ("2.17", 17),  # CentOS 7's: manylinux2014
        ("2.28", 28),  # RHEL 8's: torch 2.9's wheels start here
        ("2.36", 36),  # Debian 12's, the world's base image
        ("2.39", 39),
        (None, 17),  # unknown: manylinux2014's
        ("2.4", 5),  # nothing is older than manylinux_2_5
        ("glibc", 17),
    ],
)
def test_manylinux_platforms_are_every_glibc_up_to_the_images(glibc, newest):
    platforms = manylinux_platforms(glibc)
    assert platforms == [f"manylinux_2_{m}_x86_64" for m in range(newest, 4, -1)] + LEGACY
    assert ("manylinux_2_28_x86_64" in platforms) == (newest >= 28)
    assert pipplatform.target_platforms(glibc) == platforms[:-1]  # never a bare linux_x86_64 wheel


@pytest.mark.parametrize(
    "filename, need",
    [
        ("pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl", 26),
        ("torch-2.9.1-cp311-cp311-manylinux_2_28_x86_64.whl", 28),
        ("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl", 12),
        ("nvidia_nccl_cu12-2.27.5-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", 17),
        ("x-1.0-cp311-cp311-manylinux1_x86_64.whl", 5),
        ("torch-2.9.1-cp310-cp310-manylinux_2_28_x86_64.whl", None),  # another CPython
        ("x-1.0-cp311-cp311-manylinux_2_28_aarch64.whl", None),  # another machine
        ("x-1.0-cp311-cp311-musllinux_1_2_x86_64.whl", None),  # musl, not glibc
        ("x-1.0-py3-none-any.whl", None),  # fits every glibc: not a glibc question
        ("x-1.0-cp311-cp311-win_amd64.whl", None),
        ("not-a-wheel.whl", None),
    ],
)
def test_wheel_glibc_need(filename, need):
    assert pipplatform.wheel_glibc_need(filename, "3.11") == need


SKIPPED = [
    "torch-2.9.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    "torch-2.9.1-cp311-cp311-manylinux_2_28_aarch64.whl",
    "torch-2.9.1-cp311-cp311-win_amd64.whl",
    "torch-2.9.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "torch-2.10.0rc1-cp311-cp311-manylinux_2_34_x86_64.whl",  # a pre-release: not what pip would pick
    "torch-3.0.0-cp312-cp312-manylinux_2_34_x86_64.whl",  # another CPython
    "torchvision-0.24.1-cp311-cp311-manylinux_2_28_x86_64.whl",  # another project
    "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
    "pyzmq-27.3.0-cp311-cp311-manylinux_2_31_x86_64.whl",  # the lowest need among a version's wheels counts
]


@pytest.mark.parametrize(
    "requirement, found",
    [
        ("torch==2.9.1", ("2.9.1", 28)),
        ("torch", ("2.9.1", 28)),
        ("Torch<2.9.1", ("2.9.0", 28)),
        ("pyzmq==27.3.0", ("27.3.0", 26)),
        ("torch>=2.10.0rc1", ("2.10.0rc1", 34)),  # named: then pip would take it
        ("torch==1.0", None),
        ("numpy", None),
        ("not a requirement", None),
    ],
)
def test_newest_wheel_need(requirement, found):
    assert pipplatform.newest_wheel_need(SKIPPED, requirement, "3.11") == found


@pytest.mark.parametrize(
    "glibc, newest, message",
    [
        (
            "2.17",
            ("2.9.1", 28),
            "no wheel of torch==2.9.1 fits this image's platform (CPython 3.11, glibc 2.17: manylinux_2_17 and "
            "older); the newest wheels (torch 2.9.1) need manylinux_2_28, a base image with glibc 2.28 or newer",
        ),
        (
            None,
            ("2.9.1", 28),
            "no wheel of torch==2.9.1 fits this image's platform (CPython 3.11, glibc 2.17: manylinux_2_17 and "
            "older); the newest wheels (torch 2.9.1) need manylinux_2_28, a base image with glibc 2.28 or newer",
        ),
        ("2.28", ("2.9.1", 28), None),  # the glibc is not why: pip's own words then
        ("2.36", ("2.9.1", 28), None),
        ("2.17", None, None),  # no wheel for this CPython at all
    ],
)
def test_platform_refusal(glibc, newest, message):
    assert pipplatform.platform_refusal("torch==2.9.1", "3.11", glibc, newest) == message


# ---------------------------------------------------------------- against PyPI (the network)

# pyzmq 27.3.0 has no manylinux2014 wheel for CPython 3.11: manylinux_2_26 (and 2_28) only,
# 0.9 MB, where torch 2.9.1's manylinux_2_28 wheel is 900 MB.
SMALL_2_26_ONLY = "pyzmq==27.3.0"


def test_fetch_takes_a_manylinux_2_26_wheel_for_glibc_2_36_and_says_why_not_for_2_17(tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    fetched = wheels.fetch([SMALL_2_26_ONLY], "3.11", glibc="2.36")
    assert [f.name for f in fetched.files] == [
        "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl"
    ]
    assert fetched.pins[0].text.startswith("pyzmq==27.3.0 --hash=sha256:")

    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cold"))  # nothing cached: pip is asked
    with pytest.raises(KbundleError) as refused:
        wheels.fetch([SMALL_2_26_ONLY], "3.11", glibc="2.17")
    assert str(refused.value) == (
        "pip: no wheel of pyzmq==27.3.0 fits this image's platform (CPython 3.11, glibc 2.17: manylinux_2_17 "
        "and older); the newest wheels (pyzmq 27.3.0) need manylinux_2_26, a base image with glibc 2.26 or newer"
    )


def test_pack_says_the_same_when_it_locks_pip_for_too_old_a_glibc():
    """pack's lock (pip's dry-run) meets the same wall for a CentOS 7 base: the same one line."""
    from kbundle.pack.piplock import PipLockError, resolve
    from kbundle.specs import PipIndexes

    assert resolve([SMALL_2_26_ONLY], PipIndexes(), "3.11", "2.36")["install"]
    with pytest.raises(PipLockError) as refused:
        resolve([SMALL_2_26_ONLY], PipIndexes(), "3.11", "2.17")
    assert str(refused.value) == (
        "no wheel of pyzmq==27.3.0 fits this image's platform (CPython 3.11, glibc 2.17: manylinux_2_17 "
        "and older); the newest wheels (pyzmq 27.3.0) need manylinux_2_26, a base image with glibc 2.26 or newer"
    )
