"""Showing text that came from a bundle (a stranger) on a person's terminal.

A bundle's name, specs, reasons or base image could carry newlines or ANSI escapes that
print fake lines, erase lines or hide the rest of a review. Every bundle-supplied string
goes through `safe` before it is printed: control characters become visible escapes.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: object, limit: int = 500) -> str:
    """`text` on one line, with control, bidi and line-separator characters shown as escapes."""
    shown = _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(text))
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def size(n: float) -> str:
    """Bytes in binary units, named as such (KiB, MiB, GiB): the one way kbundle prints a size."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
