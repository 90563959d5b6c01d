"""A second run of a bundle whose pip: section pip had to resolve reuses the resolution it recorded,
when every wheel of it is still in the cache for the image's target: nothing is asked of the network."""

from __future__ import annotations

import hashlib

import pytest

from kbundle.image import wheels


def _put(folder, name: str, data: bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KBUNDLE_CACHE_DIR", str(tmp_path))
    index = wheels.cache_dir("3.11")
    sha_a = _put(index, "kbrange-1.5-py3-none-any.whl", b"range")
    sha_b = _put(index, "numpy-2.1.0-cp311-cp311-manylinux_2_28_x86_64.whl", b"numpy")
    sha_g = hashlib.sha256(b"git").hexdigest()
    _put(wheels.cache_root_dir("built") / sha_g[:16], "kbgit-0.1-py3-none-any.whl", b"git")
    return {
        "range": f"kbrange==1.5 --hash=sha256:{sha_a}",
        "numpy": f"numpy==2.1.0 --hash=sha256:{sha_b}",
        "git": f"kbgit==0.1 --hash=sha256:{sha_g}  # built from git+http://127.0.0.1/kbgit.git@abc",
    }


@pytest.mark.parametrize(
    "lines, glibc, reused",
    [
        (["range", "git"], "2.36", True),
        (["range", "numpy", "git"], "2.36", True),
        (["range", "numpy"], "2.17", False),  # that numpy needs glibc 2.28: another image, another resolution
        (["range", "missing"], "2.36", False),  # a wheel gone from the cache: ask pip again
        (["range", "unhashed"], "2.36", False),  # not a line kbundle recorded
        (["range", "otherhash"], "2.36", False),
    ],
)
def test_reuse_needs_every_recorded_wheel_for_this_target(cache, lines, glibc, reused):
    extra = {
        "missing": "kbdep==0.3 --hash=sha256:" + "0" * 64,
        "unhashed": "kbdep==0.3",
        "otherhash": "kbrange==1.5 --hash=sha256:" + "1" * 64,
    }
    recorded = [cache.get(k) or extra[k] for k in lines]
    found = wheels._reuse(recorded, "3.11", glibc)
    assert (found is not None) == reused
    if reused:
        assert found.resolution == tuple(recorded) and found.downloaded == 0
        assert [f.name for f in found.files][0] == "kbrange-1.5-py3-none-any.whl"
        assert [p.name for p in found.pins] == [line.split("==")[0] for line in recorded]
