"""Solving for the image, not for the machine that solves (kbundle/solve.py, image/env.py).

The channel here is a real one, written and indexed with rattler in a temp folder: one
package that needs a newer glibc than the target image has.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from kbundle import contract, solve
from kbundle.bundle import Manifest
from kbundle.errors import KbundleError
from kbundle.flows.run import target_of
from kbundle.image.env import EnvSpec, resolve


def _package(subdir: Path, name: str, depends: list[str]) -> None:
    index = {
        "name": name,
        "version": "1.0",
        "build": "0",
        "build_number": 0,
        "depends": depends,
        "subdir": "linux-64",
        "platform": "linux",
        "arch": "x86_64",
        "license": "MIT",
    }
    files = {
        "info/index.json": json.dumps(index),
        "info/paths.json": json.dumps({"paths": [], "paths_version": 1}),
        "info/files": "",
    }
    subdir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(subdir / f"{name}-1.0-0.tar.bz2", "w:bz2") as tar:
        for path, text in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.mark.parametrize(
    "glibc, cuda, spec, solvable",
    [
        ("2.17", None, "needs-glibc-228", False),  # this host's glibc would allow it: the image's does not
        ("2.28", None, "needs-glibc-228", True),
        ("2.36", "11.8", "needs-cuda-12", False),  # no GPU here, so the host has no __cuda either way
        ("2.36", "12.2", "needs-cuda-12", True),
    ],
)
def test_solves_against_the_target_virtual_packages(channel, glibc, cuda, spec, solvable):
    target = contract.target_virtual_packages(glibc, cuda)
    if solvable:
        records = asyncio.run(solve.solve([channel], [spec], target))
        assert [str(r.name.normalized) for r in records] == [spec]
    else:
        with pytest.raises(solve.Unsolvable):
            asyncio.run(solve.solve([channel], [spec], target))


def test_unlocked_run_resolves_for_the_image(channel, tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path / "cache"))
    old_image = tuple(contract.target_virtual_packages("2.17", None))
    with pytest.raises(KbundleError, match="needs-glibc-228|__glibc"):
        resolve(EnvSpec((channel,), ("needs-glibc-228",), None, old_image))
    new_image = tuple(contract.target_virtual_packages("2.36", None))
    assert resolve(EnvSpec((channel,), ("needs-glibc-228",), None, new_image)).count == 1


def test_lock_text_reads_back(channel):
    target = contract.target_virtual_packages("2.36", None)
    records = asyncio.run(solve.solve([channel], ["needs-glibc-228"], target))
    again = solve.records_from_lock(solve.lock_text(records, [channel], target))
    assert [str(r.url) for r in again] == [str(r.url) for r in records]


class _Bundle:
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.base_image = manifest.base_image
        self.cuda = manifest.cuda


def _manifest(**fields) -> Manifest:
    base = dict(
        name="n",
        notebook="work/n.ipynb",
        python="3.11",
        cuda=None,
        cudnn=None,
        cuda_runtime_in_env=False,
        base_image="nvidia/cuda:12.2.2-runtime-ubuntu22.04",
        base_image_reason="",
        channels=[],
        dependencies=[],
        pip=[],
    )
    return Manifest(**{**base, **fields})


def test_target_of_a_bundle_is_what_its_manifest_records():
    recorded = ["__unix=0", "__glibc=2.28", "__cuda=11.8"]
    assert target_of(_Bundle(_manifest(virtual_packages=recorded))) == tuple(recorded)
    old = {k: v for k, v in _manifest().to_dict().items() if k != "virtual_packages"}
    legacy = Manifest.from_dict({**old, "lock_virtual_packages": recorded})  # kbundle 0.1's name for it
    assert legacy.virtual_packages == recorded


def test_target_of_an_old_unlocked_bundle_comes_from_its_base_image():
    target = target_of(_Bundle(_manifest(cuda="12.2")))
    assert "__glibc=2.35" in target and "__cuda=12.2" in target  # ubuntu22.04's glibc, from the data table


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    """The channel served over HTTP on 127.0.0.1: run refuses file:// channels (docs/security.md)."""
    from rattler.index import index_fs

    root = tmp_path_factory.mktemp("channel")
    _package(root / "linux-64", "needs-glibc-228", ["__glibc >=2.28"])
    _package(root / "linux-64", "needs-cuda-12", ["__cuda >=12"])
    (root / "noarch").mkdir()
    result = index_fs(root, write_zst=False, write_shards=False)
    if asyncio.iscoroutine(result):
        asyncio.run(result)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
