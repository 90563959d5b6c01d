"""Where kbundle's shipped files (templates, compatibility data) live, and how tables are read.

In a wheel, `templates/` is force-included as `kbundle/templates`; in an editable
checkout it stays at the repository's top, two levels above this file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent


def templates_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "templates", _PACKAGE_DIR.parent.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("kbundle's templates are missing from this installation")


def data_dir() -> Path:
    return _PACKAGE_DIR / "data"


def yaml_loader():
    """libyaml's safe loader when present: ten times faster than the pure-Python one."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_dumper():
    import yaml

    return getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@cache
def load_data(name: str) -> dict[str, Any]:
    """One compatibility table from kbundle/data (`name` without `.yaml`), read once."""
    import yaml

    with open(data_dir() / f"{name}.yaml", encoding="utf-8") as fh:
        return yaml.load(fh, Loader=yaml_loader())
