"""Requirements files read by pip's own rules (pip's `req_file.py`, documented at
https://pip.pypa.io/en/stable/reference/requirements-file-format/):

- a line ending in `\\` continues on the next one; `#` after whitespace (or at the start) begins a
  comment; `${VAR}` is the environment variable's value;
- a requirement line is the requirement, then its options (`--hash=sha256:…`, which become the
  pin's hashes; `--config-settings`, `--global-option`);
- `-r FILE` and `-c FILE` are read relative to the file that names them; a constraint narrows the
  requirement of the same name (an unpinned line takes the constraint's exact version) and never
  adds a package; `-e` lines are requirements;
- `--index-url`, `--extra-index-url` and `--find-links` are the bundle's indexes; every other
  option is pip's business on the sender's machine and is left out with a note.

A requirement whose environment marker is false in the image keeps its marker (normalisation
drops it with that reason) but loses its hashes, so the reason reads as one short line.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.pipenv import Reading, marker_holds
from kbundle.pack.textfiles import read_text, write_environment_yml
from kbundle.specs import PipPin, parse_pip_line

_COMMENT = re.compile(r"(^|\s+)#.*$")
_ENV_VAR = re.compile(r"\$\{([A-Z0-9_]+)\}")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)

# Options that take a value, by every spelling pip accepts in a requirements file.
_VALUED = {
    "-r": "requirement",
    "--requirement": "requirement",
    "-c": "constraint",
    "--constraint": "constraint",
    "-e": "editable",
    "--editable": "editable",
    "-i": "index_url",
    "--index-url": "index_url",
    "--extra-index-url": "extra_index_url",
    "-f": "find_links",
    "--find-links": "find_links",
    "--trusted-host": "trusted_host",
    "--use-feature": "use_feature",
    "--only-binary": "only_binary",
    "--no-binary": "no_binary",
    "--hash": "hash",
    "--config-settings": "config_settings",
    "-C": "config_settings",
    "--global-option": "global_option",
    "--progress-bar": "progress_bar",
}
_INDEX = {"index_url": "--index-url", "extra_index_url": "--extra-index-url", "find_links": "--find-links"}
# Options that change how pip works here, not what the environment is: left out without a word.
_QUIET = {"trusted_host", "progress_bar", "--pre", "--prefer-binary", "--require-hashes", "--no-cache-dir"}


@dataclass
class _Line:
    file: Path
    number: int
    requirement: str | None  # the requirement part, as written
    options: list[tuple[str, str]] = field(default_factory=list)  # (option, value) in order

    def where(self) -> str:
        return f"{self.file.name} line {self.number}"


def read_requirements_file(path: Path, python: str | None, text: str | None = None) -> Reading:
    """Every requirement `path` and the files it names give, in pip's order, for Python `python`.
    `text`: the file's lines when they are not on disk (conda's pip: section, beside its file)."""
    reading = Reading()
    pins: list[tuple[PipPin, str]] = []
    constraints: dict[str, list[PipPin]] = {}
    _read(path.resolve(), False, set(), pins, constraints, reading, text)
    if not pins:
        raise UsageError(f"{path.name} lists no requirements")
    reading.pins = [_constrained(pin, where, constraints, python, reading.notes) for pin, where in pins]
    reading.pins = [_without_hashes_if_false(pin, python) for pin in reading.pins]
    return reading


_NESTED = re.compile(r"^\s*(?:-r|--requirement|-c|--constraint)(?:\s*=\s*|\s+|(?=[^-\s]))(\S+)")


def expand_pip_section(env, lines: list[str], yml: Path):
    """An environment.yml whose pip: section names requirement or constraint files (`-r
    requirements.txt`), read as conda runs it: a requirements file beside the environment.yml, by
    pip's rules. When a named file is not there, the env is left as it was (normalisation says so)."""
    named = [m.group(1) for m in (_NESTED.match(line) for line in lines) if m]
    if not named or not all(_beside(yml, name).is_file() for name in named):
        return env
    python = next((s.version for s in env.conda if s.name == "python" and s.version), None)
    reading = read_requirements_file(yml.parent / f"{yml.name} (pip: section)", python, "\n".join(lines))
    env.pip = reading.pins
    env.notes = [*env.notes, *reading.notes]
    pip = reading.options + [p.text for p in reading.pins]
    header = f"read by kbundle from {yml.name}, its pip: section's files expanded"
    env.source_text = write_environment_yml(
        header, env.name or yml.stem, env.channels, [s.raw for s in env.conda], pip, env.prefix
    )
    return env


def _beside(yml: Path, name: str) -> Path:
    target = Path(name.removeprefix("file://"))
    return target if target.is_absolute() else yml.parent / target


def logical_lines(text: str):
    """(line number, line) after pip's continuation, comment and `${VAR}` rules; blank lines go."""
    joined: list[str] = []
    first = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.endswith("\\") or _COMMENT.match(line):
            if _COMMENT.match(line):
                line = " " + line  # a comment stays a comment once joined
            if joined:
                joined.append(line)
                yield from _cleaned(first, "".join(joined))
                joined = []
            else:
                yield from _cleaned(number, line)
        else:
            if not joined:
                first = number
            joined.append(line.strip("\\"))
    if joined:
        yield from _cleaned(first, "".join(joined))


def _cleaned(number: int, line: str):
    line = _COMMENT.sub("", line).strip()
    if line:
        yield number, _ENV_VAR.sub(lambda m: os.environ.get(m.group(1), m.group(0)), line)


def _parse_line(path: Path, number: int, line: str) -> _Line:
    # pip's break_args_options: the requirement runs up to the first word that starts with `-`.
    words = line.split(" ")
    head: list[str] = []
    for word in words:
        if word.startswith("-"):
            break
        head.append(word)
    rest = " ".join(words[len(head) :])
    try:
        tokens = shlex.split(rest)
    except ValueError:
        raise UsageError(f"{path.name} line {number}: cannot read the options {rest!r}") from None
    parsed = _Line(path, number, " ".join(head).strip() or None)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if not token.startswith("--") and token[:2] in _VALUED and len(token) > 2:
            name, eq, value = token[:2], "=", token[2:]  # `-rbase.txt`, `-ihttps://…`
        key = _VALUED.get(name)
        if key is not None and not eq:
            if i + 1 >= len(tokens):
                raise UsageError(f"{path.name} line {number}: {name} needs a value")
            i += 1
            value = tokens[i]
        parsed.options.append((key or name, value))
        i += 1
    return parsed


def _read(
    path: Path, constraint: bool, seen: set, pins: list, constraints: dict, reading: Reading, text: str | None = None
) -> None:
    if (path, constraint) in seen:
        return
    seen.add((path, constraint))
    for number, line in logical_lines(read_text(path) if text is None else text):
        parsed = _parse_line(path, number, line)
        if parsed.requirement is not None:
            _requirement(parsed, parsed.requirement, constraint, pins, constraints)
            continue
        for key, value in parsed.options:
            if key in ("requirement", "constraint"):
                _nested(parsed, key, value, pins, constraints, seen, reading)
            elif key == "editable":
                _requirement(parsed, f"-e {value}", constraint, pins, constraints)
            elif key in _INDEX:
                reading.add_option(_INDEX[key], value)
            elif key not in _QUIET:
                flag = key if key.startswith("-") else "--" + key.replace("_", "-")
                shown = f"{flag} {value}".strip()
                reading.notes.append(f"{parsed.where()}: `{shown}` is pip's option on the sender's machine: left out")


def _nested(parsed: _Line, key: str, value: str, pins, constraints, seen, reading: Reading) -> None:
    flag = "-r" if key == "requirement" else "-c"
    if _SCHEME.match(value) and not value.lower().startswith("file:"):
        raise UsageError(
            f"{parsed.where()}: `{flag} {value}` names a file on the network; save it beside and name that"
        )
    target = Path(value.removeprefix("file://")) if value.lower().startswith("file:") else Path(value)
    if not target.is_absolute():
        target = parsed.file.parent / target
    if not target.is_file():
        raise UsageError(f"{parsed.where()}: `{flag} {value}`: there is no file {target}")
    reading.notes.append(f"{parsed.where()}: read {'constraints' if flag == '-c' else 'requirements'} from {value}")
    _read(target.resolve(), key == "constraint", seen, pins, constraints, reading)


def _requirement(parsed: _Line, text: str, constraint: bool, pins: list, constraints: dict) -> None:
    hashes = [value for key, value in parsed.options if key == "hash"]
    if text.startswith("-e ") and "--hash" in text:  # `-e` values never carry hashes
        hashes = []
    line = text + "".join(f" --hash={h}" for h in hashes)
    try:
        pin = parse_pip_line(line)
    except UsageError as exc:
        raise UsageError(f"{parsed.where()}: {exc}") from None
    if pin is None:
        return
    if constraint:
        constraints.setdefault(pin.name, []).append(pin)
    else:
        pins.append((pin, parsed.where()))


def _constrained(pin: PipPin, where: str, constraints: dict, python: str | None, notes: list[str]) -> PipPin:
    """The pin as pip reads it under the constraints of the same name: an exact version the
    constraint names replaces a range or a bare name it allows; other constraints join the range."""
    found = [c for c in constraints.get(pin.name, ()) if c.requirement is not None]
    found = [c for c in found if marker_holds(c.requirement.marker, python)]
    req = pin.requirement
    if not found or req is None or req.url or pin.local:
        return pin
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    spec = req.specifier
    hashes = pin.hashes
    for c in found:
        if c.requirement.url:
            notes.append(f"{where}: {pin.name} comes from {c.requirement.url}, as its constraint says")
            return parse_pip_line(f"{req.name}{extras} @ {c.requirement.url}{marker}")
        spec &= c.requirement.specifier
        hashes = hashes or c.hashes
    exact = next((c.version for c in found if c.version and spec.contains(c.version, prereleases=True)), None)
    body = f"{req.name}{extras}=={exact}" if exact else f"{req.name}{extras}{spec}"
    if body == f"{req.name}{extras}{req.specifier}" and hashes == pin.hashes:
        return pin
    if exact and pin.version and pin.version != exact:
        notes.append(f"{where}: {pin.name}=={pin.version} conflicts with its constraint =={exact}; kept as written")
        return pin
    new = parse_pip_line(body + marker + "".join(f" --hash={h}" for h in hashes))
    notes.append(f"{where}: `{req}` is `{new.requirement}` under its constraint")
    return new


def _without_hashes_if_false(pin: PipPin, python: str | None) -> PipPin:
    """A pin whose marker is false in the image is dropped by normalisation, with that reason;
    without its hashes, so that the reason is one short line."""
    req = pin.requirement
    if not pin.hashes or req is None or req.marker is None or marker_holds(req.marker, python):
        return pin
    return parse_pip_line(pin.spec)
