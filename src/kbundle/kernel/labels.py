"""The labels on kernel containers, and what they tell `kbundle gc`: is the launcher still alive?

Each kernel container names the launcher that drives it (pid, start time, host). A
container whose launcher is gone is a leftover. The keys are the image contract's
(kbundle/contract.py); containers started by kbundle 0.1 carry the legacy `kbundle.` keys.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

from kbundle import contract

_KEYS = {  # today's key -> the legacy one
    contract.LABEL_KERNEL: contract.LEGACY_LABEL_KERNEL,
    contract.LABEL_KERNEL_NAME: contract.LEGACY_LABEL_KERNEL_NAME,
    contract.LABEL_LAUNCHER_PID: contract.LEGACY_LABEL_LAUNCHER_PID,
    contract.LABEL_LAUNCHER_START: contract.LEGACY_LABEL_LAUNCHER_START,
    contract.LABEL_LAUNCHER_HOST: contract.LEGACY_LABEL_LAUNCHER_HOST,
}
KERNEL_FILTERS = [f"{contract.LABEL_KERNEL}=1", f"{contract.LEGACY_LABEL_KERNEL}=1"]


def container_labels(kernel_name: str, pid: int) -> dict[str, str]:
    return {
        contract.LABEL_KERNEL: "1",
        contract.LABEL_KERNEL_NAME: kernel_name,
        contract.LABEL_LAUNCHER_PID: str(pid),
        contract.LABEL_LAUNCHER_START: process_start(pid),
        contract.LABEL_LAUNCHER_HOST: socket.gethostname(),
    }


def read(labels: dict[str, str], key: str) -> str:
    """A kernel label under today's key, or the legacy one ("" when neither is there)."""
    return labels.get(key) or labels.get(_KEYS.get(key, key)) or ""


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc is missing).

    Together with the pid it tells a live launcher from a later process reusing its pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def launcher_alive(labels: dict[str, str], host: str) -> Optional[bool]:
    """Whether the container's launcher still runs; None when it ran on another host."""
    if read(labels, contract.LABEL_LAUNCHER_HOST) != host:
        return None
    try:
        pid = int(read(labels, contract.LABEL_LAUNCHER_PID))
    except ValueError:
        return False
    start = read(labels, contract.LABEL_LAUNCHER_START)
    if start:
        return process_start(pid) == start
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
