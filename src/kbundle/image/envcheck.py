"""After pip: the environment as its users will see it, conda and pip together.

Two checks, both named after what they guard:

* `pip check` (run by the env's own pip: in the install's sandbox for an image, on the host
  for `run --native`; both judged here by `verdict`) reads every installed
  distribution's requirements. A requirement broken where a pip package stands on either side
  is an error naming both sides: kbundle's pip step did that. One broken among conda's own
  packages only is a warning: the conda side came that way from its solve.
* conda's records (`conda-meta/*.json`) list each package's files. A file pip removed or
  overwrote means pip replaced part of a conda package: said as a warning naming the conda
  package and the pip distribution, so an image never differs from its records silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kbundle.display import safe
from kbundle.errors import KbundleError
from kbundle.specs import canonical

PIP_CHECK = ["-m", "pip", "check", "--disable-pip-version-check", "--no-input"]

# pip check's two kinds of line (pip 9 to 26).
_HAS = re.compile(r"^(\S+) (\S+) has requirement (.+?), but you have (\S+) (\S+?)\.?$")
_REQUIRES = re.compile(r"^(\S+) (\S+) requires (\S+?), which is not installed\.?$")


@dataclass(frozen=True)
class Problem:
    """One broken requirement: `owner` needs `needed` (`requirement`); `found` is what is there."""

    owner: str
    requirement: str
    needed: str
    found: str | None

    def words(self, sides: dict[str, str]) -> str:
        have = f"{self.found} is installed" if self.found else "it is not installed"
        owner, needed = canonical(self.owner), canonical(self.needed)
        return f"{sides.get(owner, 'conda')}'s {self.owner} needs {self.requirement}, but {have}" + (
            f" (from {sides.get(needed, 'conda')})" if self.found else ""
        )


def pip_names(lines: Iterable[str]) -> set[str]:
    """The distributions an exact resolution (`name==1.0 --hash=…`, one per line) installs, canonical."""
    return {canonical(re.split(r"[=@\s]", line, maxsplit=1)[0]) for line in lines}


def verdict(pip_check_output: str, prefix: Path, lines: Iterable[str]) -> tuple[str, ...]:
    """The environment at `prefix` after pip installed the resolution `lines`, judged from `pip check`'s
    output and conda's records: a requirement pip broke is one KbundleError; the rest are warnings."""
    names = pip_names(lines)
    errors, warnings = judge(parse_pip_check(pip_check_output), names)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise KbundleError(f"the pip: section broke the environment: {safe(errors[0])}{more} (pip check)")
    return tuple(warnings + conda_records(prefix, names))


def parse_pip_check(output: str) -> list[Problem]:
    problems = []
    for line in output.splitlines():
        line = line.strip()
        has = _HAS.match(line)
        if has:
            owner, _v, requirement, name, version = has.groups()
            problems.append(Problem(owner, requirement, name, f"{name} {version}"))
            continue
        requires = _REQUIRES.match(line)
        if requires:
            owner, _v, requirement = requires.groups()
            needed = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
            problems.append(Problem(owner, requirement, needed, None))
    return problems


def judge(problems: Iterable[Problem], pip_names: set[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings): broken where pip installed either side, or among conda's own packages."""
    sides = {name: "pip" for name in pip_names}
    errors, warnings = [], []
    for problem in problems:
        words = problem.words(sides)
        if canonical(problem.owner) in pip_names or canonical(problem.needed) in pip_names:
            errors.append(words)
        else:
            warnings.append(f"{words} (the conda side as solved; pip did not touch it)")
    return errors, warnings


def conda_records(prefix: Path, pip_names: set[str]) -> list[str]:
    """A warning for each conda package with files pip removed or replaced, naming both sides."""
    owners = _pip_owned_files(prefix, pip_names)
    root = os.fspath(prefix)
    found = []
    for record_path in sorted((prefix / "conda-meta").glob("*.json")):
        record = _read(record_path)
        if record is None:
            continue
        files = [f for f in record.get("files") or [] if isinstance(f, str)]
        # Plain strings: tens of thousands of files, and a Path per file costs more than its lstat.
        hit = [f for f in files if f in owners or not os.path.lexists(os.path.join(root, f))]
        if hit:
            by = sorted({owners.get(f, "pip") for f in hit})
            found.append(
                f"pip's {', '.join(by)} replaced {len(hit)} file(s) of conda's {record.get('name')} "
                f"{record.get('version')} (e.g. {hit[0]}): as pip did on the sender's machine"
            )
    return found


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pip_owned_files(prefix: Path, pip_names: set[str]) -> dict[str, str]:
    """Prefix-relative path -> the pip distribution whose RECORD lists it."""
    owned: dict[str, str] = {}
    for site in prefix.glob("lib/python3*/site-packages"):
        for info in site.glob("*.dist-info"):
            name = canonical(info.name.removesuffix(".dist-info").rsplit("-", 1)[0])
            if name not in pip_names or not (info / "INSTALLER").is_file():
                continue
            if (info / "INSTALLER").read_text(encoding="utf-8", errors="replace").strip() != "pip":
                continue
            for line in (info / "RECORD").read_text(encoding="utf-8", errors="replace").splitlines():
                rel = line.rsplit(",", 2)[0]
                path = os.path.normpath(os.path.join(site.relative_to(prefix).as_posix(), rel))
                owned[path] = name
    return owned
