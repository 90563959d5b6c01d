"""What every reader of a pip-only environment shares: which Python it is for, the marker values
of the image, and the RawEnv it becomes.

A pip-only environment (a venv, pyenv or the system Python, a requirements file, a pyproject.toml,
a uv.lock) becomes the same kind of RawEnv as a requirements.txt always did: the conda side is
just `python=X.Y` and pip (normalisation adds ipykernel when the pip side lacks it), the pip side
its pins in order. Its index options are written as the option lines of a requirements text
(`source_text`), which is where normalisation reads them from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.records import RawEnv
from kbundle.specs import PipPin, parse_conda_spec, strip_credentials

_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
PYPI = ("https://pypi.org/simple", "https://pypi.python.org/simple")


@dataclass(frozen=True)
class Hints:
    """What pack knows besides the environment's own files."""

    python: str | None = None  # --python X.Y
    notebook_python: str | None = None  # the notebook's metadata.language_info.version
    extras: tuple[str, ...] = ()  # --extra NAME: optional dependencies (or dependency groups) to add
    notebook_dir: Path | None = None


@dataclass
class Reading:
    """What a reader found: pins in order, index option lines, notes."""

    pins: list[PipPin] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # `--index-url URL`, `--extra-index-url URL`, `--find-links URL`
    notes: list[str] = field(default_factory=list)

    def add_option(self, option: str, url: str) -> None:
        line = f"{option} {url}"
        if line not in self.options:
            self.options.append(line)


def notebook_python(path: Path | None) -> str | None:
    """The notebook's `metadata.language_info.version` (`3.11.7`), when it names one."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
        version = doc["metadata"]["language_info"]["version"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return version if isinstance(version, str) and _VERSION.match(version.strip()) else None


def major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def choose_python(
    hints: Hints, what: str, own: tuple[str, str] | None = None, requires: str | None = None
) -> tuple[str, str]:
    """The Python version a pip-only environment is for, and where that came from: `--python`,
    else what the environment says itself (`own`: (version, where)), else the notebook's
    metadata. Refused when none says, or when the version is outside `requires` (requires-python)."""
    if hints.python is not None:
        if not _VERSION.match(hints.python):
            raise UsageError(f"--python must look like 3.11, not {hints.python!r}")
        version, where = hints.python, "--python"
    elif own is not None:
        version, where = major_minor(own[0]), own[1]
    elif hints.notebook_python:
        version, where = major_minor(hints.notebook_python), "the notebook's metadata (language_info)"
    else:
        raise UsageError(
            f"{what} does not say which Python it needs and the notebook's metadata does not either: pass --python X.Y"
        )
    if requires and not python_allowed(version, requires):
        raise UsageError(
            f"{what} requires Python {requires}, but {where} says {version}: pass --python X.Y for a Python it allows"
        )
    return version, where


def python_allowed(version: str, requires: str) -> bool:
    """Whether some release of Python `version` (X.Y or X.Y.Z) meets `requires` (a PEP 440 specifier)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        spec = SpecifierSet(requires)
    except InvalidSpecifier:
        return True  # not ours to refuse: pip reads it for itself
    tries = [version] if version.count(".") >= 2 else [f"{version}.0", f"{version}.99"]
    return any(spec.contains(v, prereleases=True) for v in tries)


def target_markers(python: str | None) -> dict[str, str]:
    """The values of PEP 508 markers inside every kbundle image: CPython on linux x86_64."""
    env = {
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
        "platform_release": "",
        "platform_version": "",
        "extra": "",
    }
    if python:
        full = python if python.count(".") >= 2 else f"{python}.0"
        env.update(python_version=major_minor(python), python_full_version=full, implementation_version=full)
    return env


def marker_holds(marker, python: str | None, extras: tuple[str, ...] = ("",)) -> bool:
    """Whether a packaging Marker is true inside the image (for any of `extras`, when it names one)."""
    if marker is None:
        return True
    env = target_markers(python)
    try:
        return any(marker.evaluate({**env, "extra": extra}) for extra in extras or ("",))
    except Exception:  # an undefined name: keep the line, and let pip judge it
        return True


def carried_url(url: str, what: str, notes: list[str]) -> str | None:
    """An index or find-links URL as the bundle may carry it: without credentials, and only when
    the recipient can reach it (http or https); otherwise None, said in a note."""
    clean, had = strip_credentials(url.strip())
    if not re.match(r"^https?://", clean, re.IGNORECASE):
        notes.append(f"{what} {clean} is a folder or file on this machine: not carried (the recipient cannot reach it)")
        return None
    if had:
        notes.append(f"{what} {clean}: its credentials stay here (the recipient configures their own)")
    return clean.rstrip("/") if clean.rstrip("/") in PYPI else clean


def requirements_text(header: str, options: list[str], pins: list[PipPin]) -> str:
    """A requirements.txt of what was read: the header, the index options, one pin a line."""
    lines = [f"# {header}", *options, *(p.text for p in pins)]
    return "\n".join(lines) + "\n"


def pip_env(
    python: str,
    reading: Reading,
    *,
    name: str | None,
    source_file: str,
    header: str,
    source_kind: str = "requirements",
    source_path: Path | None = None,
) -> RawEnv:
    """The RawEnv of a pip-only environment, the same kind a requirements.txt has always given."""
    return RawEnv(
        name=name,
        channels=["conda-forge"],
        conda=[parse_conda_spec(f"python={python}"), parse_conda_spec("pip")],
        pip=list(reading.pins),
        source_kind=source_kind,
        source_file=source_file,
        source_text=requirements_text(header, reading.options, reading.pins),
        notes=list(reading.notes),
        source_path=source_path,
    )
