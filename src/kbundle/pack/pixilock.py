"""pixi.lock and conda-lock.yml (both read with py-rattler's `rattler.LockFile`), and pixi's
manifest (pixi.toml, or a pyproject.toml with `[tool.pixi]`) when its lock cannot serve.

A lock's linux-64 environment is taken as it is: its conda packages as exact
`name=version=build` specs (normalisation keeps the version and drops the build hash, as for any
export), its PyPI packages as exact pins with the sha256 the lock records for the wheel. pixi
writes an environment's PyPI indexes into the lock (`indexes:`, `find-links:`); they become the
bundle's indexes. A lock without linux-64 gives way to the manifest beside it; without a manifest,
its packages for another platform are read as that platform's export.
"""

from __future__ import annotations

from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.pipenv import Hints, Reading, carried_url
from kbundle.pack.prefix import channel_name
from kbundle.pack.records import RawEnv
from kbundle.pack.textfiles import read_text, write_environment_yml
from kbundle.specs import CondaSpec, PipPin, parse_conda_spec, parse_pip_line

PLATFORM = "linux-64"


def is_lock_yaml(text: str) -> bool:
    """A YAML text that is a pixi.lock or conda-lock file, not an environment.yml."""
    import re

    top = set(re.findall(r"^([a-z_-]+):", text, re.MULTILINE))
    return "version" in top and ("environments" in top or {"package", "metadata"} <= top)


def manifest_beside(lock: Path) -> Path | None:
    for name in ("pixi.toml", "pyproject.toml"):
        path = lock.parent / name
        if path.is_file() and (name == "pixi.toml" or _has_pixi(path)):
            return path
    return None


def _has_pixi(path: Path) -> bool:
    from kbundle.pack.pyproject import has_dependencies, load_toml

    return has_dependencies(path) and "pixi" in (load_toml(path).get("tool") or {})


def read_lock(path: Path, hints: Hints, env_name: str | None = None, use_manifest: bool = True) -> RawEnv:
    from rattler import LockFile

    if hints.extras:
        raise UsageError(f"--extra applies to a pyproject.toml or uv.lock; {path.name} locks its environments whole")
    try:
        lock = LockFile.from_path(path)
    except Exception as exc:  # rattler's parse errors: the file, not kbundle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path.name} is not a lock file kbundle can read ({first})") from None
    names = [name for name, _ in lock.environments()]
    name = env_name or ("default" if "default" in names else (names[0] if len(names) == 1 else None))
    env = lock.environment(name) if name else None
    if env is None:
        raise UsageError(f"{path.name} has no environment {env_name or 'default'} (it has: {', '.join(names)})")
    notes = []
    if len(names) > 1:
        notes.append(f"{path.name}: the environment {name} (it also has {', '.join(n for n in names if n != name)})")
    platforms = {str(p.subdir): p for p in env.platforms()}
    platform = platforms.get(PLATFORM)
    if platform is None:
        manifest = manifest_beside(path) if use_manifest else None
        if manifest is not None:
            env = read_pixi_manifest(manifest, hints, use_lock=False)
            env.notes.insert(0, f"{path.name} has no {PLATFORM} environment: read {manifest.name}'s specs instead")
            return env
        if not platforms:
            raise UsageError(f"{path.name}: the environment {name} has no packages")
        platform = platforms[sorted(platforms)[0]]
        notes.append(f"{path.name} has no {PLATFORM} environment: its {platform.subdir} packages are read as an export")
    conda, pip = [], []
    reading = Reading(notes=notes)
    for pkg in env.packages(platform) or []:
        if type(pkg).__name__ == "PypiLockedPackage":
            pin = _pypi_pin(pkg, path.parent)
            if pin is not None:
                pip.append(pin)
        else:
            spec = _conda_spec(pkg, path.name, reading.notes)
            if spec is not None:
                conda.append(spec)
    _indexes(path, name, reading)
    channels = [channel_name(str(c)) for c in env.channels()]
    python = next((s.version for s in conda if s.name == "python"), None)
    if hints.python and python and not python.startswith(hints.python):
        raise UsageError(f"--python {hints.python} disagrees with {path.name}'s python {python}: leave --python out")
    pip_lines = (reading.options if pip else []) + [p.text for p in pip]
    header = f"read by kbundle from {path.name} (environment {name}, {platform.subdir})"
    text = write_environment_yml(header, name, channels, [s.raw for s in conda], pip_lines)
    return RawEnv(
        name=name,
        channels=channels,
        conda=conda,
        pip=pip,
        platform=str(platform.subdir),
        source_kind="env-file",
        source_file=path.name,
        source_text=text,
        notes=reading.notes,
        source_path=path,
    )


def _conda_spec(pkg, what: str, notes: list[str]) -> CondaSpec | None:
    if type(pkg).__name__ == "CondaLockedSourcePackage":
        notes.append(
            f"{what}: {pkg.name} is built by pixi from the sender's source ({pkg.location}): not carried; "
            "publish it, or --include its source"
        )
        return None
    record = pkg.package_record
    return parse_conda_spec(f"{record.name.normalized}={record.version}={record.build}")


def _sha256(pkg) -> str | None:
    try:  # rattler 0.28 wraps a missing hash in an object whose fields raise
        digest = pkg.hashes.sha256
    except AttributeError:
        return None
    return f"sha256:{digest.hex()}" if digest else None


def _pypi_pin(pkg, root: Path) -> PipPin | None:
    from kbundle.pack.uvlock import git_url
    from kbundle.specs import url_filename

    name, version, location = pkg.name, pkg.version, str(pkg.location)
    digest = _sha256(pkg)
    if location.startswith("git+"):
        return parse_pip_line(f"{name} @ {git_url(location)}")
    if location.startswith("direct+"):
        tail = f" --hash={digest}" if digest else ""
        return parse_pip_line(f"{name} @ {location.removeprefix('direct+')}{tail}")
    if "://" not in location:  # a path in the workspace: the sender's own code
        where = (root / location).resolve()
        return parse_pip_line(f"{name} @ {where.as_uri()}")
    wheel = url_filename(location).endswith(".whl")
    tail = (
        f" --hash={digest}" if digest and wheel else ""
    )  # the image installs wheels: an sdist's hash would refuse them
    return parse_pip_line(f"{name}=={version}{tail}")


def _indexes(path: Path, env_name: str, reading: Reading) -> None:
    """The environment's PyPI indexes and find-links, as pixi wrote them into the lock."""
    import yaml

    from kbundle.resources import yaml_loader

    try:
        data = yaml.load(read_text(path), Loader=yaml_loader())
        env = (data.get("environments") or {}).get(env_name) or {}
    except (yaml.YAMLError, AttributeError):
        return
    indexes = [str(u) for u in env.get("indexes") or []]
    for i, url in enumerate(indexes):
        _option(reading, "--index-url" if i == 0 else "--extra-index-url", url)
    for link in env.get("find-links") or []:
        if isinstance(link, dict) and link.get("url"):
            _option(reading, "--find-links", str(link["url"]))
        elif isinstance(link, dict) and link.get("path"):
            reading.notes.append(f"{path.name}: find-links {link['path']} is a folder on this machine: not carried")


def _option(reading: Reading, option: str, url: str) -> None:
    clean = carried_url(url, option, reading.notes)
    if clean is not None and not (option == "--index-url" and clean == "https://pypi.org/simple"):
        reading.add_option(option, clean)


# ---------------------------------------------------------------- pixi's manifest


def read_pixi_manifest(path: Path, hints: Hints, use_lock: bool = True) -> RawEnv:
    """pixi.toml (or pyproject.toml's [tool.pixi]): its pixi.lock's linux-64 environment when the
    lock beside it has one; else the manifest's default feature for linux-64, as specs to solve."""
    from kbundle.pack.pyproject import load_toml

    lock = path.parent / "pixi.lock"
    if use_lock and lock.is_file():
        env = read_lock(lock, hints, use_manifest=False)
        if env.platform == PLATFORM:
            env.notes.insert(0, f"{path.name}: read from pixi.lock beside it (the locked {PLATFORM} environment)")
            env.source_path = lock
            return env
    if hints.extras:
        raise UsageError(f"--extra applies to a pyproject.toml or uv.lock; {path.name} is pixi's manifest")
    try:
        data = load_toml(path)
    except UsageError as exc:  # pixi reads TOML 1.1 (inline tables over several lines); tomllib reads 1.0
        raise UsageError(f"{exc}; lock it with `pixi lock` and pass -e pixi.lock") from None
    pixi = (data.get("tool") or {}).get("pixi") if path.name == "pyproject.toml" else data
    pixi = pixi or {}
    head = pixi.get("workspace") or pixi.get("project") or {}
    channels = [c if isinstance(c, str) else str(c.get("channel", "")) for c in head.get("channels") or []]
    tables = [pixi, *(((pixi.get("target") or {}).get(t) or {}) for t in ("unix", "linux", PLATFORM))]
    conda = [_conda(n, v) for t in tables for n, v in (t.get("dependencies") or {}).items()]
    lines = (
        [str(d) for d in ((data.get("project") or {}).get("dependencies") or [])]
        if path.name == "pyproject.toml"
        else []
    )
    lines += [_pypi(n, v) for t in tables for n, v in (t.get("pypi-dependencies") or {}).items()]
    reading = Reading(notes=[f"{path.name}: no {PLATFORM} lock; its specs are solved for the image"])
    options = pixi.get("pypi-options") or {}
    if options.get("index-url"):
        _option(reading, "--index-url", str(options["index-url"]))
    for url in options.get("extra-index-urls") or []:
        _option(reading, "--extra-index-url", str(url))
    for link in options.get("find-links") or []:
        if isinstance(link, dict) and link.get("url"):
            _option(reading, "--find-links", str(link["url"]))
    pip = [p for p in (_manifest_pin(line, path.parent) for line in lines) if p is not None]
    if not conda and not pip:
        raise UsageError(f"{path.name} lists no dependencies")
    name = str(head.get("name") or path.parent.name)
    pip_lines = (reading.options if pip else []) + [p.text for p in pip]
    text = write_environment_yml(f"read by kbundle from {path.name}", name, channels, [s.raw for s in conda], pip_lines)
    return RawEnv(
        name=name,
        channels=channels,
        conda=conda,
        pip=pip,
        source_kind="env-file",
        source_file=path.name,
        source_text=text,
        notes=reading.notes,
        source_path=path,
    )


def _conda(name: str, value) -> CondaSpec:
    if isinstance(value, dict):
        version = str(value.get("version") or "").strip()
        build = str(value.get("build") or "").strip()
        channel = f"{value['channel']}::" if value.get("channel") else ""
        text = f"{channel}{name} {version or '*'} {build}".strip() if build else f"{channel}{name} {version}".strip()
        return parse_conda_spec(text)
    value = str(value).strip()
    return parse_conda_spec(name if value in ("", "*") else f"{name} {value}")


def _pypi(name: str, value) -> str:
    if not isinstance(value, dict):
        value = str(value).strip()
        return name if value in ("", "*") else f"{name}{value}"
    extras = f"[{','.join(value['extras'])}]" if value.get("extras") else ""
    if value.get("git"):
        ref = value.get("rev") or value.get("tag") or value.get("branch")
        url = f"git+{value['git']}" + (f"@{ref}" if ref else "")
        if value.get("subdirectory"):
            url += f"#subdirectory={value['subdirectory']}"
        return f"{name}{extras} @ {url}"
    if value.get("url"):
        return f"{name}{extras} @ {value['url']}"
    if value.get("path"):
        return f"{name}{extras} @ path:{value['path']}"
    version = str(value.get("version") or "").strip()
    return f"{name}{extras}{'' if version in ('', '*') else version}"


def _manifest_pin(line: str, root: Path) -> PipPin | None:
    if " @ path:" in line:
        head, _, rel = line.partition(" @ path:")
        return parse_pip_line(f"{head} @ {(root / rel).resolve().as_uri()}")
    return parse_pip_line(line)
