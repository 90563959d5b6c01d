"""CUDA, cuDNN and base-image choice, and the data tables behind it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kbundle import facts
from kbundle.errors import UsageError
from kbundle.facts import Version
from kbundle.pack.cuda import Evidence, _covers, apply_added, choose, evidence
from kbundle.pack.envfile import read_env_file
from kbundle.pack.normalise import normalise
from kbundle.resources import data_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "warp-speed" / "environment.yml"
TAGS = yaml.safe_load((data_dir() / "base_tags.yaml").read_text())
DELETED = {f"nvidia/cuda:{tag}" for tag in TAGS["deleted"].values()}


def _env(tmp_path: Path, deps: str, pip: str = ""):
    text = "channels: [conda-forge]\ndependencies:\n  - python=3.10\n" + deps
    if pip:
        text += "  - pip:\n" + pip
    path = tmp_path / "environment.yml"
    path.write_text(text)
    raw = read_env_file(path)
    env = normalise(raw)
    return raw, env


def _choose(tmp_path, deps="", pip="", **kw):
    raw, env = _env(tmp_path, deps, pip)
    choice = choose(evidence(raw, env), **kw)
    return choice, env


@pytest.mark.parametrize(
    "name",
    [
        "frameworks.yaml",
        "base_tags.yaml",
        "normalise.yaml",
        "cuda_drivers.yaml",
        "gpu_arch.yaml",
        "layers.yaml",
        "kernel_noise.yaml",
    ],
)
def test_every_table_names_its_source(name):
    table = yaml.safe_load((data_dir() / name).read_text())
    assert table["source"].strip()


def test_every_table_loads_typed():
    assert facts.frameworks().tensorflow.build_for(Version.parse("2.3.1")).cuda == Version.parse("10.1")
    assert str(facts.base_tags().cpu_glibc) == "2.36"
    assert "pkgs/msys2" in facts.normalise_facts().platform_channels
    assert str(facts.load_tables().min_driver("11.8")[1]) == "520.61.05"


def _table(name: str) -> dict:
    return yaml.safe_load((data_dir() / f"{name}.yaml").read_text())


def _broken(name: str, change) -> str:
    data = _table(name)
    change(data)
    loader = {
        "frameworks": facts.frameworks_from,
        "base_tags": facts.base_tags_from,
        "normalise": facts.normalise_facts_from,
    }[name]
    with pytest.raises(facts.DataError) as caught:
        loader(data)
    return str(caught.value)


def test_a_broken_table_names_its_file_and_key_at_load_time():
    message = _broken("frameworks", lambda d: d["tensorflow"]["builds"]["2.3"].pop("cuda"))
    assert "frameworks.yaml" in message and 'tensorflow.builds["2.3"].cuda is missing' in message
    message = _broken("frameworks", lambda d: d["torch"]["builds"].update({"2.10": 2.1}))
    assert 'torch.builds["2.10"] must be a list' in message
    message = _broken("base_tags", lambda d: d["live"]["12.4"].update(os="ubuntu99.04"))
    assert "base_tags.yaml" in message and 'live["12.4"].os' in message and "ubuntu99.04" in message
    message = _broken("base_tags", lambda d: d["deleted"].update({10.3: "x"}))  # unquoted: a float
    assert "quoted" in message
    message = _broken("normalise", lambda d: d.pop("source"))
    assert "normalise.yaml" in message and "source is missing" in message
    message = _broken("normalise", lambda d: d["pip_local_indexes"][0].update(kind="ftp"))
    assert "pip_local_indexes[0].kind must be one of" in message
    message = _broken("normalise", lambda d: d["pip_dead_names"]["sklearn"].pop("use"))
    assert "pip_dead_names.sklearn.use is missing" in message
    message = _broken("frameworks", lambda d: d["runtime_packages"]["published"].update(cudatoolkit=["x"]))
    assert "runtime_packages.published.cudatoolkit[0] is not a version" in message


@pytest.mark.parametrize(
    "text, parts, shown",
    [
        ("11.8", (11, 8), "11.8"),
        ("520.61.05", (520, 61, 5), "520.61.05"),  # a driver: numbers compare, the text is kept for messages
        ("2.0.1+cu118", (2, 0, 1), "2.0.1+cu118"),
        ("11.8.*", (11, 8), "11.8.*"),  # conda's glob: not PEP 440, read up to the glob
        ("1.0_1", (1, 0), "1.0_1"),
    ],
)
def test_version_parse(text, parts, shown):
    version = Version.parse(text)
    assert version.parts == parts and str(version) == shown


def test_versions_order_numerically():
    assert Version.parse("11.8") < Version.parse("11.10")
    assert Version.parse("12.4.127").major_minor == Version.parse("12.4")
    assert str(Version.parse("12.4.127").major_minor) == "12.4"
    assert Version.parse("2.3.1").starts_with(Version.parse("2.3"))
    assert not Version.parse("2.30").starts_with(Version.parse("2.3"))
    assert Version.lenient("abc") is None and Version.lenient(None) is None
    with pytest.raises(ValueError):
        Version.parse("abc")


def test_glibc_comes_from_the_os_an_image_names():
    assert facts.glibc_for("nvidia/cuda:12.4.1-base-ubuntu22.04") == "2.35"
    assert facts.glibc_for("debian:bookworm-slim") == "2.36"  # a codename, from os_aliases
    assert facts.glibc_for("registry.local/custom:latest") == "2.28"  # unknown: an old glibc
    # nvidia/cuda's CentOS 7 tags are older than manylinux_2_28: such a base must not get those wheels
    assert facts.glibc_for("nvidia/cuda:11.8.0-cudnn8-runtime-centos7") == "2.17"
    assert facts.glibc_for("nvidia/cuda:12.2.2-runtime-ubi8") == "2.28"


def test_example_keeps_its_own_cuda_runtime_on_a_live_base():
    raw = read_env_file(EXAMPLE)
    env = normalise(raw)
    choice = choose(evidence(raw, env))
    assert (choice.cuda, choice.cudnn) == ("10.1", "7.6")  # pip tensorflow-gpu 2.3.1, tested build
    assert choice.runtime_in_env  # conda cudatoolkit 10.1 + cudnn 7.6 are in the env
    assert choice.base_image.startswith("nvidia/cuda:") and choice.base_image not in DELETED
    assert choice.base_image.endswith("-base-ubuntu22.04")
    assert choice.require_cuda == "cuda>=10.1"
    assert choice.glibc == "2.35"


def test_deleted_native_tag_makes_the_env_carry_the_runtime(tmp_path):
    # pip TF 2.3 alone needs CUDA 10.1 from the image, but every 10.x tag is deleted.
    choice, env = _choose(tmp_path, pip="    - tensorflow==2.3.1\n")
    assert choice.cuda == "10.1" and choice.cudnn == "7.6"
    assert choice.runtime_in_env
    assert {a.spec for a in choice.added} == {"cudatoolkit=10.1", "cudnn=7.6"}
    assert "deleted" in choice.reason
    assert choice.base_image not in DELETED and "10.1" not in choice.base_image
    apply_added(env, choice)
    deps = [d.text for d in env.dependencies]
    assert "cudatoolkit=10.1" in deps and "cudnn=7.6" in deps


def test_live_native_tag_is_used_when_the_env_needs_cuda_from_the_image(tmp_path):
    choice, env = _choose(tmp_path, pip="    - tensorflow==2.12.0\n")
    assert (choice.cuda, choice.cudnn) == ("11.8", "8.6")
    assert not choice.runtime_in_env and not choice.added
    assert choice.base_image == "nvidia/cuda:11.8.0-cudnn8-runtime-ubuntu22.04"


def test_pip_torch_carries_its_runtime(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - torch==2.0.1+cu118\n")
    assert choice.cuda == "11.8" and choice.runtime_in_env
    assert choice.base_image == "nvidia/cuda:11.8.0-base-ubuntu22.04"
    assert choice.require_cuda is None


def test_pip_torch_default_wheel(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - torch==2.1.2\n")
    assert choice.cuda == "12.1" and choice.runtime_in_env


def test_pip_torch_cpu_wheel_gives_cpu_image(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - torch==2.1.2+cpu\n")
    assert choice.cuda is None and choice.base_image == TAGS["cpu_base"]["image"]


def test_conda_pytorch_cuda_build(tmp_path):
    choice, _ = _choose(
        tmp_path, "  - pytorch=1.12.1=py3.10_cuda11.3_cudnn8.3.2_0\n  - cudatoolkit=11.3.1=h2bc3f7f_2\n"
    )
    assert choice.cuda == "11.3" and choice.runtime_in_env
    assert choice.base_image not in DELETED
    assert choice.require_cuda == "cuda>=11.3"


def test_cupy_major_wheel_and_nvidia_wheels(tmp_path):
    choice, _ = _choose(
        tmp_path,
        pip="    - cupy-cuda12x==13.0.0\n    - nvidia-cuda-runtime-cu12==12.4.127\n    - nvidia-cudnn-cu12==9.1.0.70\n",
    )
    assert choice.cuda == "12.4" and choice.runtime_in_env and choice.cudnn == "9.1"


def test_jax_local_version(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - jaxlib==0.4.13+cuda11.cudnn86\n")
    assert choice.cuda == "11.8" and choice.cudnn == "8.6"


def test_cpu_only_env(tmp_path):
    choice, _ = _choose(tmp_path, "  - numpy=1.26\n")
    assert choice.cuda is None and not choice.runtime_in_env
    assert choice.base_image == TAGS["cpu_base"]["image"]


def test_plain_tensorflow_before_2_1_is_cpu(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - tensorflow==1.15.0\n")
    assert choice.cuda is None


def test_cuda_none_forces_cpu(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - tensorflow==2.12.0\n", cuda_option="none")
    assert choice.cuda is None and choice.base_image == TAGS["cpu_base"]["image"]


def test_cuda_version_forced(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - torch==2.1.2\n", cuda_option="11.8")
    assert choice.cuda == "11.8" and "--cuda 11.8" in choice.reason


def test_unknown_cuda_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown --cuda '7.7'"):
        _choose(tmp_path, cuda_option="7.7")


def test_base_image_override_keeps_the_cuda_decision(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - tensorflow==2.12.0\n", base_image="registry.local/cuda:bookworm")
    assert choice.base_image == "registry.local/cuda:bookworm"
    assert choice.cuda == "11.8"
    assert choice.glibc == "2.36"  # bookworm's glibc


def test_every_chosen_tag_is_a_live_one():
    live = {v["release"] for v in TAGS["live"].values()}
    for version, need in facts.frameworks().tensorflow.builds.items():
        choice = choose([Evidence(f"tensorflow=={version}.0", "pip", need.cuda, need.cudnn)])
        tag = choice.base_image.split(":", 1)[1]
        assert tag.split("-")[0] in live, (version, choice.base_image)
        assert choice.base_image not in DELETED


def test_live_cuda_tag_with_other_cudnn_major_brings_cudnn_in_the_env(tmp_path):
    # TF 2.16 was tested with CUDA 12.3 + cuDNN 8.9; the live 12.3 image has cuDNN 9.
    choice, _ = _choose(tmp_path, pip="    - tensorflow==2.16.1\n")
    assert choice.cuda == "12.3" and choice.cudnn == "8.9"
    assert choice.base_image == "nvidia/cuda:12.3.2-runtime-ubuntu22.04"
    assert [a.spec for a in choice.added] == ["cudnn=8.9"] and choice.env_libs


def test_base_image_named_for_a_deleted_cuda_adds_nothing(tmp_path):
    choice, _ = _choose(tmp_path, pip="    - tensorflow==2.3.1\n", base_image="my.registry/cuda:10.1-cudnn7")
    assert choice.base_image == "my.registry/cuda:10.1-cudnn7"
    assert choice.cuda == "10.1" and not choice.added


# runtime in the env, CUDA a framework was built for -> does the runtime serve it?
COVERS_CASES = [
    ("11.8", "11.2", True),  # CUDA >= 11: minor version compatibility, a newer minor serves an older one
    ("11.8", "11.8", True),
    ("12.4", "12.1", True),
    ("11.2", "11.8", False),  # never an older minor for a newer one
    ("12.1", "12.4", False),
    ("12.4", "11.8", False),  # never across majors
    ("11.8", "12.1", False),
    ("10.1", "10.1", True),  # before 11: only the same major.minor
    ("10.1", "10.0", False),
    ("10.0", "10.1", False),
    ("9.2", "9.0", False),
]


@pytest.mark.parametrize("runtime, needed, covers", COVERS_CASES)
def test_runtime_covers_rule(runtime, needed, covers):
    assert _covers(Version.parse(runtime), Version.parse(needed)) is covers


# conda runtime packages + a pip framework -> carried (no runtime added) or not, and what is added
CARRIED_CASES = [
    # cudatoolkit 11.8 serves tensorflow 2.5 (CUDA 11.2): the env carries it, nothing is added
    ("  - cudatoolkit=11.8\n  - cudnn=8.9\n", "tensorflow==2.5.0", "11.2", True, set()),
    # cudatoolkit 10.1 cannot serve tensorflow-gpu 1.15 (CUDA 10.0), and no 10.0 image lives: a
    # conflict; the bundle keeps (and says) what the env carries, nothing is added behind its back
    ("  - cudatoolkit=10.1\n  - cudnn=7.6\n", "tensorflow-gpu==1.15.0", "10.1", True, set()),
    # cudatoolkit 11.2 does not serve tensorflow 2.12 (CUDA 11.8): the live 11.8 image brings it
    ("  - cudatoolkit=11.2\n  - cudnn=8.1\n", "tensorflow==2.12.0", "11.8", False, set()),
    # across majors: cudatoolkit 11.8 does not serve tensorflow 2.15 (CUDA 12.2)
    ("  - cudatoolkit=11.8\n  - cudnn=8.9\n", "tensorflow==2.15.0", "12.2", False, set()),
]


@pytest.mark.parametrize("deps, pin, cuda, in_env, added", CARRIED_CASES)
def test_choice_follows_the_covers_rule(tmp_path, deps, pin, cuda, in_env, added):
    choice, _ = _choose(tmp_path, deps, f"    - {pin}\n")
    assert choice.cuda == cuda
    assert choice.runtime_in_env is in_env
    assert {a.spec for a in choice.added} == added
    assert ("carries its own CUDA runtime" in choice.reason) is (in_env and not added and not choice.conflict)


# an open range or a bare runtime name -> the CUDA it reads as: the newest version the package
# is published at within the range, never one that does not exist
OPEN_RANGE_CASES = [
    ("  - cudatoolkit>=10\n", "11.8"),  # cudatoolkit stops at 11.8
    ("  - cudatoolkit\n", "11.8"),
    ("  - cudatoolkit<10.2,>10.0\n", "10.1"),
    ("  - cudatoolkit>=11.0,<11.4\n", "11.3"),
    ("  - pytorch-cuda>=11.8\n", "12.4"),  # the newest pytorch-cuda, not the newest CUDA
    ("  - pytorch-cuda\n", "12.4"),
    ("  - pytorch-cuda>=11.6,<12\n", "11.8"),
    ("  - cuda-version>=12\n", "13.0"),
    ("  - nvidia/label/cuda-11.7.1::cuda-toolkit = 11.7\n", "11.7"),
    ("  - pytorch::cuda100\n  - cudatoolkit\n", "10.0"),  # the pytorch channel's old selector says it
    ("  - cudatoolkit\n  - cuda92\n", "9.2"),  # in either order: a versioned pin outranks a bare name
    ("  - cudatoolkit\n  - cudnn=8.2\n", "11.8"),  # a cuDNN pin says nothing about the CUDA
    ("  - cuda92\n", "9.2"),
]


@pytest.mark.parametrize("deps, cuda", OPEN_RANGE_CASES)
def test_open_ranges_read_as_versions_that_exist(tmp_path, deps, cuda):
    choice, _ = _choose(tmp_path, deps)
    assert choice.cuda == cuda and not choice.conflict


# conda framework pin + conda runtime pin (or a pip framework) -> a CUDA conflict is reported or not
CONFLICT_CASES = [
    ("  - pytorch=1.4\n  - cudatoolkit=11.3\n", "", True),  # pytorch 1.4 was built for 10.1 and 9.2 only
    ("  - pytorch=1.5.1\n  - cudatoolkit=10.0\n", "", True),
    ("  - pytorch=1.4\n  - cudatoolkit=10.1\n", "", False),
    ("  - pytorch=1.10\n  - cudatoolkit=11.2\n", "", False),  # CUDA 11: conda-forge built other minors
    ("  - pytorch=2.0.1\n  - pytorch-cuda=11.8\n", "", False),
    ("  - pytorch=1.13.1\n  - pytorch-cuda=12.1\n", "", True),
    ("  - pytorch=1.12\n", "", False),  # no runtime pin: nothing to check (it may be a CPU build)
    ("  - tensorflow-gpu=1.13\n  - cudatoolkit=9.2\n", "", True),  # TF 1.13 needs 10.0
    ("  - tensorflow-gpu=2.4.1\n  - cudatoolkit=10.1\n", "", False),  # Anaconda built 2.4 for 10.1
    ("  - tensorflow-gpu=1.12\n  - cudatoolkit=9.2\n", "", False),
    ("  - cudatoolkit=10.2\n", "    - tensorflow-gpu==2.1.0\n", True),  # pip TF 2.1 needs 10.1
    ("  - cudatoolkit=9.2\n", "    - tensorflow-gpu==1.13.1\n", True),  # pip TF 1.13 needs 10.0
    ("  - cudatoolkit=10.1\n  - cudnn=7.6\n", "    - tensorflow-gpu==2.1.0\n", False),
]


@pytest.mark.parametrize("deps, pip, conflict", CONFLICT_CASES)
def test_cuda_conflicts_on_either_side(tmp_path, deps, pip, conflict):
    choice, _ = _choose(tmp_path, deps, pip)
    assert bool(choice.conflict) is conflict, choice.conflict
    if conflict:
        assert "conflict" in choice.conflict and choice.cuda is not None


def test_a_conda_framework_with_no_build_for_the_pinned_runtime_names_the_pins_that_pair(tmp_path):
    choice, _ = _choose(tmp_path, "  - pytorch=1.4\n  - cudatoolkit=11.3\n")
    assert choice.cuda == "11.3"  # what the sender pinned, said as a conflict, not replaced
    assert "pytorch=1.4 has no build for CUDA 11.3" in choice.conflict
    assert "cudatoolkit=10.1" in choice.conflict


@pytest.mark.parametrize(
    "pip, cuda",
    [
        ("    - tensorflow-macos\n    - tensorflow-metal\n", "12.5"),  # the newest tested TensorFlow
        ("    - tensorflow-macos==2.13.0\n    - tensorflow-metal==1.0.1\n", "11.8"),
        ("    - tensorflow-macos==2.8.0\n    - tensorflow-metal==0.4.0\n", "11.2"),
        ("    - tensorflow-macos\n", None),  # without the plug-in, no sign of a GPU
    ],
)
def test_the_metal_plugin_says_tensorflow_ran_on_a_gpu(tmp_path, pip, cuda):
    choice, env = _choose(tmp_path, pip=pip)
    assert choice.cuda == cuda
    assert [p.name for p in env.pip] == ["tensorflow"]


# What people write under `pip:` without a pin: pip installs the newest release the range allows,
# so the image gets the CUDA of the newest tested release (a CPU image only where that is CPU).
UNPINNED_PIP_CASES = [
    ("tensorflow[and-cuda]", "12.5", True),  # the extra pulls nvidia-* wheels: runtime in the env
    ("tensorflow[and-cuda]>=2.15", "12.5", True),
    ("tensorflow", None, False),  # says nothing of a GPU (a Mac's tensorflow-macos becomes this)
    ("tensorflow>=2.15", "12.5", False),  # a range: its newest tested release, GPU-capable
    ("tensorflow<2.1", None, False),  # 1.x: the CPU package
    ("torch", "12.8", True),  # PyPI's Linux torch is a CUDA build
    ("torch>=2.1", "12.8", True),
    ("torch<2.0", "11.7", True),
    ("torch==2.1.2+cpu", None, False),
    ("tensorflow-cpu", None, False),
]


@pytest.mark.parametrize("line, cuda, in_env", UNPINNED_PIP_CASES)
def test_unpinned_pip_frameworks_get_the_newest_tested_cuda(tmp_path, line, cuda, in_env):
    choice, _ = _choose(tmp_path, pip=f"    - {line}\n")
    assert choice.cuda == cuda
    assert choice.runtime_in_env is in_env
