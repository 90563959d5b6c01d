"""Locking with py-rattler: a hand-made file:// channel (repodata only) for the plain-words
failure messages, and the offline world's real http channel for success and failure."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from helpers import assert_one_error_line, kbundle, notebook
from kbundle.errors import KbundleError
from kbundle.pack.lock import channel_urls, lock, unreachable
from kbundle.pack.records import CudaChoice, NormalisedEnv
from kbundle.specs import parse_conda_spec


def _record(name, version, build, depends=(), subdir="linux-64", noarch=None):
    rec = {
        "name": name,
        "version": version,
        "build": build,
        "build_number": 0,
        "depends": list(depends),
        "subdir": subdir,
        "md5": "0" * 32,
        "sha256": "0" * 64,
        "size": 100,
        "timestamp": 1700000000000,
        "license": "MIT",
    }
    if noarch:
        rec["noarch"] = noarch
    return rec


@pytest.fixture(scope="module")
def file_channel(tmp_path_factory) -> str:
    """A channel with repodata only: enough for solving, nothing to download."""
    root = tmp_path_factory.mktemp("channel")
    subdirs = {
        "linux-64": [
            _record("python", "3.11.7", "h0_0"),
            _record("python", "3.12.1", "h0_0"),
            _record("numpy", "2.0.0", "py312_0", ["python >=3.12,<3.13"]),
            _record("numpy", "1.26.4", "py311_0", ["python >=3.11,<3.12"]),
            _record("torchish", "2.0.1", "cuda118_py311_0", ["python >=3.11,<3.12", "__cuda >=11.8"]),
        ],
        "noarch": [
            _record("ipykernel", "6.29.0", "pyh0_0", ["python >=3.8"], "noarch", "python"),
            _record("pip", "24.0", "pyh0_0", ["python >=3.7"], "noarch", "python"),
        ],
        "win-64": [_record("winonly", "1.0", "py311_0", ["python >=3.11,<3.12"], "win-64")],
    }
    for subdir, records in subdirs.items():
        (root / subdir).mkdir()
        packages = {f"{r['name']}-{r['version']}-{r['build']}.conda": r for r in records}
        (root / subdir / "repodata.json").write_text(
            json.dumps({"info": {"subdir": subdir}, "packages": {}, "packages.conda": packages})
        )
    return root.as_uri()


def _env(channel: str, *deps: str) -> NormalisedEnv:
    specs = [parse_conda_spec(d) for d in ("python=3.11", "ipykernel", *deps)]
    return NormalisedEnv(channels=[channel], dependencies=specs, pip=[], python="3.11")


def _cpu() -> CudaChoice:
    return CudaChoice(None, None, False, "debian:bookworm-slim", "2.36", "test")


def test_lock_success_records_the_solution(file_channel):
    result = lock(_env(file_channel, "numpy"), _cpu(), "auto")
    assert result.locked and result.python == "3.11.7"
    assert "numpy-1.26.4-py311_0.conda" in result.text and "ipykernel-6.29.0" in result.text
    assert "__glibc=2.36" in result.virtual_packages


def test_cuda_virtual_package_follows_the_choice(file_channel):
    with pytest.raises(KbundleError, match="torchish"):
        lock(_env(file_channel, "torchish=2.0.1=*cuda*"), _cpu(), "auto")
    gpu = CudaChoice("11.8", None, True, "nvidia/cuda:11.8.0-base-ubuntu22.04", "2.35", "test")
    result = lock(_env(file_channel, "torchish=2.0.1=*cuda*"), gpu, "auto")
    assert result.locked and "__cuda=11.8" in result.virtual_packages
    assert "__cuda=11.8" in result.text


def test_package_only_on_another_os_is_named_in_plain_words(file_channel):
    with pytest.raises(KbundleError) as info:
        lock(_env(file_channel, "winonly"), _cpu(), "auto")
    message = str(info.value)
    assert "`winonly` exists only for win-64" in message and "\n" not in message


def test_missing_version_and_missing_package(file_channel):
    with pytest.raises(KbundleError, match=r"`numpy=0.0.1` has no match for linux-64 .*available: 1.26.4, 2.0.0"):
        lock(_env(file_channel, "numpy=0.0.1"), _cpu(), "always")
    with pytest.raises(KbundleError, match="`nosuch` is not in"):
        lock(_env(file_channel, "nosuch"), _cpu(), "auto")


def test_conflict_is_explained_on_one_line(file_channel):
    with pytest.raises(KbundleError) as info:
        lock(_env(file_channel, "numpy=2.0.0"), _cpu(), "auto")
    message = str(info.value)
    assert "numpy 2.0.0" in message and "python >=3.12" in message and "\n" not in message


def test_unreachable_channels_fail_fast():
    import socket

    # A server that accepts connections and never answers: the probe must give up, not hang.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    hang = f"http://127.0.0.1:{silent.getsockname()[1]}/ch"
    try:
        start = time.monotonic()
        assert unreachable(["http://127.0.0.1:9/x", hang], timeout=1.0) == ["http://127.0.0.1:9/x", hang]
        assert time.monotonic() - start < 5
    finally:
        silent.close()
    result = lock(_env("http://127.0.0.1:9/x"), _cpu(), "auto")
    assert not result.locked and "unreachable" in result.note
    with pytest.raises(KbundleError, match="unreachable"):
        lock(_env("http://127.0.0.1:9/x"), _cpu(), "always")


def test_channel_names_resolve_like_conda():
    assert channel_urls(["defaults"]) == ["https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r"]
    assert channel_urls(["conda-forge", "http://x/ch/"]) == ["https://conda.anaconda.org/conda-forge", "http://x/ch"]


# ------------------------------------------------------------ the offline world's channel


def _world_env(tmp_path: Path, deps: str) -> Path:
    env = tmp_path / "environment.yml"
    env.write_text("name: w\nchannels: [defaults]\ndependencies:\n" + deps)
    return env


@pytest.mark.docker
def test_pack_locks_against_the_world_channel(world, tmp_path):
    env = _world_env(tmp_path, f"  - python={world['python']}\n  - numpy\n")
    out = tmp_path / "w.kbundle"
    result = kbundle(
        "pack",
        notebook(tmp_path),
        "-e",
        env,
        "-o",
        out,
        "--channel",
        world["channel"],
        "--base-image",
        world["base_image"],
        "--lock",
        "always",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert doc["locked"] is True and doc["conda"]["channels"] == [world["channel"]]
    assert doc["python"].startswith(world["python"] + ".")
    assert doc["base_image"] == world["base_image"]
    with zipfile.ZipFile(out) as zf:
        text = zf.read("env/rattler.lock").decode()
    assert "linux-64" in text and "/numpy-" in text and "/ipykernel-" in text and "/python-" in text
    assert kbundle("verify", out).returncode == 0
    # The member is a lock file rattler itself reads back, for linux-64.
    from rattler import LockFile

    lock_path = tmp_path / "back.lock"
    lock_path.write_text(text)
    records = LockFile.from_path(lock_path).default_environment().conda_repodata_records()["linux-64"]
    assert {"python", "numpy", "ipykernel"} <= {r.name.normalized for r in records}


@pytest.mark.docker
def test_pack_lock_failure_against_the_world_channel(world, tmp_path):
    env = _world_env(tmp_path, f"  - python={world['python']}\n  - numpy=0.0.1\n")
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", tmp_path / "w.kbundle", "--channel", world["channel"])
    assert_one_error_line(result, "`numpy=0.0.1` has no match for linux-64", "available:")
    assert not (tmp_path / "w.kbundle").exists()
    env = _world_env(tmp_path, f"  - python={world['python']}\n  - winpty-agent\n")
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", tmp_path / "w.kbundle", "--channel", world["channel"])
    assert_one_error_line(result, "`winpty-agent` is not in")


def test_cli_drops_a_package_the_channel_has_only_for_another_os(file_channel, tmp_path):
    # The channel answers at pack time: its repodata, not a table, says winonly is win-64 only.
    env = tmp_path / "environment.yml"
    env.write_text("channels: [defaults]\ndependencies:\n  - python=3.11\n  - winonly=1.0\n")
    out = tmp_path / "x.kbundle"
    result = kbundle("pack", notebook(tmp_path), "-e", env, "-o", out, "--channel", file_channel)
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert {"spec": "winonly=1.0", "reason": "exists only for win-64"} in doc["dropped"]
    assert doc["locked"] and "fully locked" in result.stdout.splitlines()[-1]
    strict = kbundle(
        "pack", notebook(tmp_path), "-e", env, "-o", tmp_path / "s.kbundle", "--channel", file_channel, "--strict"
    )
    assert_one_error_line(strict, "dropped `winonly=1.0`: exists only for win-64")
    assert not (tmp_path / "s.kbundle").exists()


def test_add_channel_goes_in_front_and_keeps_the_envs_channels(file_channel, tmp_path):
    env = tmp_path / "environment.yml"
    env.write_text(f"channels: [{file_channel}]\ndependencies:\n  - python=3.11\n  - numpy\n")
    out = tmp_path / "x.kbundle"
    result = kbundle(
        "pack",
        notebook(tmp_path),
        "-e",
        env,
        "-o",
        out,
        "--add-channel",
        "http://127.0.0.1:9/mirror",
        "--lock",
        "never",
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    assert doc["conda"]["channels"] == ["http://127.0.0.1:9/mirror", file_channel]
    locked = kbundle("pack", notebook(tmp_path), "-e", env, "-o", out, "--lock", "always")
    assert locked.returncode == 0, locked.stderr
    assert json.loads(kbundle("inspect", out, "--json").stdout)["python"] == "3.11.7"


def test_requirements_file_with_python(file_channel, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# pinned\nrich==13.7.0\n")
    out = tmp_path / "r.kbundle"
    result = kbundle("pack", notebook(tmp_path), "-e", req, "--python", "3.11", "-o", out, "--channel", file_channel)
    assert result.returncode == 0, result.stderr
    doc = json.loads(kbundle("inspect", out, "--json").stdout)
    # When the package index answers, pip's part is locked too: the whole closure, each with its hash.
    assert doc["pip"][0].split()[0] == "rich==13.7.0" and doc["locked"]
    if doc.get("pip_locked"):
        assert all(" --hash=sha256:" in p for p in doc["pip"]), doc["pip"]
    else:
        assert doc["pip"] == ["rich==13.7.0"]
    assert doc["source"]["kind"] == "requirements"
    assert {"python=3.11", "pip", "ipykernel"} <= set(doc["conda"]["dependencies"])
    assert zipfile.ZipFile(out).read("env/original/requirements.txt") == req.read_bytes()
