"""CUDA, cuDNN and base-image choice, and the data tables behind it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kbundle.errors import UsageError
from kbundle.pack.cuda import apply_added, choose, evidence
from kbundle.pack.envfile import read_env_file
from kbundle.pack.normalise import normalise
from kbundle.resources import data_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "warp-speed" / "environment.yml"
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


@pytest.mark.parametrize("name", ["frameworks.yaml", "base_tags.yaml", "normalise.yaml"])
def test_every_table_names_its_source(name):
    table = yaml.safe_load((data_dir() / name).read_text())
    assert table["source"].strip()


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
    assert "cudatoolkit=10.1" in env.dependencies and "cudnn=7.6" in env.dependencies


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
    choice, _ = _choose(tmp_path, "  - pytorch=1.12.1=py3.10_cuda11.3_cudnn8.3.2_0\n  - cudatoolkit=11.3.1=h2bc3f7f_2\n")
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
    tf = yaml.safe_load((data_dir() / "frameworks.yaml").read_text())["tensorflow"]["builds"]
    for version in tf:
        from kbundle.pack.cuda import Evidence

        need = tf[version]
        choice = choose([Evidence(f"tensorflow=={version}.0", "pip", need["cuda"], need["cudnn"])])
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
