"""Conda archives unpacked by rattler in a few worker processes, several at once.

py-rattler's `package_streaming.extract` holds the GIL while it decompresses. Measured with
0.28: two threads given one archive each ran one after the other, and a third thread that only
counted got 2 turns in 3 s; the downloads and the progress line stop too. rattler's own
installer unpacks in Rust threads, on every core. So kbundle hands each downloaded archive to
one of a few small worker processes (`python -c`, about 50 ms to start) that each run the same
rattler call, one archive at a time, and reply with the digests it computed.

A worker ignores Ctrl-C (kbundle stops it, in order) and dies with kbundle even when kbundle is
SIGKILLed (kbundle/children.py). Where no worker can be started, the archive is unpacked in
this process, as before.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

_WORKER = r"""
import json, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
from rattler.package_streaming import extract
for line in sys.stdin:
    archive, dest = json.loads(line)
    try:
        sha, md5 = extract(archive, dest)
        reply = {"sha256": sha.hex(), "md5": md5.hex()}
    except Exception as exc:
        reply = {"error": " ".join(str(exc).split()) or type(exc).__name__}
    print(json.dumps(reply), flush=True)
"""

MAX_WORKERS = 4  # decompression is CPU-bound: more processes than cores only contend


class UnpackFailed(Exception):
    """rattler's own words for an archive it could not unpack (ENOSPC reads `os error 28`)."""


class Unpackers:
    """`with Unpackers(n) as unpack: sha, md5 = unpack(archive, dest)`, from any thread."""

    def __init__(self, wanted: int):
        self._count = max(0, min(wanted, os.cpu_count() or 1, MAX_WORKERS))
        self._idle: queue.Queue = queue.Queue()
        self._workers: list[subprocess.Popen] = []
        self._alive = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Unpackers:
        from kbundle.children import die_with_kbundle

        for _ in range(self._count if self._count > 1 else 0):  # one worker gains nothing over this process
            try:
                worker = subprocess.Popen(
                    [sys.executable, "-c", _WORKER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    preexec_fn=die_with_kbundle(),
                )
            except OSError:
                break
            self._workers.append(worker)
            self._idle.put(worker)
        self._alive = len(self._workers)
        return self

    def __exit__(self, *exc) -> None:
        for worker in self._workers:
            try:
                worker.stdin.close()
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def __call__(self, archive: Path, dest: Path) -> tuple[bytes, bytes]:
        """rattler's (sha256, md5) of `archive`, unpacked into `dest`."""
        worker = self._take()
        if worker is None:
            return _here(archive, dest)
        reply = _ask(worker, archive, dest)
        if reply is None:  # the worker died (killed, out of memory): this one is unpacked here
            with self._lock:
                self._alive -= 1
            return _here(archive, dest)
        self._idle.put(worker)
        if "error" in reply:
            raise UnpackFailed(reply["error"])
        return bytes.fromhex(reply["sha256"]), bytes.fromhex(reply["md5"])

    def _take(self) -> Optional[subprocess.Popen]:
        """An idle worker, waiting for one; None once none is left alive."""
        while True:
            with self._lock:
                if self._alive <= 0:
                    return None
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                continue


def _ask(worker: subprocess.Popen, archive: Path, dest: Path) -> Optional[dict]:
    try:
        worker.stdin.write(json.dumps([os.fspath(archive), os.fspath(dest)]) + "\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        return json.loads(line) if line else None
    except (OSError, ValueError):
        return None


def _here(archive: Path, dest: Path) -> tuple[bytes, bytes]:
    import rattler.package_streaming as streaming

    try:
        return streaming.extract(archive, dest)
    except Exception as exc:
        raise UnpackFailed(" ".join(str(exc).split()) or type(exc).__name__) from None
