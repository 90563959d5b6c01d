"""A pyproject.toml as the environment (read with tomllib, requirements with packaging):

- PEP 621 `[project] dependencies`, and with `--extra NAME` its `[project.optional-dependencies]`
  NAME (or, when no extra is so named, the PEP 735 `[dependency-groups]` NAME);
- `requires-python`, checked against the Python chosen (`.python-version` beside it, --python, or
  the notebook's metadata);
- uv's settings: `[tool.uv] index-url` / `extra-index-url` / `find-links`, `[[tool.uv.index]]`, and
  `[tool.uv.sources]` (a git, URL or index source replaces the requirement's origin; a path or
  workspace member is the sender's own code).

The project's own code is not installed: its dependencies are. A pyproject.toml with
`[tool.pixi]` is pixi's manifest: pack/formats.py sends it to pack/pixilock.py.
"""

from __future__ import annotations

from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.pipenv import Hints, Reading, carried_url, choose_python, marker_holds, pip_env
from kbundle.pack.records import RawEnv
from kbundle.pack.textfiles import read_text
from kbundle.specs import canonical, parse_pip_line


def toml():
    """tomllib (Python 3.11+), or the same parser pip vendors (tomli) on Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib


def load_toml(path: Path) -> dict:
    try:
        return toml().loads(read_text(path))
    except toml().TOMLDecodeError as exc:
        raise UsageError(f"{path.name} is not valid TOML ({exc})") from None


def has_dependencies(path: Path) -> bool:
    """Whether a pyproject.toml describes an environment (PEP 621 dependencies or pixi's manifest),
    rather than only configuring tools."""
    try:
        data = toml().loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, toml().TOMLDecodeError):
        return False
    project = data.get("project") or {}
    tool = data.get("tool") or {}
    return bool(project.get("dependencies") or project.get("optional-dependencies") or "pixi" in tool)


def python_pin(folder: Path) -> tuple[str, str] | None:
    """The `.python-version` file uv and pyenv write (`3.11`, `3.11.7`, `cpython-3.11`)."""
    path = folder / ".python-version"
    try:
        first = next((ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")), "")
    except OSError:
        return None
    version = first.removeprefix("cpython-").removeprefix("python")
    parts = version.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts[:3]):
        return version, f"{path.name} beside it"
    return None


def read_pyproject(path: Path, hints: Hints) -> RawEnv:
    data = load_toml(path)
    project = data.get("project")
    if not isinstance(project, dict):
        raise UsageError(f"{path.name} has no [project] table to read dependencies from (PEP 621)")
    if "dependencies" in (project.get("dynamic") or []):
        raise UsageError(f"{path.name} declares its dependencies dynamic; pass them with -e requirements.txt")
    python, where = choose_python(hints, path.name, python_pin(path.parent), project.get("requires-python"))
    name = str(project.get("name") or path.parent.name)
    lines = project.get("dependencies") or []
    if not isinstance(lines, list):
        raise UsageError(f"{path.name}: [project] dependencies must be a list of requirements")
    lines = list(lines) + requested(data, hints.extras, path.name)
    reading = Reading()
    reading.notes.append(f"python {python}: from {where}")
    uv = (data.get("tool") or {}).get("uv") or {}
    sources = uv.get("sources") or {}
    indexes = uv_indexes(uv, reading)
    for line in lines:
        if not isinstance(line, str):
            raise UsageError(f"{path.name}: cannot read the dependency {line!r}")
        pin = _sourced(line, sources, indexes, path.parent, python, reading)
        if pin is not None:
            reading.pins.append(pin)
    if not reading.pins:
        raise UsageError(f"{path.name} lists no dependencies")
    reading.notes.append(f"{path.name}: the project {name}'s own code is not installed, only its dependencies")
    if (path.parent / "uv.lock").is_file():
        reading.notes.append(f"{path.name}: uv.lock beside it has the exact versions; pass -e uv.lock to use them")
    header = f"read by kbundle from {path.name} (Python {python})"
    return pip_env(python, reading, name=name, source_file=path.name, header=header)


def requested(data: dict, extras: tuple[str, ...], what: str) -> list:
    """The requirements `--extra` names: optional dependencies first, else dependency groups."""
    project = data.get("project") or {}
    optional = {canonical(k): v for k, v in (project.get("optional-dependencies") or {}).items()}
    groups = {canonical(k): v for k, v in (data.get("dependency-groups") or {}).items()}
    lines: list = []
    for extra in extras:
        key = canonical(extra)
        if key in optional:
            lines += optional[key]
        elif key in groups:
            lines += group(groups, key, what)
        else:
            known = ", ".join(sorted(set(optional) | set(groups))) or "none"
            raise UsageError(f"--extra {extra}: {what} has no such optional dependencies or group (it has: {known})")
    return lines


def group(groups: dict, key: str, what: str, seen: tuple = ()) -> list[str]:
    """A PEP 735 group's requirements, `{include-group = …}` followed."""
    if key in seen:
        raise UsageError(f"{what}: the dependency group {key} includes itself")
    out: list[str] = []
    for item in groups.get(key) or []:
        if isinstance(item, dict) and "include-group" in item:
            out += group(groups, canonical(str(item["include-group"])), what, (*seen, key))
        else:
            out.append(item)
    return out


def uv_indexes(uv: dict, reading: Reading) -> dict[str, str]:
    """uv's index settings as the bundle's index options; the named indexes by name."""
    named: dict[str, str] = {}
    if isinstance(uv.get("index-url"), str):
        _option(reading, "--index-url", uv["index-url"])
    for url in uv.get("extra-index-url") or []:
        _option(reading, "--extra-index-url", url)
    for url in uv.get("find-links") or []:
        _option(reading, "--find-links", url)
    for index in uv.get("index") or []:
        if not isinstance(index, dict) or not isinstance(index.get("url"), str):
            continue
        if index.get("name"):
            named[str(index["name"])] = index["url"]
        if index.get("explicit"):
            continue  # used only by the sources that name it (below)
        option = "--find-links" if index.get("format") == "flat" else "--extra-index-url"
        _option(reading, "--index-url" if index.get("default") else option, index["url"])
    return named


def _option(reading: Reading, option: str, url: str) -> None:
    clean = carried_url(str(url), f"{option}", reading.notes)
    if clean is not None:
        reading.add_option(option, clean)


def _sourced(line: str, sources: dict, indexes: dict, root: Path, python: str, reading: Reading):
    """The pin for a requirement, with its `[tool.uv.sources]` origin when it has one."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(line)
    except InvalidRequirement:
        raise UsageError(f"cannot read the dependency {line!r}") from None
    source = sources.get(req.name) or sources.get(canonical(req.name))
    if isinstance(source, list):  # several, each with a marker: the one for the image
        source = next((s for s in source if _source_applies(s, python)), None)
    if not isinstance(source, dict):
        return parse_pip_line(line)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    if "git" in source:
        ref = source.get("rev") or source.get("tag") or source.get("branch")
        url = f"git+{source['git']}" + (f"@{ref}" if ref else "")
        if source.get("subdirectory"):
            url += f"#subdirectory={source['subdirectory']}"
        return parse_pip_line(f"{req.name}{extras} @ {url}{marker}")
    if "url" in source:
        return parse_pip_line(f"{req.name}{extras} @ {source['url']}{marker}")
    if "path" in source or source.get("workspace"):
        where = (root / str(source.get("path", "."))).resolve()
        return parse_pip_line(f"{req.name}{extras} @ {where.as_uri()}{marker}")
    if "index" in source and str(source["index"]) in indexes:
        _option(reading, "--extra-index-url", indexes[str(source["index"])])
    return parse_pip_line(line)


def _source_applies(source, python: str) -> bool:
    from packaging.markers import InvalidMarker, Marker

    if not isinstance(source, dict) or not source.get("marker"):
        return isinstance(source, dict)
    try:
        return marker_holds(Marker(str(source["marker"])), python)
    except InvalidMarker:
        return True
