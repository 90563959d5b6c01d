"""`environment.yml` as `conda env export` writes it on any OS (the other formats have their own
readers, and pack/formats.py sends each file to its own)."""

from __future__ import annotations

from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.records import RawEnv
from kbundle.pack.reqfile import expand_pip_section
from kbundle.pack.textfiles import read_text
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
    text = read_text(path)
    data = _load_yaml(path, text)
    if not isinstance(data, dict):
        raise UsageError(f"{path.name} is not an environment file (expected a mapping with 'dependencies:')")
    deps = data.get("dependencies")
    if isinstance(deps, (str, dict)) and deps:
        raise UsageError(f"{path.name}: 'dependencies' must be a list, one package a line (`- numpy`)")
    if not isinstance(deps, list) or not deps:
        raise UsageError(f"{path.name} lists no dependencies")
    conda: list[CondaSpec] = []
    pip: list[PipPin] = []
    pip_lines: list[str] = []
    for item in deps:
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "pip" and value is None:
                    continue  # `- pip:` with nothing under it: an empty section, as conda reads it
                if key != "pip" or not isinstance(value, list):
                    raise UsageError(f"{path.name}: unexpected entry {key!r} under dependencies")
                pip.extend(p for p in (parse_pip_line(str(v)) for v in value) if p)
                pip_lines += [str(v) for v in value]
        elif isinstance(item, str):
            conda.append(parse_conda_spec(item))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            raise UsageError(f"{path.name}: the dependency {item!r} is a number, not a package (`python={item}`?)")
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
    return expand_pip_section(env, pip_lines, path)  # `- -r requirements.txt`: read as conda runs it
