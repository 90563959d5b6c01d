"""`kbundle pack / inspect / verify` through the real CLI, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from helpers import assert_one_error_line, kbundle, notebook

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "warp-speed"
NOTEBOOK = EXAMPLE / "warp-speed.ipynb"
ENVFILE = EXAMPLE / "environment.yml"

INSPECT_KEYS = {
    "format_version",
    "name",
    "notebook",
    "python",
    "cuda",
    "cudnn",
    "base_image",
    "conda",
    "pip",
    "dropped",
    "locked",
    "files",
}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    out = tmp_path_factory.mktemp("packed") / "warp-speed.kbundle"
    start = time.monotonic()
    result = kbundle("pack", NOTEBOOK, "-e", ENVFILE, "-o", out)
    return out, result, time.monotonic() - start


def test_example_packs_offline_with_one_line_about_channels(packed):
    out, result, seconds = packed
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "unreachable" in line]
    assert len(notes) == 1 and "unlocked" in notes[0]
    assert "Traceback" not in result.stderr
    assert seconds < 15  # the unreachable check fails fast instead of hanging
    assert f"wrote {out}" in result.stdout
    assert "vs2015_runtime" in result.stdout  # the summary says what was dropped


def test_summary_ends_with_what_the_recipient_runs_and_needs(packed):
    out, result, _ = packed
    lines = result.stdout.strip().splitlines()
    assert lines[-3] == f"  next       the recipient runs: kbundle run {out.name}"
    needs = lines[-2]
    assert needs.startswith("  they need  Docker or Podman (without one: kbundle run --native"), needs
    assert "; an NVIDIA GPU" in needs, needs
    assert "NVIDIA Container Toolkit" in needs and "CUDA 10.1" in needs and "(>= " in needs
    assert 'README, "For the recipient"' in needs and "JupyterLab only for `kbundle run --lab`" in needs
    assert "locked" in lines[-1] and not lines[-1].startswith(" ")  # the lock status stays the last line


def test_inspect_json_is_the_public_contract(packed):
    out, _, _ = packed
    result = kbundle("inspect", out, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert INSPECT_KEYS <= set(doc)
    assert doc["format_version"] == 1 and doc["name"] == "warp-speed"
    assert doc["notebook"] == "work/warp-speed.ipynb"
    assert doc["python"] == "3.7.9" and doc["cuda"] == "10.1" and doc["cudnn"] == "7.6"
    assert doc["locked"] is False
    assert doc["conda"]["channels"] == ["defaults"]
    assert "ipykernel=5.3.4" in doc["conda"]["dependencies"]
    # pip's side is locked for Python 3.7 (cp37m wheels) when PyPI answers: exact hashed pins of
    # exactly the export's pip lines, since the export's conda side provides every dependency
    # they need (absl-py, protobuf 3.13, grpcio, ...), as it did on the sender's machine.
    assert [p for p in doc["pip"] if p.split()[0] == "tensorflow-gpu==2.3.1"], doc["pip"]
    if doc.get("pip_locked"):
        assert all(" --hash=sha256:" in p for p in doc["pip"])
        assert {p.split(" ")[0].lower() for p in doc["pip"]} == {
            "astunparse==1.6.3",
            "gast==0.3.3",
            "keras-preprocessing==1.1.2",
            "numpy==1.18.5",
            "scipy==1.4.1",
            "tensorboard==2.3.0",
            "tensorflow-estimator==2.3.0",
            "tensorflow-gpu==2.3.1",
        }
        assert not [p for p in doc["pip"] if p.lower().startswith(("protobuf", "absl-py", "setuptools"))]
    assert {"spec": "vc=14.1=h0510ff6_4", "reason": "exists only for Windows"} in doc["dropped"]
    paths = {f["path"] for f in doc["files"]}
    assert {"Dockerfile", "env/environment.yml", "env/original/environment.yml", "work/warp-speed.ipynb"} <= paths
    with zipfile.ZipFile(out) as zf:
        assert zf.read("env/original/environment.yml") == ENVFILE.read_bytes()
        assert zf.read("work/warp-speed.ipynb") == NOTEBOOK.read_bytes()
        assert all(f["size"] == zf.getinfo(f["path"]).file_size for f in doc["files"])


def test_inspect_text(packed):
    result = kbundle("inspect", packed[0])
    assert result.returncode == 0 and "tensorflow-gpu==2.3.1" in result.stdout and "nvidia/cuda:" in result.stdout


def test_verify_ok_and_tampered(packed, tmp_path):
    out, _, _ = packed
    ok = kbundle("verify", out)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    bad = tmp_path / "bad.kbundle"
    with zipfile.ZipFile(out) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "Dockerfile":
                data = data.replace(b"USER kbundle", b"USER root\n#")
            zout.writestr(info, data)
    assert_one_error_line(kbundle("verify", bad), "Dockerfile")
    truncated = tmp_path / "cut.kbundle"
    truncated.write_bytes(out.read_bytes()[:-100])
    assert_one_error_line(kbundle("verify", truncated), "truncated or corrupt")
    assert_one_error_line(kbundle("verify", tmp_path / "nope.kbundle"), "does not exist")
    future = tmp_path / "future.kbundle"
    with zipfile.ZipFile(out) as zin, zipfile.ZipFile(future, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "kbundle.json":
                data = data.replace(b'"format_version": 1,', b'"format_version": 99,')
            zout.writestr(info, data)
    assert_one_error_line(kbundle("verify", future), "format version 99")
    assert kbundle("verify", future).returncode == 3


def test_same_inputs_same_bytes(packed, tmp_path):
    (tmp_path / "a").mkdir()
    again = tmp_path / "a" / "warp-speed.kbundle"
    result = kbundle("pack", NOTEBOOK, "-e", ENVFILE, "-o", again)
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == packed[0].read_bytes()


def test_bundle_is_at_most_8kb_larger_than_zip_of_inputs(packed, tmp_path):
    ref = tmp_path / "ref.zip"
    subprocess.run(["zip", "-q", "-9", "-j", str(ref), str(NOTEBOOK), str(ENVFILE)], check=True)
    extra = packed[0].stat().st_size - ref.stat().st_size
    assert extra <= 8 * 1024, f"bundle is {extra} bytes larger than zip -9 of its inputs"


def test_repack_replaces_an_existing_bundle(packed, tmp_path):
    out = tmp_path / "w.kbundle"
    out.write_bytes(packed[0].read_bytes())
    result = kbundle("pack", NOTEBOOK, "-e", ENVFILE, "-o", out, "--lock", "never", "--name", "renamed")
    assert result.returncode == 0, result.stderr
    assert json.loads(kbundle("inspect", out, "--json").stdout)["name"] == "renamed"


def test_includes_and_cuda_none(tmp_path):
    nb = notebook(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("x\n1\n")
    (tmp_path / "helper.py").write_text("X = 1\n")
    env = tmp_path / "environment.yml"
    env.write_text("channels: [conda-forge]\ndependencies:\n  - python=3.11\n  - pip:\n    - tensorflow==2.12.0\n")
    out = tmp_path / "x.kbundle"
    result = kbundle(
        "pack",
        nb,
        "-e",
        env,
        "-o",
        out,
        "--lock",
        "never",
        "--cuda",
        "none",
        "--include",
        tmp_path / "data",
        "--include",
        tmp_path / "helper.py",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert doc["includes"] == ["work/data/a.csv", "work/helper.py"]
    assert doc["cuda"] is None and not doc["base_image"].startswith("nvidia/cuda")
    needs = result.stdout.strip().splitlines()[-2]
    assert needs.startswith(
        "  they need  Docker or Podman (without one: kbundle run --native, outside any container); kbundle"
    )
    assert "NVIDIA" not in needs, needs
    assert {"ipykernel", "pip"} <= set(doc["conda"]["dependencies"])


def _fake_prefix(root: Path) -> Path:
    """A conda prefix as conda leaves it: conda-meta records plus a pip-installed dist-info."""
    prefix = root / "envs" / "fake"
    (prefix / "conda-meta").mkdir(parents=True)
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").write_text("#!/bin/sh\n")
    site = prefix / "lib" / "python3.11" / "site-packages"
    records = [
        ("python", "3.11.7", "hab00c5b_1_cpython", []),
        ("numpy", "1.26.4", "py311h64a7726_0", ["lib/python3.11/site-packages/numpy-1.26.4.dist-info/METADATA"]),
        ("ipykernel", "6.29.0", "pyhd33586a_0", ["lib/python3.11/site-packages/ipykernel-6.29.0.dist-info/METADATA"]),
        ("libgcc-ng", "13.2.0", "h807b86a_5", []),
    ]
    for name, version, build, files in records:
        (prefix / "conda-meta" / f"{name}-{version}-{build}.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "version": version,
                    "build": build,
                    "subdir": "linux-64",
                    "channel": "https://conda.anaconda.org/conda-forge/linux-64",
                    "files": files,
                }
            )
        )
        for f in files:
            (prefix / f).parent.mkdir(parents=True, exist_ok=True)
            (prefix / f).write_text(f"Name: {name}\nVersion: {version}\n")
    pip_dist = site / "rich-13.7.0.dist-info"
    pip_dist.mkdir(parents=True)
    (pip_dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rich\nVersion: 13.7.0\n\nbody\n")
    (pip_dist / "INSTALLER").write_text("pip\n")
    return prefix


def test_environment_from_active_conda_prefix(tmp_path):
    prefix = _fake_prefix(tmp_path)
    nb = notebook(tmp_path)
    out = tmp_path / "p.kbundle"
    result = kbundle("pack", nb, "-o", out, "--lock", "never", env={"CONDA_PREFIX": str(prefix)})
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert doc["conda"]["channels"] == ["conda-forge"]
    assert "numpy=1.26.4" in doc["conda"]["dependencies"] and "python=3.11.7" in doc["conda"]["dependencies"]
    assert doc["pip"] == ["rich==13.7.0"]  # numpy's dist-info belongs to conda, rich's to pip
    assert doc["source"]["kind"] == "conda-prefix" and doc["python"] == "3.11.7"
    with zipfile.ZipFile(out) as zf:
        assert "numpy=1.26.4=py311h64a7726_0" in zf.read("env/original/environment.yml").decode()


def test_environment_from_the_notebooks_kernelspec(tmp_path):
    prefix = _fake_prefix(tmp_path)
    kernels = tmp_path / "share" / "jupyter" / "kernels" / "fake-env"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(prefix / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Fake",
                "language": "python",
            }
        )
    )
    nb = notebook(tmp_path, kernel="fake-env")
    out = tmp_path / "k.kbundle"
    result = kbundle(
        "pack", nb, "-o", out, "--lock", "never", env={"JUPYTER_PATH": str(tmp_path / "share" / "jupyter")}
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert doc["source"]["kind"] == "kernelspec-prefix"
    assert doc["pip"] == ["rich==13.7.0"]


# ---------------------------------------------------------------- bad input: one line, no file


def _no_output(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.suffix == ".kbundle" or p.name.endswith(".tmp")]
    assert not left, left


def test_missing_notebook(tmp_path):
    assert_one_error_line(kbundle("pack", tmp_path / "nope.ipynb", "-e", ENVFILE, cwd=tmp_path), "does not exist")
    _no_output(tmp_path)


@pytest.mark.parametrize("content", ["not json at all", '{"just": "json"}', "[1, 2]"])
def test_not_a_notebook(tmp_path, content):
    nb = tmp_path / "nb.ipynb"
    nb.write_text(content)
    assert_one_error_line(kbundle("pack", nb, "-e", ENVFILE, cwd=tmp_path), "not a Jupyter notebook")
    _no_output(tmp_path)


def test_invalid_yaml(tmp_path):
    env = tmp_path / "environment.yml"
    env.write_text("name: x\ndependencies:\n  - numpy\n - bad: [\n")
    assert_one_error_line(kbundle("pack", notebook(tmp_path), "-e", env, cwd=tmp_path), "not valid YAML")
    _no_output(tmp_path)


@pytest.mark.parametrize(
    "content", ["name: x\nchannels: [conda-forge]\n", "name: x\ndependencies: []\n", "just a string\n"]
)
def test_env_without_dependencies(tmp_path, content):
    env = tmp_path / "environment.yml"
    env.write_text(content)
    result = kbundle("pack", notebook(tmp_path), "-e", env, cwd=tmp_path)
    assert_one_error_line(result)
    assert "dependencies" in result.stderr
    _no_output(tmp_path)


def test_unknown_cuda(tmp_path):
    assert_one_error_line(
        kbundle("pack", notebook(tmp_path), "-e", ENVFILE, "--cuda", "7.7", cwd=tmp_path), "unknown --cuda"
    )
    _no_output(tmp_path)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lock", "sometimes"], "unknown --lock"),
        (["--name", "Bad Name!"], "--name"),
        (["--base-image", "bad image"], "--base-image"),
        (["-e", "missing.yml"], "does not exist"),
    ],
)
def test_other_bad_options(tmp_path, args, needle):
    nb = notebook(tmp_path)
    if "-e" not in args:
        args = ["-e", str(ENVFILE), *args]
    assert_one_error_line(kbundle("pack", nb, *args, cwd=tmp_path), needle)
    _no_output(tmp_path)


def test_requirements_without_python(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("numpy==1.26.4\n")
    assert_one_error_line(kbundle("pack", notebook(tmp_path), "-e", req, cwd=tmp_path), "--python")
    _no_output(tmp_path)


def test_no_environment_found_says_how_to_pass_one(tmp_path):
    result = kbundle(
        "pack", notebook(tmp_path, kernel="no-such-kernel"), cwd=tmp_path, env={"JUPYTER_PATH": str(tmp_path)}
    )
    assert_one_error_line(result, "-e")
    _no_output(tmp_path)


def test_never_clobbers_a_users_file(tmp_path):
    precious = tmp_path / "notes.kbundle"
    precious.write_text("my notes")
    result = kbundle("pack", notebook(tmp_path), "-e", ENVFILE, "-o", precious, "--lock", "never", cwd=tmp_path)
    assert_one_error_line(result, "refusing to overwrite")
    assert precious.read_text() == "my notes"
    assert_one_error_line(
        kbundle("pack", notebook(tmp_path), "-e", ENVFILE, "-o", tmp_path / "nb.ipynb", cwd=tmp_path), "refusing"
    )


def test_include_outside_the_notebook_folder(tmp_path):
    (tmp_path / "nbdir").mkdir()
    nb = notebook(tmp_path / "nbdir")
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    assert_one_error_line(kbundle("pack", nb, "-e", ENVFILE, "--include", outside, cwd=tmp_path), "outside")
    _no_output(tmp_path)


def test_lock_always_fails_when_channels_are_unreachable(tmp_path):
    start = time.monotonic()
    result = kbundle(
        "pack",
        notebook(tmp_path),
        "-e",
        ENVFILE,
        "--lock",
        "always",
        "--channel",
        "http://127.0.0.1:9/nothing",
        cwd=tmp_path,
    )
    assert_one_error_line(result, "unreachable")
    assert time.monotonic() - start < 15
    _no_output(tmp_path)


def test_inspect_and_verify_bad_input(tmp_path):
    text = tmp_path / "x.kbundle"
    text.write_text("not a zip")
    assert_one_error_line(kbundle("inspect", text), "truncated or corrupt")
    assert_one_error_line(kbundle("inspect", tmp_path / "none.kbundle", "--json"), "does not exist")


def test_summary_warns_above_the_mail_limit(tmp_path):
    nb = notebook(tmp_path)
    (tmp_path / "big.bin").write_bytes(os.urandom(21 * 1024 * 1024))  # random: deflate cannot shrink it
    out = tmp_path / "big.kbundle"
    result = kbundle("pack", nb, "-e", ENVFILE, "-o", out, "--lock", "never", "--include", tmp_path / "big.bin")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "20 MiB" in warning[0] and "21.0 MiB" in warning[0]
    assert "21.0 MiB" in result.stdout


def test_manifest_resolves_channel_names_to_urls(packed):
    doc = json.loads(kbundle("inspect", packed[0], "--json").stdout)
    assert doc["channel_urls"] == ["https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r"]


def test_pack_json_prints_the_manifest(tmp_path):
    out = tmp_path / "j.kbundle"
    result = kbundle("pack", NOTEBOOK, "-e", ENVFILE, "-o", out, "--lock", "never", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert INSPECT_KEYS <= set(doc)
    assert doc == json.loads(kbundle("inspect", out, "--json").stdout)


def test_the_channels_line_says_which_channel_each_reason_is_for():
    """Two channels only specs name (pytorch::, nvidia/label/…::): each reason keeps its channel."""
    from types import SimpleNamespace

    from kbundle.bundle.format import Added
    from kbundle.commands.pack import _channels_note

    one = SimpleNamespace(added=[Added("channel defaults", "the environment names no channel, so conda's defaults")])
    assert _channels_note(one) == " (the environment names no channel, so conda's defaults)"
    two = SimpleNamespace(
        added=[
            Added("channel pytorch", "`pytorch::pytorch=2.3.1` names it"),
            Added("ipykernel", "the kernel needs it"),
            Added("channel nvidia/label/cuda-12.1.0", "`nvidia/label/cuda-12.1.0::cuda-nvcc` names it"),
        ]
    )
    assert _channels_note(two) == (
        " (pytorch: `pytorch::pytorch=2.3.1` names it; "
        "nvidia/label/cuda-12.1.0: `nvidia/label/cuda-12.1.0::cuda-nvcc` names it)"
    )
