"""Parse the sender's environment description: `environment.yml` as `conda env export`
writes it on any OS; every other format goes to its own reader (`read_env_file` dispatches):
requirements files (pack/reqfile.py), pyproject.toml (pack/pyproject.py), uv.lock
(pack/uvlock.py), pixi.lock, conda-lock.yml and pixi.toml (pack/pixilock.py)."""

from __future__ import annotations

from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.records import RawEnv
from kbundle.specs import CondaSpec, PipPin, parse_conda_spec, parse_pip_line


def _load_yaml(path: Path, text: str):
    import yaml

    from kbundle.resources import yaml_loader

    try:
        return yaml.load(text, Loader=yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"{path.name} is not valid YAML{where}") from None


def read_environment_yml(path: Path) -> RawEnv:
    text = _read_text(path)
    data = _load_yaml(path, text)
    if not isinstance(data, dict):
        raise UsageError(f"{path.name} is not an environment file (expected a mapping with 'dependencies:')")
    deps = data.get("dependencies")
    if not isinstance(deps, list) or not deps:
        raise UsageError(f"{path.name} lists no dependencies")
    conda: list[CondaSpec] = []
    pip: list[PipPin] = []
    pip_lines: list[str] = []
    for item in deps:
        if isinstance(item, dict):
            for key, value in item.items():
                if key != "pip" or not isinstance(value, list):
                    raise UsageError(f"{path.name}: unexpected entry {key!r} under dependencies")
                pip.extend(p for p in (parse_pip_line(str(v)) for v in value) if p)
                pip_lines += [str(v) for v in value]
        elif isinstance(item, (str, int, float)):
            conda.append(parse_conda_spec(str(item)))
        else:
            raise UsageError(f"{path.name}: cannot read dependency {item!r}")
    channels = data.get("channels") or []
    if not isinstance(channels, list):
        raise UsageError(f"{path.name}: 'channels' must be a list")
    name = data.get("name")
    env = RawEnv(
        name=str(name) if name is not None else None,
        channels=[str(c) for c in channels],
        conda=conda,
        pip=pip,
        prefix=str(data["prefix"]) if data.get("prefix") else None,
        source_kind="env-file",
        source_file=path.name,
        source_text=text,
    )
    from kbundle.pack.reqfile import expand_pip_section  # `- -r requirements.txt`: read as conda runs it

    return expand_pip_section(env, pip_lines, path)


def read_requirements(path: Path, python: str | None, hints=None) -> RawEnv:
    """A requirements file, by pip's rules (pack/reqfile.py)."""
    from kbundle.pack.formats import read_requirements as read

    return read(path, python, hints)


def read_env_file(path: Path, python: str | None = None, hints=None) -> RawEnv:
    """Any environment file: pack/formats.py sends it to its reader."""
    from kbundle.pack.formats import read_any

    return read_any(path, python, hints)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        # Windows PowerShell's `>` writes UTF-16; accept it rather than fail.
        raw = path.read_bytes()
        for encoding in ("utf-16", "cp1252"):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError:
                continue
        raise UsageError(f"{path.name} is not a text file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def write_environment_yml(
    header: str, name: str, channels: list[str], conda: list[str], pip: list[str], prefix: str | None = None
) -> str:
    """An environment.yml in `conda env export`'s layout, after a one-line `# header`.

    The width is wide so that no spec is ever folded onto a second line."""
    import yaml

    from kbundle.resources import yaml_dumper

    deps: list = list(conda)
    if pip:
        deps.append({"pip": list(pip)})
    doc: dict = {"name": name, "channels": list(channels), "dependencies": deps}
    if prefix is not None:
        doc["prefix"] = prefix
    return f"# {header}\n" + yaml.dump(doc, Dumper=yaml_dumper(), sort_keys=False, default_flow_style=False, width=1000)
