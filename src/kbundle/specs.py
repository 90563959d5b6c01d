"""Conda specs and pip requirements as typed records, and the one parser for each.

Both stages read them: pack from the sender's environment file or prefix, the image stage
from a bundle's manifest (pip pins to fetch as wheels). Text is made from a record only
where a file is written (`.text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kbundle.errors import UsageError

if TYPE_CHECKING:
    from packaging.requirements import Requirement


@dataclass(frozen=True)
class CondaSpec:
    """One conda dependency: as the sender wrote it (`raw`) and in parts, so that normalising
    changes fields, not text. `text` is its form in environment.yml, the manifest and the solve."""

    raw: str
    name: str
    channel: str | None = None
    version: str | None = None  # an exact version from `=ver` / `==ver`
    build: str | None = None
    constraint: str | None = None  # any other version constraint, kept verbatim (`>=1.2`)

    @property
    def text(self) -> str:
        head = f"{self.channel}::{self.name}" if self.channel else self.name
        if self.constraint:
            # `numpy>=1.2` stays glued; a MatchSpec word such as `1.2 py_0` needs its space.
            return head + (self.constraint if self.constraint[0] in "<>=!~" else " " + self.constraint)
        if self.build:
            return f"{head}={self.version or '*'}={self.build}"
        return f"{head}={self.version}" if self.version else head


@dataclass(frozen=True)
class PipPin:
    """One pip requirement. `requirement` is packaging's reading of it; None for a local path
    (dropped by normalisation) or a line packaging cannot read (kept as written)."""

    raw: str
    name: str  # canonical (lower case, `-`)
    version: str | None  # the exact version of `name==version`
    local: bool = False  # a path or editable install on the sender's machine
    requirement: Requirement | None = field(default=None, compare=False, repr=False)

    @property
    def exact(self) -> bool:
        """`name==version`: what kbundle can fetch as a wheel."""
        return self.version is not None and not self.local

    @property
    def text(self) -> str:
        """Its line in environment.yml's pip: section, the manifest and requirements.txt."""
        return str(self.requirement) if self.requirement is not None else self.raw


_NAME = re.compile(r"^\s*(?:(?P<channel>[^\s:]+)::)?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]*)(?P<rest>.*)$")
_PIP_NAME = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(raw: str, what: str) -> str:
    # Specs end up in the Dockerfile's comments and labels: a newline must not sneak in.
    text = raw.strip()
    if _CONTROL.search(text):
        raise UsageError(f"the {what} {text.splitlines()[0]!r}... spans several lines or has control characters")
    return text


def parse_conda_spec(raw: str) -> CondaSpec:
    """Split an export line like `numpy=1.19.2=py37hadc3359_0` (or `numpy >=1.2`)."""
    text = _one_line(raw, "conda dependency")
    match = _NAME.match(text)
    if not match:
        raise UsageError(f"cannot read the conda dependency {raw!r}")
    name, rest, channel = match["name"], match["rest"].strip(), match["channel"]
    spaced = match["rest"][:1].isspace()
    version = build = constraint = None
    if spaced:
        # `python 3.8`, `numpy 1.2 py_0` or `numpy >=1.20`: space-separated MatchSpec forms.
        pieces = rest.split()
        if len(pieces) == 1 and re.match(r"^[\d.]+$", pieces[0]):
            version = pieces[0]
        elif len(pieces) == 2 and re.match(r"^[\d.]+$", pieces[0]):
            version, build = pieces
        else:
            constraint = rest
    elif rest.startswith("==") and not re.search(r"[<>!,|*]", rest[2:]):
        version = rest[2:].strip() or None
    elif rest.startswith("=") and not rest.startswith("=="):
        parts = rest[1:].split("=")
        if len(parts) <= 2 and not re.search(r"[<>!,| ]", parts[0]):
            version = parts[0] or None
            build = parts[1] if len(parts) == 2 and parts[1] else None
        else:
            constraint = rest
    elif rest:
        constraint = rest
    return CondaSpec(raw=text, name=name.lower(), channel=channel, version=version, build=build, constraint=constraint)


def _is_local(text: str) -> bool:
    """A path or editable install on the sender's machine: nothing the recipient can fetch."""
    return (
        text.startswith(("-e ", "--editable", "/", ".", "\\"))
        or "file:" in text.lower()
        or re.match(r"^[a-zA-Z]:[\\/]", text) is not None
    )


def _local_pin(text: str) -> PipPin:
    name = text.split("#egg=")[-1] if "#egg=" in text else text
    return PipPin(raw=text, name=canonical(re.split(r"[\s@=<>]", name.strip())[0] or name), version=None, local=True)


def _exact_version(req: Requirement) -> str | None:
    """The version of `name==version` (or `===`); None for ranges, wildcards, URLs and several clauses."""
    specs = list(req.specifier)
    if req.url or len(specs) != 1 or specs[0].operator not in ("==", "===") or specs[0].version.endswith(".*"):
        return None
    return specs[0].version


def parse_pip_line(raw: str) -> PipPin | None:
    """The one reader of pip requirements: a line of a pip: section, requirements.txt or a bundle's manifest.

    None for blank lines, comments and options (--index-url: where wheels come from is the
    recipient's business)."""
    from packaging.requirements import InvalidRequirement, Requirement

    text = _one_line(raw, "pip requirement")
    if not text or text.startswith("#"):
        return None
    if _is_local(text):
        return _local_pin(text)
    if text.startswith("-"):
        return None
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return _unreadable_pin(raw, text)
    return PipPin(raw=text, name=canonical(req.name), version=_exact_version(req), requirement=req)


def _unreadable_pin(raw: str, text: str) -> PipPin:
    # Not PEP 508 (a VCS URL, a trailing pip option): keep it as written, not exact, so that
    # the recipient's wheel fetch names it rather than pack guessing at it.
    match = _PIP_NAME.match(text)
    if not match:
        raise UsageError(f"cannot read the pip requirement {raw!r}")
    return PipPin(raw=text, name=canonical(match["name"]), version=None)
