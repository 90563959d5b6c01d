"""The corpus: environment files as people really export them (tests/data/envs/), each packed
offline with `--lock never`, against a small table of what the bundle must say.

Columns: the CUDA the manifest claims (GPU: any CUDA, the exact one is a guess kbundle may
refine), the names dropped (`pip: ` for pip lines, `channel ` for channels), the names changed,
the channels, the export's platform (None: not asserted), and whether a CUDA conflict is reported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import notebook
from kbundle.flows.pack import PackOptions, pack

ENVS = Path(__file__).resolve().parents[1] / "data" / "envs"
GPU = "any CUDA"
WIN = {"vc", "vs2015_runtime"}

# file -> (cuda, dropped, changed, channels, platform, conflict)
CORPUS = {
    "win_tf21_gpu_defaults.yml": ("10.1", WIN | {"icc_rt", "wincertstore"}, set(), ["defaults"], "win-64", False),
    "win_tf241_gpu_defaults.yml": ("10.1", WIN, set(), ["defaults"], "win-64", False),
    "win_pytorch_cuda118.yml": (
        "11.8",
        WIN | {"ucrt", "vc14_runtime"},
        set(),
        ["pytorch", "nvidia", "defaults"],
        "win-64",
        False,
    ),
    "win_r_msys2.yml": (
        None,
        {
            "m2w64-bwidget",
            "m2w64-gcc-libgfortran",
            "m2w64-gcc-libs",
            "m2w64-gcc-libs-core",
            "m2w64-gmp",
            "m2w64-libwinpthread-git",
            "m2-base",
            "m2-bash",
            "msys2-conda-epoch",
            "channel pkgs/msys2",
        },
        set(),
        ["r", "defaults"],
        "win-64",
        False,
    ),
    "win_powershell_utf16.yml": (None, WIN | {"ucrt"}, set(), ["conda-forge"], "win-64", False),
    "win_libpython_theano.yml": (None, {"libpython", "m2w64-toolchain"}, set(), ["defaults"], "win-64", False),
    "win_vs2019_conda_forge.yml": (
        None,
        WIN | {"ucrt", "vc14_runtime", "vs2019_win-64"},
        set(),
        ["conda-forge"],
        "win-64",
        False,
    ),
    "win_tf21_pip_conflict.yml": ("10.0", WIN, set(), ["defaults"], "win-64", True),
    # tensorflow-macos is TensorFlow under Apple's name: the same version on Linux is a change, not a drop.
    "mac_arm64_tf_metal.yml": (
        "11.8",
        {"appnope", "libcxx", "tensorflow-deps", "pip: tensorflow-metal"},
        {"pip: tensorflow-macos"},
        ["apple", "conda-forge"],
        "osx-arm64",
        False,
    ),
    "mac_x86_scipy_gfortran.yml": (None, {"appnope", "libcxx"}, {"libgfortran"}, ["conda-forge"], "osx-64", False),
    # A Mac prefix says macOS, but nothing here says which architecture: not asserted.
    "mac_arm64_pytorch_mps.yml": (None, {"libcxx"}, set(), ["pytorch", "conda-forge"], None, False),
    "mac_from_history.yml": (None, set(), set(), ["conda-forge"], None, False),
    "linux_pytorch_conda_cuda.yml": ("11.8", set(), set(), ["pytorch", "nvidia", "conda-forge"], "linux-64", False),
    "linux_pytorch_pip_cu118.yml": ("11.8", set(), set(), ["conda-forge"], "linux-64", False),
    "linux_pytorch_cudatoolkit113.yml": ("11.3", set(), set(), ["pytorch", "conda-forge"], "linux-64", False),
    "linux_tf115_conda.yml": ("10.0", set(), set(), ["defaults"], "linux-64", False),
    "linux_tf16_pip_old.yml": ("9.0", set(), set(), ["defaults"], None, False),
    "linux_tf212_pip.yml": ("11.8", set(), set(), ["conda-forge"], None, False),
    "linux_tf215_and_cuda.yml": ("12.2", set(), set(), ["conda-forge"], None, False),
    "linux_tf211_conda_forge_cuda.yml": ("11.2", set(), set(), ["conda-forge"], "linux-64", False),
    "linux_jaxlib_conda_cuda118.yml": ("11.8", set(), set(), ["conda-forge"], "linux-64", False),
    "jaxlib_build_selector.yml": (GPU, set(), set(), ["conda-forge"], None, False),
    "jaxlib_bracket_cuda118.yml": ("11.8", set(), set(), ["conda-forge"], None, False),
    "linux_jax_pip_cuda12.yml": ("12.1", set(), set(), ["conda-forge"], None, False),
    "rapids_2210_from_history.yml": ("11.5", set(), set(), ["rapidsai", "conda-forge", "nvidia"], None, False),
    "rapids_2310_export.yml": ("11.8", set(), set(), ["rapidsai", "conda-forge", "nvidia"], "linux-64", False),
    "no_channels_scientific.yml": (None, set(), set(), ["defaults"], None, False),
    "no_channels_tf_gpu_range.yml": (GPU, set(), set(), ["defaults"], None, False),
    "tf_space_spec.yml": ("11.2", set(), set(), ["conda-forge"], None, False),
    "cudatoolkit_range_pytorch.yml": ("10.1", set(), set(), ["pytorch", "defaults"], None, False),
    "cupy_pip_cuda113.yml": ("11.3", set(), set(), ["conda-forge"], None, False),
    "onnxruntime_gpu_pip.yml": ("11.8", set(), set(), ["conda-forge"], None, False),
    # Real files from public repositories (each names its source on its first line).
    # Label channels and hand-written specs with spaces; cuda-toolkit from the label is the runtime.
    "label_torchopt_cuda117.yml": (
        "11.7",
        set(),
        set(),
        ["pytorch", "nvidia/label/cuda-11.7.1", "defaults", "conda-forge"],
        None,
        False,
    ),
    "label_omnisafe_cuda116.yml": (
        "11.6",
        set(),
        set(),
        ["pytorch", "nvidia/label/cuda-11.6.2", "defaults", "conda-forge"],
        None,
        False,
    ),
    # `pytorch::pytorch >=1.0.1`, a bare cudatoolkit and the pytorch channel's cuda100 selector: CUDA 10.0.
    "spaces_yolact_cuda100.yml": ("10.0", set(), set(), ["conda-forge", "pytorch", "defaults"], None, False),
    # pytorch ==1.4.0 was built for CUDA 10.1 and 9.2, not the 10.0 that cuda100 asks for.
    "conflict_pytorch14_cuda100.yml": ("10.0", set(), set(), ["conda-forge", "pytorch", "defaults"], None, True),
    # Open ranges: cudatoolkit<10.2,>10.0 is 10.1; cudatoolkit>=11.1 is 11.8 (the newest cudatoolkit);
    # `nodefaults` is an instruction, not a channel; pip's tensorflow-gpu>=2.0 reaches the 2.12 placeholder.
    "pyhpc_cudatoolkit_range_jaxlib_url.yml": (
        "10.1",
        set(),
        set(),
        ["conda-forge", "defaults", "pytorch"],
        None,
        False,
    ),
    "pyhpc_tf_gpu_range_nodefaults.yml": ("11.8", set(), {"pip: tensorflow-gpu"}, ["conda-forge"], None, False),
    # macOS TensorFlow: the Metal plug-in says GPU; tensorflow-macos becomes tensorflow (unpinned: a guessed CUDA).
    "mac_tf_metal_unpinned.yml": (
        GPU,
        {"apple::tensorflow-deps", "pip: tensorflow-metal"},
        {"pip: tensorflow-macos"},
        ["defaults"],
        "osx-arm64",
        False,
    ),
    "mac_tf_metal_pytorch_nightly.yml": (
        GPU,
        {"tensorflow-deps", "pip: tensorflow-metal"},
        {"pip: tensorflow-macos"},
        ["pytorch-nightly", "apple", "conda-forge", "defaults"],
        "osx-arm64",
        False,
    ),
    "mac_arm64_tf_metal_dlc.yml": (
        GPU,
        {"python.app", "apple::tensorflow-deps", "pip: tensorflow-metal", "pip: -e"},
        {"pip: tensorflow-macos"},
        ["conda-forge", "defaults"],
        "osx-arm64",
        False,
    ),
    # Versions that exist only for macOS: libgfortran 5.0.0.dev0 / libgfortran5 11.0.1.dev0 (the first
    # Apple Silicon gfortran) and defaults' libgfortran 3.0.1 (osx-64; linux-64 has 3.0.0).
    "mac_arm64_tf_metal_pinned_gfortran_dev0.yml": (
        "11.2",
        {"appnope", "libcxx", "tensorflow-deps", "pip: tensorflow-metal"},
        {"libgfortran", "libgfortran5", "pip: tensorflow-macos"},
        ["apple", "conda-forge"],
        "osx-arm64",
        False,
    ),
    "mac_arm64_gfortran_dev0.yml": (
        None,
        {"libcxx"},
        {"libgfortran", "libgfortran5"},
        ["conda-forge"],
        "osx-arm64",
        False,
    ),
    "mac_x86_gfortran301_dlc.yml": (
        None,
        {"libcxx", "libcxxabi", "python.app", "pip: appnope"},
        {"libgfortran"},
        ["defaults"],
        "osx-64",
        False,
    ),
    # sklearn==0.0 refuses to install; scikit-learn is already pinned beside it, so it is dropped.
    "mac_sklearn_shim.yml": (None, {"pip: appnope", "pip: sklearn"}, set(), ["menpo", "defaults"], "osx-64", False),
    # torch==1.8.2+cu111 with no index: PyTorch's 1.8 LTS index serves it (PIP_INDEXES below).
    "win_torch_lts_cu111_no_index.yml": ("11.1", WIN | {"wincertstore"}, set(), ["defaults"], "win-64", False),
    # The pytorch channel's Mac build names CUDA 0.0: a CPU build, not a GPU one (a CPU image).
    "mac_pytorch_cuda00_cpu_build.yml": (
        None,
        {"libcxx"},
        {"libgfortran"},
        ["pytorch", "conda-forge", "defaults"],
        "osx-64",
        False,
    ),
    # Microsoft MPI and MinGW for Python exist only for Windows.
    "win_msmpi_hdf5.yml": (None, {"msmpi"}, set(), ["conda-forge"], "win-64", False),
    "win_rmg_mingwpy_spaced_specs.yml": (
        None,
        {"mingwpy"},
        set(),
        ["defaults", "rmg", "rdkit", "cantera", "anaconda", "omnia"],
        "win-64",
        False,
    ),
    # `ext/simple-knn`: pip reads a requirement with a slash as a folder on the sender's machine.
    "win_pip_relative_paths_cuda118.yml": (
        "11.8",
        {
            f"pip: ext/{p}"
            for p in ("NeuralHaircut/npbgpp", "diff_gaussian_rasterization_hair", "kaolin", "pytorch3d", "simple-knn")
        },
        set(),
        ["pytorch", "conda-forge", "defaults", "anaconda", "fvcore", "iopath", "bottler", "nvidia"],
        None,
        False,
    ),
    # Unpinned TensorFlow beside the Metal plug-in on Python 3.8: the newest it can have is 2.13 (CUDA 11.8).
    "mac_arm64_tf_unpinned_py38.yml": (
        "11.8",
        {"apple::tensorflow-deps", "pip: tensorflow-metal"},
        {"pip: tensorflow-macos"},
        ["conda-forge", "defaults", "apple"],
        "osx-arm64",
        False,
    ),
    # Files no rule should change.
    "linux_tf113_gpu_export.yml": ("10.0", set(), set(), ["conda-forge", "defaults"], "linux-64", False),
    "linux_plain_export.yml": (None, set(), set(), ["conda-forge"], "linux-64", False),
    "linux_llvm_openmp_faiss.yml": (None, set(), set(), ["conda-forge"], "linux-64", False),
    "linux_r_irkernel.yml": (None, set(), set(), ["conda-forge"], None, False),
    "pip_only_requests.yml": (None, set(), set(), ["conda-forge"], None, False),
}


# file -> the bundle's pip_indexes, where a rule decides them
PIP_INDEXES = {
    "win_torch_lts_cu111_no_index.yml": {
        "index_url": None,
        "extra_index_urls": ["https://download.pytorch.org/whl/lts/1.8/cu111"],
        "find_links": [],
    },
    "pyhpc_tf_gpu_range_nodefaults.yml": {
        "index_url": None,
        "extra_index_urls": [],
        "find_links": ["https://storage.googleapis.com/jax-releases/jax_cuda_releases.html"],
    },
}
# The real files: each names the repository and commit it was taken from.
REAL = {
    "label_torchopt_cuda117.yml",
    "label_omnisafe_cuda116.yml",
    "spaces_yolact_cuda100.yml",
    "conflict_pytorch14_cuda100.yml",
    "pyhpc_cudatoolkit_range_jaxlib_url.yml",
    "pyhpc_tf_gpu_range_nodefaults.yml",
    "mac_tf_metal_unpinned.yml",
    "mac_tf_metal_pytorch_nightly.yml",
    "mac_arm64_tf_metal_dlc.yml",
    "mac_arm64_tf_metal_pinned_gfortran_dev0.yml",
    "mac_arm64_gfortran_dev0.yml",
    "mac_x86_gfortran301_dlc.yml",
    "mac_sklearn_shim.yml",
    "win_torch_lts_cu111_no_index.yml",
    "linux_tf113_gpu_export.yml",
    "mac_pytorch_cuda00_cpu_build.yml",
    "win_msmpi_hdf5.yml",
    "win_rmg_mingwpy_spaced_specs.yml",
    "win_pip_relative_paths_cuda118.yml",
    "mac_arm64_tf_unpinned_py38.yml",
}


def _name(spec: str) -> str:
    """`vc=14.1=h0510ff6_4` -> vc; `pip: tensorflow-metal==1.0.1` -> pip: tensorflow-metal; channels as they are."""
    if spec.startswith("channel "):
        return spec
    prefix = "pip: " if spec.startswith("pip: ") else ""
    return prefix + re.split(r"[=<>!~\[ ]", spec.removeprefix("pip: ").strip())[0]


def test_the_corpus_is_the_whole_folder():
    assert len(CORPUS) >= 30
    assert sorted(CORPUS) == sorted(p.name for p in ENVS.glob("*.yml"))


@pytest.mark.parametrize("file", sorted(CORPUS))
def test_corpus(tmp_path, file):
    cuda, dropped, changed, channels, platform, conflict = CORPUS[file]
    result = pack(
        PackOptions(notebook=notebook(tmp_path), env_file=ENVS / file, output=tmp_path / "b.kbundle", lock="never")
    )
    m = result.manifest
    if cuda == GPU:
        assert m.cuda is not None, m.base_image_reason
    else:
        assert m.cuda == cuda, m.base_image_reason
    assert {_name(d.spec) for d in m.dropped} == dropped
    assert {_name(c.spec) for c in m.changed} == changed
    assert m.channels == channels
    if platform is not None:
        assert m.source["platform"] == platform
    assert any("conflict" in w for w in result.warnings) is conflict
    if file in PIP_INDEXES:
        assert m.pip_indexes == PIP_INDEXES[file]
    _assert_accounted(m, ENVS / file)


@pytest.mark.parametrize("file", sorted(REAL))
def test_real_files_name_their_source(file):
    first = (ENVS / file).read_text().splitlines()[0]
    assert re.fullmatch(r"# source: github\.com/[\w.-]+/[\w.-]+/blob/[0-9a-f]{40}/\S+", first), first


def _assert_accounted(m, path: Path) -> None:
    """Every conda and pip line of the input is carried, changed or dropped: nothing disappears unsaid."""
    from kbundle.pack.envfile import read_env_file
    from kbundle.specs import parse_pip_line

    raw = read_env_file(path)
    carried = {re.split(r"[=<>!~ ]", d)[0].split("::")[-1] for d in m.dependencies}
    said = {c.spec for c in m.changed} | {d.spec for d in m.dropped}
    for spec in raw.conda:
        assert spec.name in carried or spec.raw in said, spec.raw
    pip_carried = {parse_pip_line(line).name for line in m.pip}
    for pin in raw.pip:
        assert pin.name in pip_carried or f"pip: {pin.raw}" in said, pin.raw
