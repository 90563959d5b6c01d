"""`kbundle run --require-signature` accepts only signers the recipient trusts (allowed_signers).

A signature by a key made a second earlier proves only that someone has a key. Under
`--require-signature` an unknown signer is refused, `--yes` or not, with the one command that
would trust it; once `kbundle trust add` named that key, the same run goes through. The real
CLI, real ssh-keygen keys, and (for the run that passes) the real engine and the world's channel.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import uuid
from pathlib import Path

import pytest

from helpers import run_kbundle

kbundle = functools.partial(run_kbundle, timeout=900)


@pytest.fixture
def env(tmp_path) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "JUPYTER_PATH")}
    out.update(
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),
        KBUNDLE_CACHE_DIR=str(tmp_path / "cache"),
        KBUNDLE_CONFIG_DIR=str(tmp_path / "config"),
    )
    return out


def one_error(proc, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def signed_bundle(tmp_path: Path, key: Path, **changes) -> Path:
    from bundle.bundlekit import good_bundle  # tests/bundle/: real bundles, written with kbundle's writer
    from kbundle.bundle.signing import signer_for

    return good_bundle(tmp_path / f"{key.name}.kbundle", sign=signer_for(key), pip=[], **changes)


def key(tmp_path: Path, identity: str, name: str) -> Path:
    from bundle.bundlekit import make_key

    return make_key(tmp_path, identity, name)


def advice(line: str) -> list[str]:
    """The `kbundle trust add ...` command the error line names, as argv."""
    at = line.index("kbundle trust add ")
    return shlex.split(line[at:])


def test_an_unknown_signer_is_refused_under_yes_with_the_command_that_trusts_it(tmp_path, env):
    fresh = key(tmp_path, "mallory@example.com", "mallory")  # made a moment ago: it proves nothing
    bundle = signed_bundle(tmp_path, fresh)
    proc = kbundle(["run", bundle, "--require-signature", "--yes"], env, tmp_path)
    line = one_error(proc, "unknown key", "mallory@example.com", "--require-signature", "kbundle trust add")
    assert proc.returncode == 1
    command = advice(line)
    assert command[:4] == ["kbundle", "trust", "add", "mallory@example.com"]
    assert command[4] == " ".join((Path(f"{fresh}.pub").read_text()).split()[:2])  # exactly the signer's key
    assert not (tmp_path / "good").exists(), "the run placed files before refusing"
    assert not (Path(env["JUPYTER_DATA_DIR"]) / "kernels").exists(), "a kernel was registered"


def test_a_trusted_key_for_another_identity_is_still_unknown(tmp_path, env):
    alice = key(tmp_path, "alice@example.com", "alice")
    bob = key(tmp_path, "bob@example.com", "bob")
    assert kbundle(["trust", "add", "bob@example.com", f"{bob}.pub"], env, tmp_path).returncode == 0
    assert kbundle(["trust", "add", "alice@example.com", f"{bob}.pub"], env, tmp_path).returncode == 0
    proc = kbundle(["run", signed_bundle(tmp_path, alice), "--require-signature", "--yes"], env, tmp_path)
    one_error(proc, "unknown key", "kbundle trust add alice@example.com")


def test_an_unsigned_bundle_is_refused_as_before(tmp_path, env):
    from bundle.bundlekit import good_bundle

    bundle = good_bundle(tmp_path / "unsigned.kbundle", pip=[])
    proc = kbundle(["run", bundle, "--require-signature", "--yes"], env, tmp_path)
    one_error(proc, "not signed", "--require-signature")


@pytest.mark.docker
def test_the_signer_trusted_with_that_command_runs(world, tmp_path, env, docker_client):
    alice = key(tmp_path, "alice@example.com", "alice")
    name = f"kbsig-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "sender"
    folder.mkdir()
    (folder / f"{name}.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    (folder / "environment.yml").write_text(
        f"name: {name}\nchannels:\n  - {world['channel']}\ndependencies:\n  - python={world['python']}\n  - ipykernel\n"
    )
    bundle = folder / f"{name}.kbundle"
    args = ["pack", f"{name}.ipynb", "-e", "environment.yml", "--channel", world["channel"], "--sign", alice]
    proc = kbundle([*args, "--base-image", world["base_image"], "-o", bundle], env, folder, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recipient = tmp_path / "recipient"
    recipient.mkdir()
    refused = kbundle(["run", bundle, "--require-signature", "--yes", "--gpus", "none"], env, recipient)
    command = advice(one_error(refused, "unknown key", "kbundle trust add alice@example.com"))
    trusted = kbundle(command[1:], env, recipient)  # exactly what the line said, as the user would paste it
    assert trusted.returncode == 0, trusted.stderr
    proc = kbundle(["run", bundle, "--require-signature", "--yes", "--gpus", "none", "--json"], env, recipient)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    try:
        assert data["built"] is True and data["kernel_name"] == f"kbundle-{name}"
    finally:
        docker_client.images.remove(data["image"], force=True)
