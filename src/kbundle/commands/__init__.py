"""CLI command modules, one per stage of the flow: pack → bundle → build/run → kernel."""

from __future__ import annotations

import importlib

# Modules are listed here once they exist; a missing one is skipped so that
# stages can land one at a time.
_MODULES = ("pack", "run", "kernel")


def load_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
