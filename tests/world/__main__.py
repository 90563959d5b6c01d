"""``python -m tests.world up|down``, from the repository's root: see the package's docstring."""

from __future__ import annotations

import json
import os
import sys

from . import down, up
from .common import WorldPythonsError


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.world up|down", file=sys.stderr)
        return 2
    if argv[0] == "down":
        down()
        return 0
    try:
        info = up()
    except WorldPythonsError as exc:  # a Python asked for and not found: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # rattler can crash an interpreter at exit
