"""`kbundle pack` locks the pip: section with pip's own resolver against the world's PEP 503
indexes on 127.0.0.1: exact pins with their wheels' sha256, `pip_locked: true`."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
import zipfile

import pytest

from helpers import assert_one_error_line, kbundle, notebook


def pip_env(world) -> dict:
    """pip sees the world's indexes only: no user pip.conf, find-links or constraints."""
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_NO_INPUT": "1"}


def write_env(folder, world, pip_lines: list[str]):
    body = "".join(f"    - {json.dumps(line)}\n" for line in pip_lines)
    path = folder / "environment.yml"
    path.write_text(
        f"name: p\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n"
        f"  - ipykernel\n  - pip\n  - pip:\n{body}"
    )
    return path


def manifest(bundle) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read("kbundle.json"))


@pytest.mark.docker
def test_pack_locks_the_pip_section_with_hashes(world, tmp_path):
    nb = notebook(tmp_path)
    env = write_env(
        tmp_path,
        world,
        [
            f"--extra-index-url {world['pypi_extra_index']}",
            f"--index-url {world['pypi_index']}",
            "kbrange>=1.2,<2",
            "kbdemo==1.0+cu118",
        ],
    )
    out = tmp_path / "p.kbundle"
    proc = kbundle(
        "pack", nb, "-e", env, "-o", out, "--base-image", world["base_image"], env=pip_env(world), timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    m = manifest(out)
    assert m["pip_locked"] is True
    assert m["pip_indexes"] == {
        "index_url": world["pypi_index"],
        "extra_index_urls": [world["pypi_extra_index"]],
        "find_links": [],
    }
    pins = {line.split("==")[0]: line for line in m["pip"]}
    assert set(pins) == {"kbrange", "kbdep", "kbdemo"}  # the range's dependency is locked too
    # Each hash is the sha256 of the very wheel the index serves.
    for name, version, index in (
        ("kbrange", "1.5", world["pypi_index"]),
        ("kbdep", "0.3", world["pypi_index"]),
        ("kbdemo", "1.0+cu118", world["pypi_extra_index"]),
    ):
        filename = f"{name}-{version}-py3-none-any.whl"
        data = urllib.request.urlopen(f"{index.rsplit('/simple', 1)[0]}/files/{filename}").read()
        assert pins[name] == f"{name}=={version} --hash=sha256:{hashlib.sha256(data).hexdigest()}"
    with zipfile.ZipFile(out) as zf:
        envyml = zf.read("env/environment.yml").decode()
    assert f"--extra-index-url {world['pypi_extra_index']}" in envyml and "kbrange<2,>=1.2" in envyml


@pytest.mark.docker
def test_vcs_lines_are_carried_for_the_recipient(world, tmp_path):
    nb = notebook(tmp_path)
    vcs = f"git+{world['git_repo']}@{world['git_tag']}"
    env = write_env(tmp_path, world, [f"--index-url {world['pypi_index']}", "kbdep", vcs])
    out = tmp_path / "p.kbundle"
    proc = kbundle(
        "pack", nb, "-e", env, "-o", out, "--base-image", world["base_image"], env=pip_env(world), timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    m = manifest(out)
    assert m["pip_locked"] is False
    assert m["pip"][0].startswith("kbdep==0.3 --hash=sha256:") and m["pip"][1] == vcs
    assert "resolved and built by the recipient" in proc.stdout + proc.stderr


@pytest.mark.docker
def test_lock_never_does_not_call_pip_and_an_unreachable_index_is_fast(world, tmp_path):
    nb = notebook(tmp_path)
    # An index on a closed port: auto carries the lines as written and says so, in seconds.
    env = write_env(tmp_path, world, ["--index-url http://127.0.0.1:9/simple", "kbrange>=1.2"])
    t0 = time.monotonic()
    proc = kbundle(
        "pack",
        nb,
        "-e",
        env,
        "-o",
        tmp_path / "a.kbundle",
        "--base-image",
        world["base_image"],
        env=pip_env(world),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    m = manifest(tmp_path / "a.kbundle")
    assert m["pip"] == ["kbrange>=1.2"] and m["pip_locked"] is False
    assert "pip: not locked" in proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 60
    # --lock never: pip is not run at all (a pip that cannot start would show otherwise).
    env_never = dict(pip_env(world), PYTHONPATH=str(tmp_path / "nopip"))
    (tmp_path / "nopip" / "pip").mkdir(parents=True)
    (tmp_path / "nopip" / "pip" / "__main__.py").write_text("raise SystemExit('pip was called')\n")
    proc = kbundle("pack", nb, "-e", env, "-o", tmp_path / "n.kbundle", "--lock", "never", env=env_never)
    assert proc.returncode == 0, proc.stderr
    assert manifest(tmp_path / "n.kbundle")["pip"] == ["kbrange>=1.2"]
    # --lock always: the unreachable index is one error line.
    proc = kbundle(
        "pack",
        nb,
        "-e",
        env,
        "-o",
        tmp_path / "x.kbundle",
        "--lock",
        "always",
        "--base-image",
        world["base_image"],
        env=pip_env(world),
        timeout=240,
    )
    assert_one_error_line(proc, "kbrange")


def test_an_early_pip_lock_serves_only_the_inputs_it_was_started_for():
    """pack starts pip's resolver on its first, offline reading; the final inputs must match."""
    from kbundle.pack import piplock
    from kbundle.specs import PipIndexes, parse_pip_line

    pins = [parse_pip_line("kbrange>=1.0")]
    indexes = PipIndexes.from_dict({})
    early = piplock.start(pins, indexes, "3.11", "2.36", "never")  # never: nothing runs, inputs recorded
    assert early.serves(pins, indexes, "3.11", "2.36")
    assert not early.serves(pins, indexes, "3.11", "2.28")  # the channels changed the base image
    assert not early.serves(pins, indexes, "3.10", "2.36")
    assert not early.serves([parse_pip_line("kbrange>=1.5")], indexes, "3.11", "2.36")
    assert not early.serves(pins, PipIndexes.from_dict({"index_url": "http://127.0.0.1:1/simple"}), "3.11", "2.36")


def test_a_section_that_is_a_lock_already_is_taken_as_it_is(monkeypatch):
    """uv.lock, pixi.lock and hashed exports pin every dependency with its hashes: pip's resolver
    is not asked again (it would keep one wheel's hash of several), and nothing is dropped."""
    import subprocess

    from kbundle.pack import piplock
    from kbundle.specs import PipIndexes, parse_pip_line

    def no_pip(*_args, **_kwargs):
        raise AssertionError("pip was run")

    monkeypatch.setattr(subprocess, "run", no_pip)
    pins = [
        parse_pip_line("click==8.1.7 --hash=sha256:" + "a" * 64 + " --hash=sha256:" + "b" * 64),
        parse_pip_line("tqdm==4.67.1 --hash=sha256:" + "c" * 64),
    ]
    done = piplock.lock(pins, PipIndexes(), "3.11", "2.35", "auto", piplock.CONDA_UNKNOWN)
    assert done.locked and done.pins == tuple(pins)
    assert "taken as locked" in done.notes[0]
