"""Parse the sender's environment description: `environment.yml` as `conda env export`
writes it on any OS, or a `requirements.txt` with an explicit Python version."""

from __future__ import annotations

import re
from pathlib import Path

from kbundle.errors import UsageError
from kbundle.pack.records import CondaSpec, PipPin, RawEnv

_NAME = re.compile(r"^\s*(?:(?P<channel>[^\s:]+)::)?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]*)(?P<rest>.*)$")
_PIP_NAME = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)\s*(?:\[[^\]]*\])?\s*(?P<rest>.*)$")


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


def parse_pip_line(raw: str) -> PipPin | None:
    text = _one_line(raw, "pip requirement")
    if not text or text.startswith("#"):
        return None
    lowered = text.lower()
    if text.startswith(("-e ", "--editable")) or "file:" in lowered or re.match(r"^[a-zA-Z]:[\\/]", text) or text.startswith(("/", ".", "\\")):
        name = text.split("#egg=")[-1] if "#egg=" in text else text
        return PipPin(raw=text, name=canonical(re.split(r"[\s@=<>]", name.strip())[0] or name), version=None, local=True)
    if text.startswith("-"):
        # Options such as --index-url: not a package; the build decides where wheels come from.
        return None
    match = _PIP_NAME.match(text)
    if not match:
        raise UsageError(f"cannot read the pip requirement {raw!r}")
    rest = match["rest"].split(";")[0].strip()
    version = rest[2:].strip() if rest.startswith("==") and not re.search(r"[<>!,*]", rest[2:]) else None
    return PipPin(raw=text, name=canonical(match["name"]), version=version)


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
    for item in deps:
        if isinstance(item, dict):
            for key, value in item.items():
                if key != "pip" or not isinstance(value, list):
                    raise UsageError(f"{path.name}: unexpected entry {key!r} under dependencies")
                pip.extend(p for p in (parse_pip_line(str(v)) for v in value) if p)
        elif isinstance(item, (str, int, float)):
            conda.append(parse_conda_spec(str(item)))
        else:
            raise UsageError(f"{path.name}: cannot read dependency {item!r}")
    channels = data.get("channels") or []
    if not isinstance(channels, list):
        raise UsageError(f"{path.name}: 'channels' must be a list")
    name = data.get("name")
    return RawEnv(
        name=str(name) if name is not None else None,
        channels=[str(c) for c in channels],
        conda=conda,
        pip=pip,
        prefix=str(data["prefix"]) if data.get("prefix") else None,
        source_kind="env-file",
        source_file=path.name,
        source_text=text,
    )


def read_requirements(path: Path, python: str | None) -> RawEnv:
    if not python:
        raise UsageError(f"{path.name} is a requirements file: pass --python X.Y to say which Python it needs")
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", python):
        raise UsageError(f"--python must look like 3.11, not {python!r}")
    text = _read_text(path)
    pins = [p for p in (parse_pip_line(line) for line in text.splitlines()) if p]
    if not pins:
        raise UsageError(f"{path.name} lists no requirements")
    return RawEnv(
        name=None,
        channels=["conda-forge"],
        conda=[parse_conda_spec(f"python={python}"), parse_conda_spec("pip")],
        pip=pins,
        source_kind="requirements",
        source_file=path.name,
        source_text=text,
    )


def read_env_file(path: Path, python: str | None = None) -> RawEnv:
    if not path.exists():
        raise UsageError(f"environment file {path} does not exist")
    if not path.is_file():
        raise UsageError(f"environment file {path} is not a file")
    if path.suffix.lower() in (".txt", ".in") or path.name.lower().startswith("requirements"):
        return read_requirements(path, python)
    return read_environment_yml(path)


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


def write_environment_yml(header: str, name: str, channels: list[str], conda: list[str], pip: list[str],
                          prefix: str | None = None) -> str:
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
    return f"# {header}\n" + yaml.dump(doc, Dumper=yaml_dumper(), sort_keys=False, default_flow_style=False,
                                       width=1000)
