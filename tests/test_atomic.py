"""kbundle/atomic.py: a file replaced whole or not at all, with the mode the umask allows, and the
umask read without being changed (other threads create files meanwhile)."""

from __future__ import annotations

import os
import threading

import pytest

from kbundle import atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_a_written_file_is_shared_as_the_umask_allows(tmp_path, umask_027):
    target = tmp_path / "sub" / "record.json"
    atomic.write_atomic(target, "{}")
    assert target.read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_reading_the_umask_never_opens_it_to_other_threads(tmp_path, umask_027):
    """Flipping the umask to 0 to read it made files created meanwhile by other threads 0666."""
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            made = tmp_path / f"f{threading.get_ident()}"
            fd = os.open(made, os.O_CREAT | os.O_WRONLY, 0o666)
            os.close(fd)
            seen.add(made.stat().st_mode & 0o777)
            made.unlink()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3000):
            assert atomic._umask() == 0o027
    finally:
        stop.set()
        watcher.join()
    assert seen == {0o640}
