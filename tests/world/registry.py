"""A container registry on 127.0.0.1: Debian's ``docker-registry``, kept running between calls.

Its config, storage, log and ``registry.json`` (pid and address) live in ``<world>/registry/``.
Docker treats registries on 127.0.0.0/8 as insecure, so ``docker push 127.0.0.1:PORT/x:y``
talks plain HTTP to it without any daemon setting. Deletes are enabled so tests can clean up.

It is started and recognised like every daemon of the world (``daemons.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

from .daemons import free_port, locked, running, spawn, terminate

DEFAULT_PORT = 18767
STATE_FILE = "registry.json"
START_TIMEOUT_S = 20


def registry_config(storage: Path, address: str) -> dict:
    """The registry's config (JSON is YAML): filesystem storage, deletes on, plain HTTP on `address`."""
    return {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            # Upload purging would delete half-pushed blobs of a push in progress after a restart.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": address},
    }


def _answers(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as resp:
            return resp.status == 200
    except Exception:
        return False


def _alive(state: dict, config: Path) -> bool:
    return running(state.get("pid", -1), str(config)) and _answers(state.get("address", ""))


def ensure_registry(root: Path) -> dict:
    """``{"registry": "127.0.0.1:PORT"}``: the running registry, or a new one started in its own session."""
    folder = root / "registry"
    with locked(folder / "lock"):
        return {"registry": _ensure(folder)}


def _ensure(folder: Path) -> str:
    config = folder / "config.yml"
    state_file = folder / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state and _alive(state, config):
        return state["address"]
    exe = shutil.which("docker-registry")
    if exe is None:
        raise SystemExit("error: docker-registry is not installed (Debian: apt-get install docker-registry)")
    if state:
        terminate(state.get("pid", -1), str(config))  # alive but not answering: start afresh
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port(int(os.environ.get("KBUNDLE_WORLD_REGISTRY_PORT", DEFAULT_PORT)))
    address = f"127.0.0.1:{port}"
    config.write_text(json.dumps(registry_config(folder / "storage", address), indent=2) + "\n")
    log_path = folder / "registry.log"
    proc = spawn([exe, "serve", str(config)], log_path)
    state = {"pid": proc.pid, "address": address}
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(address):
        if time.monotonic() > deadline or proc.poll() is not None:
            terminate(proc.pid, str(config))
            raise SystemExit(f"error: the registry did not answer on {address}; see {log_path}")
        time.sleep(0.1)
    state_file.write_text(json.dumps(state))
    return address


def stop_registry(root: Path) -> None:
    """Stop the world's registry and remove its storage."""
    folder = root / "registry"
    state_file = folder / STATE_FILE
    if state_file.exists():
        try:
            terminate(json.loads(state_file.read_text())["pid"], str(folder / "config.yml"))
        except (KeyError, ValueError):
            pass
    shutil.rmtree(folder, ignore_errors=True)
