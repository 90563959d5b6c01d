"""Where kbundle's shipped files (templates, compatibility data) live.

In a wheel, `templates/` is force-included as `kbundle/templates`; in an editable
checkout it stays at the repository's top, two levels above this file.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def templates_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "templates", _PACKAGE_DIR.parent.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("kbundle's templates are missing from this installation")


def data_dir() -> Path:
    return _PACKAGE_DIR / "data"
