"""`kbundle inspect` and `kbundle verify`: read a bundle without building anything."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def inspect(
    bundle: Path = typer.Argument(..., help="The .kbundle file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the documented public contract)."),
) -> None:
    """Show what a bundle carries."""
    from kbundle.bundle import open_bundle

    opened = open_bundle(bundle)
    m = opened.manifest
    if as_json:
        typer.echo(json.dumps(m.to_dict(), indent=2))
        return
    lines = [
        f"{bundle} (format {m.format_version}, kbundle {m.kbundle_version or '?'})",
        f"  name       {m.name}",
        f"  notebook   {m.notebook}",
        f"  python     {m.python or 'unpinned'}",
        f"  cuda       {m.cuda or 'none'}" + (f", cuDNN {m.cudnn}" if m.cudnn else ""),
        f"  base image {m.base_image}",
        f"  channels   {', '.join(m.channels)}",
        f"  locked     {'yes' if m.locked else 'no'}" + (f" ({m.lock_note})" if m.lock_note and not m.locked else ""),
        "  conda:",
        *[f"    {d}" for d in m.dependencies],
    ]
    if m.pip:
        lines += ["  pip:", *[f"    {p}" for p in m.pip]]
    if m.dropped:
        lines += ["  dropped:", *[f"    {d.spec}  ({d.reason})" for d in m.dropped]]
    lines += ["  files:", *[f"    {f.path}  {f.size} B  sha256:{f.sha256[:12]}" for f in m.files]]
    typer.echo("\n".join(lines))


def verify(bundle: Path = typer.Argument(..., help="The .kbundle file.")) -> None:
    """Check a bundle: format version, every member against its sha256 in the manifest."""
    from kbundle.bundle import open_bundle

    opened = open_bundle(bundle)
    typer.echo(
        f"ok: {bundle} ({len(opened.manifest.files)} members match the manifest, format {opened.manifest.format_version})"
    )
