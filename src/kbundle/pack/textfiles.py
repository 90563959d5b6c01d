"""The text files every environment reader shares: read in whatever encoding the sender's tool
wrote them, and environment.yml written in `conda env export`'s layout.

A leaf of pack/: each reader (envyml, reqfile, pyproject, pixilock, prefix) and normalise use it,
and it imports none of them, so no reader depends on another to read or write a file."""

from __future__ import annotations

from pathlib import Path

from kbundle.errors import UsageError


def read_text(path: Path) -> str:
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
