"""Names made from user-given or bundle-given text: one harmless slug rule for every use."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def slug(text: str, limit: int = 60, fallback: str = "bundle") -> str:
    """Lower-case [a-z0-9._-], starting and ending alphanumeric: a Docker repository name,
    a kernel name and a bundle name all accept it."""
    cleaned = _UNSAFE.sub("-", text.lower()).strip("-._")
    return cleaned[:limit].rstrip("-._") or fallback
