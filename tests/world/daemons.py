"""How the world's daemons (the registry, munged, slurmctld, slurmd) are started, found and stopped.

Each daemon is started in its own session with its stdio in a log file, so it outlives
``up``, and is recognised later by a path of this world on its command line, so a pid file
left stale by a reboot never names someone else's process.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def spawn(argv: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `argv` detached from this process: its own session, stdin closed, output to `log_path`."""
    with open(log_path, "ab") as logf:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True
        )


def running(pid: int, marker: str) -> bool:
    """Whether `pid` is a live process whose command line mentions `marker` (zombies have none)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


def terminate(pid: int, marker: str, timeout: float = 10) -> None:
    """SIGTERM `pid` if it is still ours, SIGKILL it after `timeout`, and reap it if it is our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        if not running(pid, marker):
            break
        os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while running(pid, marker) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`: `.ci/run` and a test session may bring the world up together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens on it, else any free port on 127.0.0.1."""
    for port in (preferred, 0):
        with socket.socket() as s:
            # As the daemons bind: a restarted daemon's old connections in TIME_WAIT do not
            # hold its port, a listener (on any address) still does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise SystemExit("error: no free port on 127.0.0.1")
