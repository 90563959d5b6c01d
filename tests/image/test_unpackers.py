"""image/unpackers: conda archives unpacked by rattler in worker processes, with the same result
as rattler in this process, rattler's own words when an archive is bad, and no lost archive
when a worker dies."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tarfile
import threading
from pathlib import Path

import pytest

from kbundle.image.unpackers import Unpackers, UnpackFailed, _here


def _archive(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    """A .tar.bz2 conda package: what rattler unpacks is a plain bzip2 tarball."""
    path = folder / f"{name}-1.0-0.tar.bz2"
    with tarfile.open(path, "w:bz2") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _digests(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    return hashlib.sha256(data).digest(), hashlib.md5(data).digest()


def test_workers_unpack_as_rattler_does_here(tmp_path):
    archives = [
        _archive(tmp_path, f"p{i}", {"info/index.json": b"{}", f"lib/f{i}.py": b"x = %d\n" % i}) for i in range(6)
    ]
    with Unpackers(len(archives)) as unpack:
        results = {}

        def one(path: Path) -> None:
            results[path.name] = unpack(path, tmp_path / "out" / path.name)

        threads = [threading.Thread(target=one, args=(a,)) for a in archives]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, path in enumerate(archives):
        assert results[path.name] == _digests(path)
        assert (tmp_path / "out" / path.name / f"lib/f{i}.py").read_bytes() == b"x = %d\n" % i
    assert _here(archives[0], tmp_path / "here") == _digests(archives[0])


def test_a_bad_archive_is_rattlers_own_words(tmp_path):
    bad = tmp_path / "bad-1.0-0.tar.bz2"
    bad.write_bytes(b"BZh91AY&SY this is not a tarball")
    with Unpackers(2) as unpack, pytest.raises(UnpackFailed) as caught:
        unpack(bad, tmp_path / "out")
    assert str(caught.value)


def test_a_dead_worker_costs_no_archive(tmp_path):
    archives = [_archive(tmp_path, f"q{i}", {f"f{i}": b"data"}) for i in range(3)]
    with Unpackers(2) as unpack:
        if not unpack._workers:
            pytest.skip("this machine has one core: archives are unpacked in process")
        for worker in unpack._workers:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
        for path in archives:
            assert unpack(path, tmp_path / "out" / path.name) == _digests(path)


def test_the_largest_waiting_archive_gets_the_next_worker(tmp_path):
    """The long poles (a bzip2 python, numpy) must not queue behind small packages that finished
    downloading a moment earlier: the install cannot end before they do."""
    with Unpackers(2) as unpack:
        if len(unpack._workers) < 2:
            pytest.skip("this machine has one core: archives are unpacked in process")
        busy = [unpack._take(1), unpack._take(1)]  # every worker is unpacking something
        got: list[int] = []

        def wait_for_a_worker(size: int) -> None:
            unpack._take(size)
            got.append(size)

        threads = []
        for size in (10, 1000, 5):  # arrival order: small, large, smaller
            threads.append(threading.Thread(target=wait_for_a_worker, args=(size,)))
            threads[-1].start()
            _until(lambda n=len(threads): len(unpack._waiting) == n)
        for handed, worker in enumerate(busy + busy[:1], start=1):
            unpack._give(worker)
            _until(lambda n=handed: len(got) == n)
        for t in threads:
            t.join(timeout=5)
        assert got == [1000, 10, 5]


def _until(condition, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
