"""The kernel's stderr during `run --execute`: known machine noise folded into one line, the rest passed on.

A framework that looks for a GPU on a machine without one prints a page of dlerrors and
driver diagnostics (TensorFlow 2.3: `Could not load dynamic library 'libcudart.so.10.1'`,
`failed call to cuInit`, ...). The recipient already heard from the preflight that the kernel
runs on CPU, so each group of such lines (data/kernel_noise.yaml) becomes its one summary line,
said once per run; every other line of the kernel's stderr passes through unchanged.

    NoiseFilter(table).line(text) -> what to print for one line ('' for nothing)
    folded_stderr(target) -> a context manager yielding the fd to give the kernel as its stderr
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional, TextIO

from kbundle.facts import KernelNoise, kernel_noise

# How long the kernel's last words may take to arrive after it was shut down: its launcher
# exits with the kernel, which closes the pipe; a stray process still holding it must not hang run.
DRAIN_S = 5.0
_CHUNK = 65536


class NoiseFilter:
    """Line by line: a noise line becomes its group's summary the first time, nothing after."""

    def __init__(self, table: KernelNoise):
        self._table = table
        self._said: set[str] = set()

    def line(self, text: str) -> str:
        """What to print for one line of the kernel's stderr (with its newline, if it had one)."""
        summary = self._table.summary_for(text)
        if summary is None:
            return text
        if summary in self._said:
            return ""
        self._said.add(summary)
        return summary + "\n"


def pump(fd: int, out: TextIO, noise: NoiseFilter) -> None:
    """Copy what arrives on `fd` to `out` through `noise`, whole lines at a time, until EOF."""
    pending = b""
    with os.fdopen(fd, "rb", buffering=0) as source:
        while chunk := source.read(_CHUNK):
            *lines, pending = (pending + chunk).split(b"\n")
            _write(out, "".join(noise.line(_text(line) + "\n") for line in lines))
    if pending:  # a last line without its newline
        _write(out, noise.line(_text(pending)))


def _text(raw: bytes) -> str:
    # The kernel's stderr is text; a stray byte must not end the copy.
    return raw.decode("utf-8", errors="replace")


def _write(out: TextIO, text: str) -> None:
    if not text:
        return
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):  # our own stderr is gone (closed, a broken pipe): keep draining
        pass


@contextmanager
def folded_stderr(target: Optional[TextIO] = None, table: Optional[KernelNoise] = None) -> Iterator[int]:
    """A pipe's write end to hand the kernel as its stderr; a thread copies it to `target`
    (this process's stderr by default), noise folded. On exit it waits up to DRAIN_S for the
    kernel's last lines."""
    out = target if target is not None else sys.stderr
    read_fd, write_fd = os.pipe()
    noise = NoiseFilter(table if table is not None else kernel_noise())
    thread = threading.Thread(target=pump, args=(read_fd, out, noise), name="kbundle-kernel-stderr", daemon=True)
    thread.start()
    try:
        yield write_fd
    finally:
        os.close(write_fd)  # the kernel's copy keeps the pipe open until it exits
        thread.join(DRAIN_S)
