"""marks: a shared flock says "working here" until closed or the process dies; the check creates nothing it need not."""

from __future__ import annotations

import os
import subprocess
import sys

from kbundle import marks


def test_a_held_mark_is_seen_until_it_is_closed(tmp_path):
    path = tmp_path / "m.lock"
    assert marks.anyone_holds(path) is False
    fd = marks.take(path)
    assert fd is not None and marks.anyone_holds(path) is True
    os.close(fd)
    assert marks.anyone_holds(path) is False


def test_a_killed_holders_mark_is_gone_with_it(tmp_path):
    path = tmp_path / "m.lock"
    code = f"from pathlib import Path; from kbundle import marks; import time; marks.take(Path({str(path)!r})); print('held', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert marks.anyone_holds(path) is True
    finally:
        child.kill()
        child.wait()
    assert marks.anyone_holds(path) is False


def test_without_create_folder_nothing_is_made(tmp_path):
    path = tmp_path / "absent" / "m.lock"
    assert marks.take(path, create_folder=False) is None
    assert marks.anyone_holds(path, create_folder=False) is None
    assert not (tmp_path / "absent").exists()


def test_a_mark_held_exclusively_is_not_taken_without_waiting(tmp_path):
    import fcntl

    path = tmp_path / "m.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert marks.take(path, wait=False) is None
    finally:
        os.close(fd)
    assert marks.take(path, wait=False) is not None
