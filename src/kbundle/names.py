"""Names made from user-given or bundle-given text: one harmless slug rule for every use."""

from __future__ import annotations

import re
import unicodedata

_UNSAFE = re.compile(r"[^a-z0-9._-]+")
# Letters that NFKD does not split into a base letter and a mark (after lower-casing).
_LETTERS = str.maketrans(
    {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ħ": "h", "ı": "i"}
)


def transliterate(text: str) -> str:
    """Lower-case ASCII for Latin letters with accents and the like: `análisis ñ` -> `analisis n`,
    `Straße` -> `strasse`, `Ærø` -> `aero`. Letters with no Latin spelling are left for `slug` to drop."""
    decomposed = unicodedata.normalize("NFKD", text.lower()).translate(_LETTERS)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def slug(text: str, limit: int = 60, fallback: str = "bundle") -> str:
    """Lower-case [a-z0-9._-], starting and ending alphanumeric: a Docker repository name,
    a kernel name and a bundle name all accept it. Accented letters keep their base letter."""
    cleaned = _UNSAFE.sub("-", transliterate(text)).strip("-._")
    return cleaned[:limit].rstrip("-._") or fallback
