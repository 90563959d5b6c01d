"""Child processes kbundle starts (pip, `pip index`) die with it, even when it is SIGKILLed.

A pip left behind would go on loading an index and holding files in kbundle's cache after the
user stopped kbundle. Linux's PR_SET_PDEATHSIG has the kernel kill the child when its parent
dies; a child started after its parent already died kills itself at once.
"""

from __future__ import annotations

import os


def die_with_kbundle():
    """A preexec_fn that has Linux SIGKILL the child when kbundle dies, even by SIGKILL (prctl
    PR_SET_PDEATHSIG): a pip left behind would go on loading an index, holding files in the
    cache. None where prctl is not there (the child is still killed when kbundle stops in order)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:  # in the child, between fork and exec: nothing here may take a lock
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # kbundle died before the line above: die now
            os.kill(os.getpid(), signal.SIGKILL)

    return arm
