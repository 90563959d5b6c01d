"""Conda archives unpacked by rattler in a few worker processes, several at once.

py-rattler's `package_streaming.extract` holds the GIL while it decompresses. Measured with
0.28: two threads given one archive each ran one after the other, and a third thread that only
counted got 2 turns in 3 s; the downloads and the progress line stop too. rattler's own
installer unpacks in Rust threads, on every core. So kbundle hands each downloaded archive to
one of a few small worker processes (`python -c`, about 50 ms to start) that each run the same
rattler call, one archive at a time, and reply with the digests it computed.

When several archives wait for a worker, the largest goes first: a bzip2 python or numpy takes
seconds on one core, and the install cannot end before it does. Handed out first come, first
served, they waited behind a handful of small packages that finished their download a moment
earlier (measured: python started unpacking more than a second late, and finished last).

A worker ignores Ctrl-C (kbundle stops it, in order) and dies with kbundle even when kbundle is
SIGKILLed (kbundle/children.py). Where no worker can be started, the archive is unpacked in
this process, as before.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
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
        self._idle: list[subprocess.Popen] = []
        self._waiting: list[tuple[int, int]] = []  # heap of (-archive size, arrival): largest first
        self._arrivals = itertools.count()
        self._workers: list[subprocess.Popen] = []
        self._alive = 0
        self._turn = threading.Condition()

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
            self._idle.append(worker)
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
        worker = self._take(_size(archive))
        if worker is None:
            return _here(archive, dest)
        reply = _ask(worker, archive, dest)
        self._give(worker, alive=reply is not None)
        if reply is None:  # the worker died (killed, out of memory): this one is unpacked here
            return _here(archive, dest)
        if "error" in reply:
            raise UnpackFailed(reply["error"])
        return bytes.fromhex(reply["sha256"]), bytes.fromhex(reply["md5"])

    def _take(self, size: int) -> Optional[subprocess.Popen]:
        """An idle worker once no larger archive waits for one; None once no worker is left alive."""
        with self._turn:
            ticket = (-size, next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            while self._alive > 0 and not (self._idle and self._waiting[0] == ticket):
                self._turn.wait()
            self._waiting.remove(ticket)
            heapq.heapify(self._waiting)
            self._turn.notify_all()  # the next largest may find a worker too
            return self._idle.pop() if self._alive > 0 else None

    def _give(self, worker: subprocess.Popen, alive: bool = True) -> None:
        """A worker back to the pool, or counted out when it died."""
        with self._turn:
            if alive:
                self._idle.append(worker)
            else:
                self._alive -= 1
            self._turn.notify_all()


def _size(archive: Path) -> int:
    try:
        return archive.stat().st_size
    except OSError:
        return 0


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
