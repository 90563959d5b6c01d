"""uv.lock (read with tomllib): the exact versions uv locked, and the sha256 of each wheel that
installs on linux x86_64 for the image's CPython, taken as they are.

uv locks one resolution for every platform; the image's share of it is what the project's roots
(`[manifest] members`, else the packages whose source is the project itself) reach through
dependencies whose markers hold on linux x86_64 for that Python, with the optional dependencies
`--extra` names and the dependency groups `uv sync` installs by default (`[tool.uv]
default-groups` in the pyproject.toml beside it; `dev` when it says nothing).

Each package becomes `name==version --hash=sha256:…` (every wheel of it that fits the image, so
pip's own choice among them is covered; an sdist-only package carries no hash, since the image
installs wheels); a git source its `name @ git+URL@commit`; a URL source its URL and hash; a path
source or the project itself a local path, which normalisation drops with its reason.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from kbundle.errors import UsageError
from kbundle.pack.pipenv import PYPI, Hints, Reading, carried_url, choose_python, marker_holds, pip_env
from kbundle.pack.pyproject import load_toml, python_pin
from kbundle.pack.records import RawEnv
from kbundle.specs import canonical, cpython_abis, parse_pip_line

_LOCAL = ("editable", "virtual", "directory", "path")


def read_uv_lock(path: Path, hints: Hints, python_full: str | None = None) -> RawEnv:
    """`python_full`: the version of the interpreter that ran the project, when a kernel said it."""
    lock = load_toml(path)
    packages = lock.get("package")
    if lock.get("version") != 1 or not isinstance(packages, list) or not all(isinstance(p, dict) for p in packages):
        raise UsageError(f"{path.name} is not a uv lock file kbundle reads (version 1 with [[package]] tables)")
    project = _pyproject(path.parent)
    own = (python_full, "the kernel's Python") if python_full else python_pin(path.parent)
    python, where = choose_python(hints, path.name, own, lock.get("requires-python"))
    full = python_full if python_full and python_full.startswith(python) else python
    roots = _roots(lock, packages)
    if not roots:
        raise UsageError(
            f"{path.name} names no project to install (no [manifest] members, no package sourced from '.')"
        )
    extras = tuple(hints.extras)
    groups = _default_groups(project)
    _check_extras(roots, extras, path.name)
    reading = Reading()
    reading.notes.append(f"python {python}: from {where}")
    chosen = _walk(packages, roots, extras, groups, full)
    if groups and any(g in (r.get("dev-dependencies") or {}) for r in roots for g in groups):
        shown = ", ".join(groups)
        reading.notes.append(f"{path.name}: with the dependency group {shown}, as `uv sync` installs it by default")
    registries: dict[str, int] = {}
    for pkg in chosen:
        pin = _pin(pkg, python, path.parent, reading, registries)
        if pin is not None:
            reading.pins.append(pin)
    _indexes(registries, reading)
    if not reading.pins:
        raise UsageError(f"{path.name} locks nothing that installs on linux x86_64 for Python {python}")
    name = str(roots[0].get("name"))
    header = f"read by kbundle from {path.name}: its linux x86_64 share for Python {python}"
    return pip_env(python, reading, name=name, source_file=path.name, header=header, source_path=path)


def _pyproject(folder: Path) -> dict:
    path = folder / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        return load_toml(path)
    except UsageError:
        return {}


def _default_groups(project: dict) -> tuple[str, ...]:
    uv = (project.get("tool") or {}).get("uv") or {}
    groups = uv.get("default-groups", ["dev"])
    if groups == "all":
        return tuple(canonical(g) for g in (project.get("dependency-groups") or {}))
    return tuple(canonical(str(g)) for g in groups) if isinstance(groups, list) else ("dev",)


def _roots(lock: dict, packages: list[dict]) -> list[dict]:
    members = {canonical(m) for m in ((lock.get("manifest") or {}).get("members") or [])}
    if members:
        return [p for p in packages if canonical(str(p.get("name"))) in members]
    return [p for p in packages if any(_table(p.get("source")).get(k) == "." for k in ("editable", "virtual"))]


def _table(value) -> dict:
    return value if isinstance(value, dict) else {}


def _check_extras(roots: list[dict], extras: tuple[str, ...], what: str) -> None:
    for extra in extras:
        key = canonical(extra)
        if not any(
            key in {canonical(k) for k in (r.get("optional-dependencies") or {})}
            or key in {canonical(k) for k in (r.get("dev-dependencies") or {})}
            for r in roots
        ):
            known = sorted(
                {canonical(k) for r in roots for k in (r.get("optional-dependencies") or {})}
                | {canonical(k) for r in roots for k in (r.get("dev-dependencies") or {})}
            )
            raise UsageError(
                f"--extra {extra}: {what} has no such optional dependencies or group (it has: {', '.join(known) or 'none'})"
            )


def _walk(packages: list[dict], roots: list[dict], extras: tuple[str, ...], groups: tuple[str, ...], python: str):
    """The packages the roots reach in the image, in the lock's order."""
    from packaging.markers import InvalidMarker, Marker

    by_name: dict[str, list[dict]] = {}
    for pkg in packages:
        by_name.setdefault(canonical(str(pkg.get("name"))), []).append(pkg)
    # uv writes the extras and groups that fork a resolution as `extra == 'extra-N-project-name'`.
    conflict = [""]
    for root in roots:
        rname = canonical(str(root.get("name")))
        conflict += [f"extra-{len(rname)}-{rname}-{canonical(e)}" for e in extras]
        conflict += [f"group-{len(rname)}-{rname}-{g}" for g in (*groups, *map(canonical, extras))]

    def holds(dep: dict) -> bool:
        text = dep.get("marker")
        if not text:
            return True
        try:
            return marker_holds(Marker(text), python, tuple(conflict))
        except InvalidMarker:
            return True

    def find(dep: dict) -> dict | None:
        found = by_name.get(canonical(str(dep.get("name"))), [])
        if len(found) > 1 and dep.get("version"):
            found = [p for p in found if p.get("version") == dep["version"]] or found
        if len(found) > 1 and dep.get("source"):
            found = [p for p in found if p.get("source") == dep["source"]] or found
        return found[0] if found else None

    reached: dict[int, set[str]] = {}
    queue: deque[tuple[dict, frozenset[str], bool]] = deque((r, frozenset(map(canonical, extras)), True) for r in roots)
    while queue:
        pkg, wanted, is_root = queue.popleft()
        if id(pkg) in reached and not (set(wanted) - reached[id(pkg)]):
            continue
        reached.setdefault(id(pkg), set()).update(wanted)
        deps = list(pkg.get("dependencies") or [])
        optional = {canonical(k): v for k, v in (pkg.get("optional-dependencies") or {}).items()}
        for extra in wanted:
            deps += optional.get(extra) or []
        if is_root:
            dev = {canonical(k): v for k, v in (pkg.get("dev-dependencies") or {}).items()}
            for name in (*groups, *wanted):
                deps += dev.get(name) or []
        for dep in deps:
            if not isinstance(dep, dict) or not holds(dep):
                continue
            target = find(dep)
            if target is not None:
                queue.append((target, frozenset(canonical(e) for e in dep.get("extra") or []), False))
    return [p for p in packages if id(p) in reached]


def _image_tags(python: str) -> set:
    from packaging import tags

    major, minor = (int(x) for x in python.split(".")[:2])
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(45, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    found = set(tags.cpython_tags((major, minor), abis=cpython_abis(python), platforms=platforms))
    return found | set(tags.compatible_tags((major, minor), f"cp{major}{minor}", platforms))


def wheel_hashes(wheels: list, python: str) -> list[str]:
    """The sha256 of every wheel that installs in the image (pip's pick among them is one of these)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    fits = _image_tags(python)
    hashes = []
    for wheel in wheels or []:
        if not isinstance(wheel, dict):
            continue
        filename = wheel.get("filename") or unquote(urlsplit(str(wheel.get("url") or wheel.get("path") or "")).path)
        try:
            _name, _version, _build, wtags = parse_wheel_filename(Path(filename).name)
        except (InvalidWheelFilename, ValueError):
            continue
        digest = wheel.get("hash")
        if wtags & fits and isinstance(digest, str) and digest.startswith("sha256:") and digest not in hashes:
            hashes.append(digest)
    return hashes


def _pin(pkg: dict, python: str, root: Path, reading: Reading, registries: dict):
    name, version = str(pkg.get("name")), pkg.get("version")
    source = _table(pkg.get("source"))
    kind = next((k for k in ("registry", "git", "url", *_LOCAL) if k in source), None)
    if kind == "virtual":
        return None  # nothing is installed for a virtual project
    if kind in _LOCAL:
        where = (root / str(source[kind])).resolve()
        return parse_pip_line(f"{name} @ {where.as_uri()}")
    if kind == "git":
        return parse_pip_line(f"{name} @ {git_url(str(source['git']))}")
    hashes = wheel_hashes(pkg.get("wheels") or [], python)
    if kind == "url":
        digest = _table(pkg.get("sdist")).get("hash") if not pkg.get("wheels") else (hashes[:1] or [None])[0]
        tail = f" --hash={digest}" if isinstance(digest, str) and digest.startswith("sha256:") else ""
        return parse_pip_line(f"{name} @ {source['url']}{tail}")
    if kind == "registry":
        registries[str(source["registry"])] = registries.get(str(source["registry"]), 0) + 1
    if not hashes and pkg.get("wheels"):
        reading.notes.append(f"{name} {version}: no wheel in the lock fits linux x86_64 for Python {python}")
    return parse_pip_line(f"{name}=={version}" + "".join(f" --hash={h}" for h in hashes))


def git_url(locked: str) -> str:
    """uv's and pixi's `https://host/repo.git?rev=v1&subdirectory=x#<commit>` as pip's
    `git+https://host/repo.git@<commit>#subdirectory=x`."""
    parts = urlsplit(locked.removeprefix("git+"))
    query = parse_qs(parts.query)
    ref = parts.fragment or next((query[k][0] for k in ("rev", "tag", "branch") if query.get(k)), "")
    base = urlunsplit(parts._replace(query="", fragment=""))
    url = f"git+{base}" + (f"@{ref}" if ref else "")
    if query.get("subdirectory"):
        url += f"#subdirectory={query['subdirectory'][0]}"
    return url


def _indexes(registries: dict[str, int], reading: Reading) -> None:
    """The registries the packages come from: one other than PyPI for all of them is the index;
    several are extra indexes beside PyPI."""
    others = [r for r in registries if r.rstrip("/") not in PYPI]
    if not others:
        return
    option = "--index-url" if len(registries) == 1 else "--extra-index-url"
    for url in others:
        clean = carried_url(url, "the lock's index", reading.notes)
        if clean is not None:
            reading.add_option(option, clean)
