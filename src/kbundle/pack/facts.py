"""The pack stage's compatibility tables (kbundle/data, each naming its source) and version helpers."""

from __future__ import annotations

from typing import Any

from kbundle.resources import load_data


def frameworks() -> dict[str, Any]:
    return load_data("frameworks")


def base_tags() -> dict[str, Any]:
    return load_data("base_tags")


def normalise_facts() -> dict[str, Any]:
    return load_data("normalise")


def version_key(version: str) -> tuple[int, ...]:
    """'11.8' -> (11, 8); non-numeric parts count as 0, so odd strings still sort."""
    parts = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def major_minor(version: str | None) -> str | None:
    if not version:
        return None
    parts = version.split(".")
    digits = [p for p in parts[:2] if p.isdigit()]
    if len(digits) == 2:
        return ".".join(digits)
    return digits[0] if digits else None


def lookup_prefix(table: dict[str, Any], version: str | None) -> Any:
    """The entry whose key is the longest dotted prefix of `version` ('2.3' for 2.3.1)."""
    if not version:
        return None
    best = None
    for key in table:
        if version == key or version.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return table[best] if best is not None else None
