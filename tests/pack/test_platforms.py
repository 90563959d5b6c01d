"""Conda specs read as conda reads them, the export's platform, what exists for linux-64 (the
table offline, the world channel's real repodata online), CUDA conflicts, and --strict."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from helpers import kbundle, notebook
from kbundle.errors import UsageError
from kbundle.facts import Version
from kbundle.pack.cuda import apply_added, choose, evidence
from kbundle.pack.envfile import read_env_file
from kbundle.pack.normalise import normalise
from kbundle.pack.platforms import Availability, detect_platform, verdict
from kbundle.pack.records import RawEnv
from kbundle.specs import parse_conda_spec

# ---------------------------------------------------------------- conda specs, as rattler reads them

# raw -> (name, version, build, constraint, channel, text)
SPECS = [
    ("numpy=1.19.2=py37hadc3359_0", ("numpy", "1.19.2", "py37hadc3359_0", None, None, "numpy=1.19.2=py37hadc3359_0")),
    # `==` is that version alone; conda reads `=2.10` as 2.10.* (2.10.1 too): the exactness stays.
    ("tensorflow ==2.7.0", ("tensorflow", "2.7.0", None, None, None, "tensorflow==2.7.0")),
    ("h5py==2.10", ("h5py", "2.10", None, None, None, "h5py==2.10")),
    ("numpy==1.2.*", ("numpy", "1.2", None, None, None, "numpy=1.2")),
    # `conda list --explicit`'s package URL: its file's version and build (the build hash is then dropped).
    (
        "https://conda.anaconda.org/conda-forge/linux-64/xz-5.2.6-h166bdaf_0.tar.bz2",
        ("xz", "5.2.6", "h166bdaf_0", None, None, "xz=5.2.6=h166bdaf_0"),
    ),
    ("python 3.8", ("python", "3.8", None, None, None, "python=3.8")),
    ("numpy 1.2 py_0", ("numpy", "1.2", "py_0", None, None, "numpy=1.2=py_0")),
    ("cudatoolkit<10.2,>10.0", ("cudatoolkit", None, None, "<10.2,>10.0", None, "cudatoolkit<10.2,>10.0")),
    ("tensorflow-gpu>=2.0", ("tensorflow-gpu", None, None, ">=2.0", None, "tensorflow-gpu>=2.0")),
    ("jaxlib=*=*cuda*", ("jaxlib", None, "*cuda*", None, None, "jaxlib=*=*cuda*")),
    ("jaxlib=0.4.23[build=*cuda*]", ("jaxlib", "0.4.23", "*cuda*", None, None, "jaxlib=0.4.23=*cuda*")),
    ("jaxlib=0.4.23[cuda118]", ("jaxlib", "0.4.23", "*cuda118*", None, None, "jaxlib=0.4.23=*cuda118*")),
    ("jaxlib 0.4.23 [cuda118]", ("jaxlib", "0.4.23", "*cuda118*", None, None, "jaxlib=0.4.23=*cuda118*")),
    ("cudf=22.10", ("cudf", "22.10", None, None, None, "cudf=22.10")),
    ("python=3.10.*", ("python", "3.10", None, None, None, "python=3.10")),
    ("conda-forge::numpy=1.26.4", ("numpy", "1.26.4", None, None, "conda-forge", "conda-forge::numpy=1.26.4")),
    ("openssl=1.1.1h=he774522_0", ("openssl", "1.1.1h", "he774522_0", None, None, "openssl=1.1.1h=he774522_0")),
    ("numpy >=1.2 *mkl*", ("numpy", None, "*mkl*", ">=1.2", None, "numpy >=1.2 *mkl*")),
    ("Pandas", ("pandas", None, None, None, None, "pandas")),
]


@pytest.mark.parametrize("raw, want", SPECS)
def test_conda_specs_parse_as_conda_does(raw, want):
    spec = parse_conda_spec(raw)
    assert (spec.name, spec.version, spec.build, spec.constraint, spec.channel, spec.text) == want
    assert spec.raw == raw


@pytest.mark.parametrize(
    "raw, meant",
    [
        ("ninja=>1.10.2", "ninja>=1.10.2"),  # as a real environment.yml (a StyleGAN3 fork) has it
        ("numpy =< 1.26", "numpy <= 1.26"),
    ],
)
def test_a_backwards_operator_is_named_with_the_line_meant(raw, meant):
    with pytest.raises(UsageError) as caught:
        parse_conda_spec(raw)
    assert "is not a conda operator" in str(caught.value) and repr(meant) in str(caught.value)
    parse_conda_spec(meant)  # and the line it suggests is one conda reads


@pytest.mark.parametrize("raw", ["numpy[", "=1.0", "numpy >=<1.0", "numpy[version=]"])
def test_unreadable_conda_specs_are_one_usage_error(raw):
    with pytest.raises(UsageError, match="cannot read the conda dependency"):
        parse_conda_spec(raw)


# ---------------------------------------------------------------- the export's platform

# (prefix, specs) -> platform
PLATFORMS = [
    ("C:\\Users\\a\\envs\\x", ["numpy=1.19.2=py37hadc3359_0"], "win-64"),
    ("/Users/a/miniforge3/envs/x", ["numpy=1.26.0=py311h0"], "osx-64"),
    ("/Users/a/miniforge3/envs/x", ["libblas=3.9.0=18_osxarm64_openblas"], "osx-arm64"),
    ("/home/a/envs/x", ["llvm-openmp=16.0.6=h4dfa4b3_0"], "linux-64"),
    (None, ["llvm-openmp=16.0.6=h4dfa4b3_0", "numpy=1.26"], None),  # llvm-openmp is on linux-64 too
    (None, ["_openmp_mutex=4.5=2_kmp_llvm", "llvm-openmp=17.0.2=h4dfa4b3_0", "libgcc-ng=13.2.0=h0"], "linux-64"),
    (None, ["vc=14.1=h0510ff6_4"], "win-64"),
    (None, ["m2w64-gcc-libs=5.3.0=7"], "win-64"),
    (None, ["tensorflow-deps=2.10.0=0", "appnope=0.1.3=pyhd8ed1ab_0"], "osx-arm64"),
    (None, ["libblas=3.9.0=20_win64_mkl"], "win-64"),
    (None, ["vc=14.1", "libgcc-ng=13.2.0"], None),  # they disagree: nothing is unambiguous
    ("C:\\x", ["libgcc-ng=13.2.0"], "win-64"),  # the prefix settles it
    (None, ["numpy=1.26.4", "python=3.11"], None),
]


@pytest.mark.parametrize("prefix, specs, platform", PLATFORMS)
def test_export_platform_from_unambiguous_evidence(prefix, specs, platform):
    raw = RawEnv(name="x", channels=[], conda=[parse_conda_spec(s) for s in specs], pip=[], prefix=prefix)
    assert detect_platform(raw) == platform


# ---------------------------------------------------------------- one spec's verdict

CHANNEL = Availability(
    linux={"numpy": {"1.26.4"}, "libgfortran": {"3.0.0", "14.2.0"}, "libcxx": {"16.0.6"}},
    other={
        "vc": {"win-64": {"14.3"}},
        "libgfortran": {"osx-64": {"5.0.0.dev0"}},
        "numpy": {"win-64": {"1.19.2"}},
    },
)

# (spec, what the channels said) -> (to, reason) or None: carried as it is
VERDICTS = [
    ("vc=14.1=h0510ff6_4", None, (None, "exists only for Windows")),
    ("vs2017_runtime=15.4.27004.2010=1", None, (None, "exists only for Windows")),
    ("m2-bash=4.3.042=5", None, (None, "exists only for Windows")),
    ("icc_rt=2019.0.0=h0cc432a_1", None, (None, "exists only for Windows")),
    ("appnope=0.1.3", None, (None, "exists only for macOS")),
    (
        "libgfortran=5.0.0.dev0=11_0_1",
        None,
        ("libgfortran", "relaxed `libgfortran=5.0.0.dev0=11_0_1` to `libgfortran`: that version exists only for macOS"),
    ),
    ("libgfortran=3.0.0", None, None),
    ("llvm-openmp=16.0.6", None, None),
    ("numpy=1.26.4", None, None),
    # the channels answered: they decide for the names they know
    ("vc=14.3", CHANNEL, (None, "exists only for win-64")),
    (
        "libgfortran=5.0.0.dev0",
        CHANNEL,
        ("libgfortran", "relaxed `libgfortran=5.0.0.dev0` to `libgfortran`: that version exists only for osx-64"),
    ),
    ("libcxx=16.0.6", CHANNEL, None),  # the table says macOS; the channel has a linux-64 build
    ("numpy=1.19.2", CHANNEL, ("numpy", "relaxed `numpy=1.19.2` to `numpy`: that version exists only for win-64")),
    ("numpy=0.0.1", CHANNEL, None),  # published nowhere: the lock's error, not a silent relaxation
    ("icc_rt=2019.0.0", CHANNEL, (None, "exists only for Windows")),  # unknown to the channel: the table
]


@pytest.mark.parametrize("raw, available, want", VERDICTS)
def test_verdict(raw, available, want):
    found = verdict(parse_conda_spec(raw), available)
    assert (None if found is None else (found.to.text if found.to else None, found.reason)) == want


def test_a_version_only_another_os_has_is_relaxed_to_the_nearest_linux_line():
    available = Availability(linux={"numpy": {"1.19.5", "1.26.4"}}, other={"numpy": {"win-64": {"1.19.2"}}})
    found = verdict(parse_conda_spec("numpy=1.19.2=py37hadc3359_0"), available)
    assert found.to.text == "numpy=1.19"
    assert found.reason.endswith("that version exists only for win-64")


# ---------------------------------------------------------------- CUDA conflicts and --cuda X

CONFLICT_ENV = (
    "channels: [defaults]\ndependencies:\n  - python=3.7\n  - cudatoolkit=10.0\n  - pip:\n    - tensorflow-gpu==2.1.0\n"
)


def _raw_env(tmp_path: Path, text: str):
    path = tmp_path / "environment.yml"
    path.write_text(text)
    raw = read_env_file(path)
    return raw, normalise(raw)


def test_a_hidden_conflict_keeps_what_the_env_carries_and_says_so(tmp_path):
    raw, env = _raw_env(tmp_path, CONFLICT_ENV)
    choice = choose(evidence(raw, env))
    assert choice.cuda == "10.0" and choice.runtime_in_env and not choice.added  # what it really runs with
    assert "conflict" in choice.conflict
    assert "tensorflow-gpu==2.1.0 needs CUDA 10.1" in choice.conflict and "cudatoolkit=10.0" in choice.conflict
    assert "`--cuda 10.1`" in choice.conflict and "changes cudatoolkit=10.0 to cudatoolkit=10.1" in choice.conflict
    assert "adds cudnn=7.6" in choice.conflict


def test_cuda_option_applies_the_remedy(tmp_path):
    raw, env = _raw_env(tmp_path, CONFLICT_ENV)
    choice = choose(evidence(raw, env), "10.1")
    assert choice.cuda == "10.1" and choice.runtime_in_env and choice.conflict is None
    apply_added(env, choice)
    deps = [d.text for d in env.dependencies]
    assert "cudatoolkit=10.1" in deps and "cudnn=7.6" in deps and "cudatoolkit=10.0" not in deps
    assert [(c.spec, c.to) for c in env.changed] == [("cudatoolkit=10.0", "cudatoolkit=10.1")]


def test_cuda_12_replaces_cudatoolkit_with_cuda_version(tmp_path):
    raw, env = _raw_env(tmp_path, CONFLICT_ENV)
    choice = choose(evidence(raw, env), "12.2")
    apply_added(env, choice)
    deps = [d.text for d in env.dependencies]
    assert "cuda-version=12.2" in deps and "cuda-cudart" in deps and not any("cudatoolkit" in d for d in deps)
    assert [d.spec for d in env.dropped] == ["cudatoolkit=10.0"]


def test_a_conda_framework_follows_the_runtime_its_env_pins(tmp_path):
    # defaults' tensorflow-gpu 2.4.1 was built against cudatoolkit 10.1: a real pair, not a conflict.
    text = "channels: [defaults]\ndependencies:\n  - tensorflow-gpu=2.4.1=h30adc30_0\n  - cudatoolkit=10.1.243\n"
    raw, env = _raw_env(tmp_path, text)
    choice = choose(evidence(raw, env))
    assert choice.cuda == "10.1" and choice.conflict is None and not choice.added


def test_tf_table_reaches_back_to_1_0():
    from kbundle.facts import frameworks

    table = frameworks().tensorflow
    assert str(table.build_for(Version.parse("1.6.0")).cuda) == "9.0"
    assert str(table.build_for(Version.parse("1.0.1")).cuda) == "8.0"


# ---------------------------------------------------------------- the CLI: --strict, summary


def test_strict_lists_every_problem_one_line_each(tmp_path):
    env = tmp_path / "environment.yml"
    env.write_text(CONFLICT_ENV.replace("  - python=3.7\n", "  - python=3.7\n  - vc=14.1\n  - icc_rt=2019.0.0\n"))
    out = tmp_path / "s.kbundle"
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", out, "--lock", "never", "--strict")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    assert len(lines) == 3
    assert "dropped `vc=14.1`" in lines[0] and "dropped `icc_rt=2019.0.0`" in lines[1]
    assert "conflict" in lines[2]
    assert not out.exists()


def test_conflict_is_one_warning_and_the_summary_ends_with_the_lock_state(tmp_path):
    env = tmp_path / "environment.yml"
    env.write_text(CONFLICT_ENV)
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", tmp_path / "c.kbundle", "--lock", "never")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "conflict" in warnings[0]
    assert result.stdout.strip().splitlines()[-1].startswith("unlocked:")
    assert "channels   defaults" in result.stdout


def test_no_channels_means_conda_defaults(tmp_path):
    env = tmp_path / "environment.yml"
    env.write_text("dependencies:\n  - python=3.11\n  - numpy\n")
    out = tmp_path / "d.kbundle"
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", out, "--lock", "never")
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert doc["conda"]["channels"] == ["defaults"]
    assert doc["channel_urls"] == ["https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r"]
    assert "conda's defaults" in result.stdout
    added = kbundle("pack", notebook(tmp_path), "-e", env, "-o", out, "--lock", "never", "--add-channel", "conda-forge")
    assert added.returncode == 0, added.stderr
    assert json.loads(kbundle("inspect", out, "--json").stdout)["conda"]["channels"] == ["conda-forge", "defaults"]


# ---------------------------------------------------------------- against the world channel's real repodata


@pytest.fixture(scope="module")
def world_channel() -> str:
    """The offline world's conda channel over http, with its stubs for win-64 / osx-64 / osx-arm64
    (tests/world/channel.py: STUBS). Needs no Docker."""
    from world import ensure_channel, ensure_server, world_dir

    root = world_dir()
    root.mkdir(parents=True, exist_ok=True)
    return ensure_server(root, ensure_channel(root))


def _pack_world(tmp_path: Path, channel: str, deps: str, prefix: str) -> tuple:
    from world import python_version

    env = tmp_path / "environment.yml"
    env.write_text(
        f"name: x\nchannels: [defaults]\ndependencies:\n  - python={python_version()}\n{deps}prefix: {prefix}\n"
    )
    out = tmp_path / "w.kbundle"
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", out, "--channel", channel, "--lock", "always")
    assert result.returncode == 0, result.stderr
    return out, json.loads(kbundle("inspect", out, "--json").stdout), result


def test_world_channel_drops_what_exists_only_for_windows(world_channel, tmp_path):
    deps = "  - numpy\n  - vc=14.3=h2eaa2aa_17\n  - icc_rt=2022.1.0=h6049295_2\n  - vs2015_runtime=14.36.32532=h05e6639_17\n"
    out, doc, _ = _pack_world(tmp_path, world_channel, deps, "C:\\Users\\a\\envs\\x")
    dropped = {d["spec"]: d["reason"] for d in doc["dropped"]}
    assert dropped == {
        "vc=14.3=h2eaa2aa_17": "exists only for win-64",
        "icc_rt=2022.1.0=h6049295_2": "exists only for win-64",
        "vs2015_runtime=14.36.32532=h05e6639_17": "exists only for win-64",
    }
    assert doc["locked"] and doc["source"]["platform"] == "win-64"


def test_world_channel_relaxes_a_macos_only_version_and_keeps_what_linux_has(world_channel, tmp_path):
    deps = "  - numpy\n  - appnope=0.1.3=py311h0_0\n  - libgfortran=5.0.0.dev0=11_0_1_hf114ba7_23\n  - libcxx=16.0.6\n"
    out, doc, result = _pack_world(tmp_path, world_channel, deps, "/Users/a/miniforge3/envs/x")
    assert {d["spec"]: d["reason"] for d in doc["dropped"]} == {
        "appnope=0.1.3=py311h0_0": "exists only for osx-64, osx-arm64"
    }
    assert doc["changed"] == [
        {
            "spec": "libgfortran=5.0.0.dev0=11_0_1_hf114ba7_23",
            "to": "libgfortran",
            "reason": "relaxed `libgfortran=5.0.0.dev0=11_0_1_hf114ba7_23` to `libgfortran`: "
            "that version exists only for osx-64",
        }
    ]
    assert "libcxx=16.0.6" in doc["conda"]["dependencies"]  # the table says macOS; the channel has linux-64
    with zipfile.ZipFile(out) as zf:
        lock = zf.read("env/rattler.lock").decode()
    assert "libgfortran-14.2.0" in lock and "libcxx-16.0.6" in lock
    assert result.stdout.strip().splitlines()[-1].startswith("fully locked")
