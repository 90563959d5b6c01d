"""A kernel's Python interpreter (a venv, virtualenv, uv's .venv, pyenv, the system Python) and
the distributions installed where it imports from.

Which folders it imports from is asked of the interpreter itself, run isolated and without the
`site` module (`python -I -S`), so no `.pth` file and no package's code runs; when it cannot run
here, its `pyvenv.cfg` and `lib/pythonX.Y/site-packages` say. The distributions are then read from
files only (`*.dist-info`: METADATA, INSTALLER, direct_url.json; `*.egg-info`): nothing is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from kbundle.specs import PipPin, canonical, parse_pip_line

# The environment's own packaging tools: left out unless an installed package requires them.
TOOLING = ("pip", "setuptools", "wheel", "distribute")

_ASK = (
    "import json, sys, sysconfig\n"
    "paths = sysconfig.get_paths()\n"
    "import site\n"
    "print(json.dumps({'executable': sys.executable, 'prefix': sys.prefix, 'base_prefix': sys.base_prefix,\n"
    " 'version': '%d.%d.%d' % sys.version_info[:3], 'implementation': sys.implementation.name,\n"
    " 'site': [paths['purelib'], paths['platlib']] + site.getsitepackages(), 'user': site.getusersitepackages()}))\n"
)


@dataclass(frozen=True)
class Interpreter:
    executable: Path
    prefix: Path
    version: str  # 3.11.7
    site_dirs: tuple[Path, ...]  # where it imports distributions from, in its order
    venv: bool
    config: dict = field(default_factory=dict, compare=False)  # pyvenv.cfg

    @property
    def made_by(self) -> str:
        if "uv" in self.config:
            return "uv"
        if "virtualenv" in self.config:
            return "virtualenv"
        return "venv" if self.venv else ""


@dataclass(frozen=True)
class Dist:
    name: str  # as its metadata spells it
    version: str
    installer: str
    pin: PipPin | None
    requires: tuple[str, ...] = ()


def pyvenv_cfg(prefix: Path) -> dict | None:
    path = prefix / "pyvenv.cfg"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    config = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq:
            config[key.strip().lower()] = value.strip()
    return config


def inspect(executable: Path, cwd: Path | None = None) -> Interpreter | None:
    """The interpreter at `executable`, asked (isolated, no site) or read from its files.

    A venv is its `pyvenv.cfg` beside `bin/` (the `site` module, which is not run, is what would
    make it sys.prefix): its own site-packages, and the base's only when the config says so."""
    venv = next((p for p in (executable.parent.parent, executable.parent) if (p / "pyvenv.cfg").is_file()), None)
    asked = _ask(executable, cwd)
    if venv is not None:
        config = pyvenv_cfg(venv) or {}
        version = (asked or {}).get("version") or config.get("version_info") or config.get("version")
        if not version:
            return None
        dirs = [d for d in _lib_dirs(venv) if d.parent.name == f"python{'.'.join(version.split('.')[:2])}"]
        if config.get("include-system-site-packages", "false").lower() == "true" and asked is not None:
            dirs += [Path(p) for p in asked["site"]]
        return Interpreter(executable, venv, version, _existing(dirs), True, config)
    if asked is not None:
        dirs = [Path(p) for p in asked["site"]]
        if asked.get("user"):
            dirs.insert(0, Path(asked["user"]))  # the user's site comes before the system's
        return Interpreter(executable, Path(asked["prefix"]), asked["version"], _existing(dirs), False)
    return _from_files(executable)


def _ask(executable: Path, cwd: Path | None) -> dict | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    try:
        out = subprocess.run(
            [str(executable), "-I", "-S", "-c", _ASK],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cwd if cwd and cwd.is_dir() else None,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        data = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if not isinstance(data, dict) or data.get("implementation") != "cpython":
        return None
    return data


def _from_files(executable: Path) -> Interpreter | None:
    prefix = executable.parent.parent
    config = pyvenv_cfg(prefix)
    version = (config or {}).get("version_info") or (config or {}).get("version")
    dirs = _lib_dirs(prefix)
    if not version and dirs:
        version = dirs[0].parent.name.removeprefix("python")
    if not version or not dirs:
        return None
    return Interpreter(executable, prefix, version, tuple(dirs), config is not None, config or {})


def _lib_dirs(prefix: Path) -> list[Path]:
    return sorted(prefix.glob("lib/python3*/site-packages")) + sorted(prefix.glob("lib/python3*/dist-packages"))


def _existing(dirs: list[Path]) -> tuple[Path, ...]:
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d not in seen:
            seen.append(d)
    return tuple(seen)


# ---------------------------------------------------------------- the distributions


def distributions(site_dirs, skip=None) -> list[Dist]:
    """Every distribution installed in `site_dirs`, the first of each name winning (as imports do),
    sorted by name. `skip(dist_dir)`: leave one out (a conda package's own)."""
    found: dict[str, Dist] = {}
    for site in site_dirs:
        for meta in sorted([*Path(site).glob("*.dist-info"), *Path(site).glob("*.egg-info")]):
            if skip is not None and skip(meta):
                continue
            dist = read_dist(meta)
            if dist is not None and canonical(dist.name) not in found:
                found[canonical(dist.name)] = dist
    return sorted(found.values(), key=lambda d: canonical(d.name))


def read_dist(meta: Path) -> Dist | None:
    from kbundle.pack.prefix import installed_line

    if meta.suffix == ".dist-info":
        headers = _headers(meta / "METADATA")
    else:
        headers = _headers(meta / "PKG-INFO" if meta.is_dir() else meta)
    if headers is None or not headers.get("Name") or not headers.get("Version"):
        return None
    name, version = headers["Name"].strip(), headers["Version"].strip()
    installer = ""
    if (meta / "INSTALLER").is_file():
        installer = (meta / "INSTALLER").read_text(errors="replace").strip()
    line = installed_line(meta, name, version) if meta.suffix == ".dist-info" else f"{name}=={version}"
    try:
        pin = parse_pip_line(line)
    except Exception:  # a name pip itself would refuse: leave it out rather than fail the pack
        pin = None
    return Dist(name, version, installer, pin, tuple(headers.get_all("Requires-Dist") or ()))


def _headers(path: Path):
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return HeaderParser().parse(fh, headersonly=True)
    except OSError:
        return None


def needed_by_others(dists: list[Dist], python: str) -> set[str]:
    """The canonical names that some installed distribution requires in the image (extras aside)."""
    from packaging.requirements import InvalidRequirement, Requirement

    from kbundle.pack.pipenv import marker_holds

    needed: set[str] = set()
    for dist in dists:
        for text in dist.requires:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if marker_holds(req.marker, python):
                needed.add(canonical(req.name))
    return needed


def without_tooling(dists: list[Dist], python: str) -> tuple[list[Dist], list[Dist]]:
    """(kept, left out): the packaging tools no other installed distribution requires go."""
    needed = needed_by_others([d for d in dists if canonical(d.name) not in TOOLING], python)
    out = [d for d in dists if canonical(d.name) in TOOLING and canonical(d.name) not in needed]
    return [d for d in dists if d not in out], out
