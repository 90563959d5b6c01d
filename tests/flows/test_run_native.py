"""`kbundle run --native`: a recipient without a container engine (DOCKER_HOST points nowhere).

The real CLI packs world bundles (the world's conda channel and pip index on 127.0.0.1; the
world fixture needs Docker only for its base image) and runs them with `--native`: the
environment goes into a prefix kbundle owns, keyed by the bundle's content hash; the kernel is a
plain ipykernel of it, which jupyter_client starts from the registered kernelspec. A second run
reuses the prefix; `kernels remove` and `gc` remove it; a VCS pip line is named in the review,
and a declined review leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import answer_on_a_terminal, printed_by_kernel, run_kbundle

pytestmark = pytest.mark.docker

_kbundle = functools.partial(run_kbundle, timeout=900)
NO_ENGINE = "unix:///nonexistent/docker.sock"
NOTEBOOK_SOURCE = "import kbdep, kbrange\nprint(kbrange.__version__, kbdep.__version__, kbdep.ORIGIN)"


def _env(cache: Path, jupyter: Path) -> dict:
    env = dict(os.environ)
    env.update(
        JUPYTER_DATA_DIR=str(jupyter),
        KBUNDLE_CACHE_DIR=str(cache),
        PIP_CONFIG_FILE=os.devnull,  # the world's index only: no user pip.conf or find-links
        PIP_FIND_LINKS="",
        DOCKER_HOST=NO_ENGINE,  # no engine answers: --native needs none
    )
    env.pop("JUPYTER_PATH", None)
    return env


def _pack(world, folder: Path, name: str, pip: list[str], lock: str = "auto") -> Path:
    """A bundle of python, ipykernel, conda's kbdep 0.4 and `pip` lines from the world's index."""
    folder.mkdir(parents=True)
    cell = {"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": []}
    nb = {"cells": [dict(cell, source=NOTEBOOK_SOURCE)], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (folder / f"{name}.ipynb").write_text(json.dumps(nb))
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - kbdep=0.4\n  - pip:\n    - --index-url {world['pypi_index']}\n"
        + "".join(f"    - {line}\n" for line in pip)
    )
    out = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--lock", lock, "--base-image", world["base_image"]]
    env = _env(folder / "cache", folder / "jupyter")
    env.pop("DOCKER_HOST")  # pack itself never needs an engine; the sender may have one
    proc = _kbundle([*args, "-o", out], env, folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def native_run(world, tmp_path_factory):
    """One locked bundle (conda's kbdep 0.4, pip's kbrange==1.5) run with --native --yes --json."""
    root = tmp_path_factory.mktemp("kbundle-native")
    bundle = _pack(world, root / "sender", f"kbnat-{uuid.uuid4().hex[:8]}", ["kbrange==1.5"])
    env = _env(root / "cache", root / "jupyter")
    recipient = root / "recipient"
    recipient.mkdir()
    proc = _kbundle(["run", bundle, "--native", "--yes", "--json"], env, recipient)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr, env, bundle, recipient


def test_the_environment_goes_into_a_prefix_kbundle_owns(native_run):
    from kbundle.bundle import open_bundle

    data, stderr, env, bundle, _ = native_run
    prefix = Path(data["native"]["prefix"])
    digest = open_bundle(bundle).identity
    assert prefix == Path(env["KBUNDLE_CACHE_DIR"]) / "native" / digest[:16]
    assert data["built"] is True and data["native"]["reused"] is False and data["image"] == ""
    assert (prefix / ".kbundle-native.json").is_file() and (prefix / "conda-meta").is_dir()
    assert [line.split(" ")[0] for line in data["pip_resolved"]] == ["kbrange==1.5"]
    assert "no NVIDIA GPU found" in stderr and "the kernel runs on CPU" in stderr  # said plainly
    assert data["gpus"] == []
    spec = json.loads((Path(data["kernelspec"]) / "kernel.json").read_text())
    assert spec["argv"] == [str(prefix / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["display_name"] == f"{data['name']} (kbundle, native)"
    assert spec["env"]["PATH"] == f"{prefix}/bin:${{PATH}}" and spec["env"]["CONDA_PREFIX"] == str(prefix)
    assert spec["metadata"]["kbundle"]["native"] == str(prefix)
    assert spec["metadata"]["kbundle"]["pip_resolved"] == data["pip_resolved"]


def test_the_kernel_runs_in_the_prefix_with_the_locked_versions(native_run, monkeypatch, tmp_path):
    data, _, env, _, _ = native_run
    monkeypatch.setenv("JUPYTER_DATA_DIR", env["JUPYTER_DATA_DIR"])
    # A Jupyter started with another Python's path (an HPC module, another activated env) and a
    # user site with its own copy: the kernel still imports the locked packages.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kbdep.py").write_text("__version__, ORIGIN = '9.9', 'PYTHONPATH'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "elsewhere"))
    user_site = tmp_path / "home" / ".local" / "lib"
    for version in ("3.7", "3.11"):
        (user_site / f"python{version}" / "site-packages").mkdir(parents=True)
        (user_site / f"python{version}" / "site-packages" / "kbrange.py").write_text(
            "__version__, ORIGIN = '9.9', 'user site'\n"
        )
    monkeypatch.setenv("PYTHONUSERBASE", str(tmp_path / "home" / ".local"))
    code = (
        "import json, os, subprocess, sys, kbdep, kbrange\n"
        "check = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True, text=True)\n"
        "print(json.dumps({'prefix': sys.prefix, 'kbdep': [kbdep.__version__, kbdep.ORIGIN],"
        " 'kbrange': [kbrange.__version__, kbrange.ORIGIN], 'check': check.returncode,"
        " 'conda_prefix': os.environ.get('CONDA_PREFIX')}))"
    )
    seen = json.loads(printed_by_kernel(data["kernel_name"], code, ready_timeout=90))
    prefix = data["native"]["prefix"]
    assert seen == {
        "prefix": prefix,
        "kbdep": ["0.4", "conda"],  # conda's, kept: pip saw it installed
        "kbrange": ["1.5", "index"],
        "check": 0,
        "conda_prefix": prefix,
    }


def test_a_second_run_reuses_the_prefix_and_installs_nothing(native_run):
    data, _, env, bundle, recipient = native_run
    proc = _kbundle(["run", bundle, "--native", "--yes", "--json"], env, recipient)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["native"] == dict(data["native"], reused=True, install_seconds=0.0)
    assert again["built"] is False and again["kernel_name"] == data["kernel_name"]
    assert "installing" not in proc.stderr and "fetching" not in proc.stderr, proc.stderr
    assert again["seconds"] < 1.5, again["seconds"]  # nothing installed: the bundle read, the kernel registered
    assert again["pip_resolved"] == data["pip_resolved"]
    summary = _kbundle(["run", bundle, "--native", "--yes"], env, recipient).stdout
    assert "already installed: reused" in summary and "outside any container" in summary


def test_execute_runs_the_notebook_in_the_native_kernel(native_run):
    _, _, env, bundle, recipient = native_run
    proc = _kbundle(["run", bundle, "--native", "--yes", "--json", "--execute"], env, recipient)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["execute"]
    assert [c["status"] for c in report["cells"]] == ["no-reference"]  # the sender saved no output
    executed = json.loads(Path(report["output"]).read_text())
    assert "".join(executed["cells"][0]["outputs"][0]["text"]) == "1.5 0.4 conda\n"


def test_without_an_engine_plain_run_names_native(native_run):
    _, _, env, bundle, recipient = native_run
    proc = _kbundle(["run", bundle, "--yes"], env, recipient)
    assert proc.returncode == 4
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "cannot reach the Docker daemon" in line and "--native" in line and "as you, outside any container" in line


def test_doctor_native_checks_what_run_native_needs_without_an_engine(native_run, tmp_path, mount_tmpfs):
    _, _, env, bundle, _ = native_run
    proc = _kbundle(["doctor", bundle, "--native", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and "docker" not in data  # no engine is asked
    topics = {f["topic"]: f for f in data["findings"]}
    assert topics["native"]["level"] == "ok" and topics["disk"]["level"] == "ok"
    assert "for the environment" in topics["disk"]["message"], topics["disk"]
    # The prefixes' folder on a disk too small for the environment: the run's own words, exit 4.
    small = mount_tmpfs(tmp_path / "small", "size=1m")
    proc = _kbundle(["doctor", bundle, "--native", "--prefix-root", small], env, tmp_path)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "ENOSPC ahead" in line and str(small) in line, line
    assert any(ln.startswith("fail") and "disk" in ln for ln in proc.stdout.splitlines()), proc.stdout


def test_doctor_prefix_root_goes_with_native(native_run, tmp_path):
    _, _, env, _, _ = native_run
    proc = _kbundle(["doctor", "--prefix-root", tmp_path], env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --prefix-root goes with --native"


def test_kernels_list_remove_and_gc_remove_the_prefix(native_run):
    data, _, env, bundle, recipient = native_run
    prefix = Path(data["native"]["prefix"])
    listed = json.loads(_kbundle(["kernels", "list", "--json"], env).stdout)
    (mine,) = [k for k in listed if k["name"] == data["kernel_name"]]
    assert mine["native"] == str(prefix) and mine["health"] == "ok"
    table = _kbundle(["kernels", "list"], env).stdout
    assert f"native {prefix}" in table

    proc = _kbundle(["kernels", "remove", data["kernel_name"], "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "kernel": data["kernel_name"],
        "path": data["kernelspec"],
        "native": str(prefix),
        "native_removed": True,
    }
    assert not prefix.exists()

    # Installed again (from the package cache), then its kernelspec goes by hand: gc finds the prefix.
    proc = _kbundle(["run", bundle, "--native", "--yes", "--json"], env, recipient)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["native"]["reused"] is False and prefix.is_dir()
    import shutil

    shutil.rmtree(data["kernelspec"])
    planned = json.loads(_kbundle(["gc", "--dry-run", "--json"], env).stdout)
    assert str(prefix) in [i["ref"] for i in planned["items"]], planned
    proc = _kbundle(["gc", "--yes", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    assert "containers and images are not checked" in proc.stderr  # no engine: said, and the rest still swept
    assert str(prefix) in [i["ref"] for i in json.loads(proc.stdout)["removed"]]
    assert not prefix.exists()


# ----------------------------------------------------------------- a VCS line, and declining


@pytest.fixture(scope="module")
def vcs_bundle(world, tmp_path_factory):
    """Unlocked (solved on the recipient's machine) with a git requirement, whose build code runs there."""
    root = tmp_path_factory.mktemp("kbundle-native-vcs")
    vcs = f"git+{world['git_repo']}@{world['git_tag']}"
    bundle = _pack(world, root / "sender", f"kbnvcs-{uuid.uuid4().hex[:8]}", ["kbrange==1.5", vcs], lock="never")
    return bundle, vcs, root


def _assert_nothing_left(env: dict, cwd: Path, bundle: Path) -> None:
    from kbundle.bundle import open_bundle

    assert not (cwd / bundle.stem).exists(), "the workdir was left behind"
    native = Path(env["KBUNDLE_CACHE_DIR"]) / "native"
    assert not (native / open_bundle(bundle).identity[:16]).exists(), "a prefix was left behind"
    kernels = Path(env["JUPYTER_DATA_DIR"]) / "kernels"
    assert not (kernels.exists() and list(kernels.iterdir())), "a kernel was registered"


def test_an_unlocked_bundle_too_big_for_the_disk_is_named_once_solved(vcs_bundle, tmp_path, mount_tmpfs):
    """Unlocked, its sizes are known only once solved: checked then, before a package is fetched."""
    bundle, _, _ = vcs_bundle
    small = mount_tmpfs(tmp_path / "small", "size=16m")
    env = _env(small / "cache", tmp_path / "jupyter")
    proc = _kbundle(["run", bundle, "--native", "--yes"], env, tmp_path)
    assert proc.returncode == 4, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "ENOSPC ahead" in line and str(small / "cache") in line, line
    pkgs = small / "cache" / "pkgs"
    assert not (pkgs.exists() and list(pkgs.glob("*.conda"))), "packages were downloaded before the check"
    _assert_nothing_left(env, tmp_path, bundle)


def test_without_yes_and_no_terminal_it_asks_for_yes_and_leaves_nothing(vcs_bundle, tmp_path):
    bundle, _, _ = vcs_bundle
    env = _env(tmp_path / "cache", tmp_path / "jupyter")
    proc = _kbundle(["run", bundle, "--native"], env, tmp_path)
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "--yes" in line and "as you, outside any container" in line
    _assert_nothing_left(env, tmp_path, bundle)


def test_the_review_names_the_host_side_build_and_a_no_leaves_nothing(vcs_bundle, tmp_path):

    bundle, vcs, _ = vcs_bundle
    env = _env(tmp_path / "cache", tmp_path / "jupyter")
    proc = answer_on_a_terminal(["run", str(bundle), "--native"], env, tmp_path)
    err = proc.stderr
    assert proc.returncode == 1 and "declined" in err, err
    review = err[: err.index("Install it on this machine and register the kernel? [y/N]")]
    assert "ON THIS MACHINE, AS YOU, OUTSIDE ANY CONTAINER" in review
    assert f"build       {vcs}: its build code runs on this machine, as you" in review
    assert "a .pth file in a wheel runs at every start" in review
    assert "solved here" in review and "glibc" in review  # unlocked: for this machine's glibc and CUDA
    assert "installing " not in err.replace("before installing it", "") and "fetching" not in err  # nothing ran
    _assert_nothing_left(env, tmp_path, bundle)


def test_with_yes_the_git_requirement_is_built_here_and_imported(vcs_bundle, tmp_path):
    bundle, vcs, _ = vcs_bundle
    env = _env(tmp_path / "cache", tmp_path / "jupyter")
    proc = _kbundle(["run", bundle, "--native", "--yes", "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    resolved = {line.split("==")[0]: line for line in data["pip_resolved"]}
    assert set(resolved) == {"kbrange", "kbgit"}  # kbdep is conda's
    assert resolved["kbgit"].split("  # built from ")[1].startswith(vcs.rsplit("@", 1)[0] + "@")
    assert any(v.startswith("__glibc=") for v in data["native"]["virtual_packages"])  # solved for this machine
    python = Path(data["native"]["prefix"]) / "bin" / "python"
    out = subprocess.run(
        [python, "-c", "import kbgit, kbdep; print(kbgit.ORIGIN, kbdep.ORIGIN)"], capture_output=True, text=True
    )
    assert out.stdout.split() == ["git", "conda"], out.stderr
