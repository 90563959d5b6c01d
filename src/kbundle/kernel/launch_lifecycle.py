"""One lifecycle for kbundle's kernel launchers, local (kernel/launcher.py) and Slurm (kernel/slurm.py).

Both block the same signals before anything else and take them synchronously: SIGINT
interrupts the kernel, SIGTERM/SIGHUP stop it (twice: no more grace), SIGUSR1 wakes the
signal loop when the kernel ended, and PARENT_DEATH_SIGNAL says the parent (the Jupyter
server or client) may be gone. That signal alone proves nothing (Linux sends it when the
*thread* that forked us ends), so only a changed parent counts (`parent_lost`).
"""

from __future__ import annotations

import signal
import sys
from typing import Optional

from kbundle.kernel.labels import orphaned

STOP_GRACE_S = 1
PARENT_POLL_S = 1.0  # how often the watcher thread checks that the parent still lives
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_DEATH_SIGNAL = signal.SIGUSR2
HANDLED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, PARENT_DEATH_SIGNAL})


def watch_parent_death() -> bool:
    """Ask Linux for PARENT_DEATH_SIGNAL when our parent ends (False where that is not possible)."""
    if not sys.platform.startswith("linux"):
        return False  # the getppid() poll alone covers other systems
    try:
        import ctypes  # here: only Linux needs it, and every kernel start pays for imports

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):  # no ctypes (a stripped or unreadable stdlib): poll only
        return False


def parent_lost(started_with: Optional[int], now: int) -> bool:
    """Whether the parent the launcher started with is gone (pure): we were re-parented."""
    return started_with is not None and orphaned(str(started_with), str(now))


def die_with_parent(sig: int = PARENT_DEATH_SIGNAL) -> bool:
    """Ask Linux for `sig` when this process's parent ends (in a child before exec: srun dies with us)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):
        return False
