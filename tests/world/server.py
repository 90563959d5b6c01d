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


def _answers(state: dict, probe: str) -> bool:
    """Whether the recorded server is alive and serves `probe` (a path below its URL)."""
    try:
        os.kill(state["pid"], 0)
        with urllib.request.urlopen(f"{state['url']}{probe}", timeout=2) as resp:
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
    return serve_folder(channel, root / STATE_FILE, "noarch/repodata.json", "KBUNDLE_WORLD_PORT", DEFAULT_PORT)


def serve_folder(folder: Path, state_file: Path, probe: str, port_variable: str, default_port: int) -> str:
    """The URL of an HTTP server on 127.0.0.1 for ``folder``: the one ``state_file`` records while it
    still serves ``probe``, else a new one in its own session (on the default port when it is free),
    logging beside its state file."""
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if _answers(state, probe):
            return state["url"]
    port = _free_port(int(os.environ.get(port_variable, default_port)))
    log = state_file.with_suffix(".log")
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    state = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}/"}
    deadline = time.monotonic() + 10
    while not _answers(state, probe):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"error: the HTTP server for {folder} did not start; see {log}")
        time.sleep(0.1)
    state_file.write_text(json.dumps(state))
    return state["url"]


def stop_folder_server(state_file: Path) -> None:
    """Stop the server ``state_file`` records, if it still runs."""
    if state_file.exists():
        try:
            os.kill(json.loads(state_file.read_text())["pid"], signal.SIGTERM)
        except (ProcessLookupError, KeyError, ValueError, OSError):
            pass


def stop_server(root: Path) -> None:
    stop_folder_server(root / STATE_FILE)
