"""The channel's HTTP server on 127.0.0.1, kept running between calls.

``server.json`` in the world's directory records its pid and URL; a later ``up`` reuses
a server that still answers, and starts a new one (on the same port when it is free)
otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PORT = 18765
STATE_FILE = "server.json"


def _server_alive(state: dict) -> bool:
    try:
        os.kill(state["pid"], 0)
        with urllib.request.urlopen(f"{state['url']}noarch/repodata.json", timeout=2) as resp:
            return resp.status == 200
    except Exception:
        return False


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def ensure_server(root: Path, channel: Path) -> str:
    """The URL of a server for ``channel``: the running one, or a new one started in its own session."""
    state_file = root / STATE_FILE
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _server_alive(state):
            return state["url"]
    port = _free_port(int(os.environ.get("KBUNDLE_WORLD_PORT", DEFAULT_PORT)))
    logf = open(root / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(channel)],
        stdout=logf,
        stderr=logf,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}/"}
    deadline = time.monotonic() + 10
    while not _server_alive(state):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("error: the channel's HTTP server did not start; see " + str(root / "server.log"))
        time.sleep(0.1)
    state_file.write_text(json.dumps(state))
    return state["url"]


def stop_server(root: Path) -> None:
    state_file = root / STATE_FILE
    if state_file.exists():
        try:
            os.kill(json.loads(state_file.read_text())["pid"], signal.SIGTERM)
        except (ProcessLookupError, KeyError, ValueError):
            pass
