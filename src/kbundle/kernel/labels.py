"""The labels on kernel containers, and what they tell `kbundle gc`: is the launcher still alive?

Each kernel container names the launcher that drives it (pid, start time, host) and the
launcher's parent when it started (the Jupyter server or client). A container whose
launcher is gone is a leftover; so is one whose launcher lives on but lost that parent
(orphaned: re-parented to PID 1 or a subreaper), since nobody can reach its kernel. The keys are the image contract's
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
# Not in kbundle 0.1, so no legacy key. Defined here, beside the reader that uses it.
LABEL_LAUNCHER_PPID = contract.LABEL_LAUNCHER_PPID
KERNEL_FILTERS = [f"{contract.LABEL_KERNEL}=1", f"{contract.LEGACY_LABEL_KERNEL}=1"]


def container_labels(kernel_name: str, pid: int, ppid: Optional[int] = None) -> dict[str, str]:
    labels = {
        contract.LABEL_KERNEL: "1",
        contract.LABEL_KERNEL_NAME: kernel_name,
        contract.LABEL_LAUNCHER_PID: str(pid),
        contract.LABEL_LAUNCHER_START: process_start(pid),
        contract.LABEL_LAUNCHER_HOST: socket.gethostname(),
    }
    if ppid is not None:
        labels[LABEL_LAUNCHER_PPID] = str(ppid)
    return labels


def read(labels: dict[str, str], key: str) -> str:
    """A kernel label under today's key, or the legacy one ("" when neither is there)."""
    return labels.get(key) or labels.get(_KEYS.get(key, key)) or ""


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" where /proc is missing).

    Together with the pid it tells a live launcher from a later process reusing its pid.
    """
    return _stat_field(pid, 19)


def process_parent(pid: int) -> str:
    """The process's parent pid as /proc says now ("" where /proc is missing)."""
    return _stat_field(pid, 1)


def _stat_field(pid: int, index: int) -> str:
    """Field `index` of /proc/PID/stat counted from the state (field 3), "" when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[index] if len(fields) > index else ""


def orphaned(recorded_parent: str, current_parent: str) -> bool:
    """Whether a launcher lost the parent it started with (pure; "" means unknown).

    Only a change counts: a launcher started by PID 1 on purpose (a service) is not orphaned,
    and one whose parent died was re-parented to PID 1 or to a subreaper, either way another pid."""
    if not recorded_parent or not current_parent:
        return False  # kbundle 0.1's labels, or no /proc: we cannot tell, so we keep it
    return recorded_parent != current_parent


def launcher_orphaned(labels: dict[str, str], host: str) -> bool:
    """Whether the container's launcher lives on this host but lost its parent (its kernel is unreachable)."""
    if launcher_alive(labels, host) is not True:
        return False
    pid = read(labels, contract.LABEL_LAUNCHER_PID)
    return orphaned(labels.get(LABEL_LAUNCHER_PPID, ""), process_parent(int(pid)))


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
