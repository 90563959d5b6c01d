"""pydists: which Python distributions the conda side provides, as pip will see them installed."""

from __future__ import annotations

import subprocess

import pytest

from kbundle import pydists
from kbundle.specs import parse_conda_spec


@pytest.mark.parametrize(
    "build, depends, expected",
    [
        ("py37_0", None, True),
        ("py_0", None, True),
        ("pyhd3eb1b0_3", None, True),
        ("gpu_py37h7db9008_0", None, True),
        ("py37he774522_1000", None, True),
        ("cuda112py38hc3a5e08_0", None, True),
        ("h74a9793_0", None, False),
        ("gpu", None, False),
        ("mkl", None, False),
        ("cuda10.1_0", None, False),
        ("0", None, False),
        (None, None, None),  # an export without build strings says nothing
        ("anything", ["python >=3.7", "six"], True),  # a lock record's depends decide
        ("py37_0", ["libgcc-ng >=7"], False),
        (None, ["python_abi 3.11.* *_cp311"], True),
    ],
)
def test_built_for_python(build, depends, expected):
    assert pydists.built_for_python(build, depends) is expected


@pytest.mark.parametrize(
    "conda, dist",
    [
        ("pytorch", "torch"),
        ("msgpack-python", "msgpack"),
        ("tensorflow-base", "tensorflow"),
        ("python-graphviz", "graphviz"),
        ("graphviz", None),  # the C library
        ("typing_extensions", "typing-extensions"),
        ("opt_einsum", "opt-einsum"),
        ("PyYAML", "pyyaml"),
        ("python", None),
        ("cudatoolkit", None),
    ],
)
def test_distribution_of(conda, dist):
    assert pydists.distribution_of(conda) == dist


def test_a_full_export_is_pinned_and_a_hand_written_file_is_not():
    export = [parse_conda_spec(s) for s in ("python=3.7.9", "absl-py=0.10.0", "openssl=1.1.1h", "_tflow_select=2.1.0")]
    builds = {"python": "h60c2a47_0", "absl-py": "py37_0", "openssl": "he774522_0", "_tflow_select": "gpu"}
    found = pydists.from_pinned_specs(export, builds)
    assert found == (pydists.Provided("absl-py", "0.10.0", "absl-py"),)
    hand = [parse_conda_spec(s) for s in ("python=3.11", "numpy>=1.20", "ipykernel")]
    assert pydists.from_pinned_specs(hand, {}) is None


@pytest.mark.parametrize(
    "folder, parsed",
    [
        ("absl_py-0.10.0.dist-info", ("absl-py", "0.10.0")),
        ("PyYAML-5.3.1-py3.7.egg-info", ("pyyaml", "5.3.1")),
        ("protobuf-3.13.0.1-py3.7-linux-x86_64.egg-info", ("protobuf", "3.13.0.1")),
        ("tensorflow_gpu-2.3.1.dist-info", ("tensorflow-gpu", "2.3.1")),
        ("__pycache__", None),
        ("numpy", None),
    ],
)
def test_dist_folder_names(folder, parsed):
    assert pydists._dist_folder_name(folder) == parsed


def test_pip_sees_the_stand_ins_as_installed(tmp_path):
    """The stand-in interpreter, asked by pip itself (`pip list`): exactly the provided ones."""
    provided = (pydists.Provided("absl-py", "0.10.0", "absl-py"), pydists.Provided("protobuf", "3.13.0.1", "protobuf"))
    python = pydists.installed_site(provided, tmp_path)
    out = subprocess.run(
        [*pydists.pip_command(python), "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    assert {(d["name"], d["version"]) for d in json.loads(out.stdout)} == {
        ("absl-py", "0.10.0"),
        ("protobuf", "3.13.0.1"),
    }


def test_site_packages_of_an_installed_env(tmp_path):
    site = tmp_path / "lib" / "python3.7" / "site-packages"
    (site / "absl_py-0.10.0.dist-info").mkdir(parents=True)
    (site / "PyYAML-5.3.1-py3.7.egg-info").mkdir()
    (site / "absl").mkdir()
    assert pydists.from_site_packages(tmp_path) == (
        pydists.Provided("absl-py", "0.10.0", "installed"),
        pydists.Provided("pyyaml", "5.3.1", "installed"),
    )
