"""`kbundle inspect` and `kbundle verify`: read a bundle without building anything.

Everything a bundle says comes from a stranger: every string from it is shown through
`display.safe`, so a name, spec or reason cannot print fake lines or erase real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kbundle.display import safe


def inspect(
    bundle: Path = typer.Argument(..., help="The .kbundle file."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: the manifest plus `signature` (the documented public contract)."
    ),
) -> None:
    """Show what a bundle carries, and who signed it."""
    from kbundle.bundle import open_bundle
    from kbundle.trust import read_signature

    opened = open_bundle(bundle)
    signature = read_signature(opened)
    if as_json:
        # json.dumps escapes control characters itself (ensure_ascii), so the JSON is safe as it is.
        typer.echo(json.dumps({**opened.manifest.to_dict(), "signature": signature.to_dict()}, indent=2))
        return
    typer.echo("\n".join(inspect_lines(bundle, opened.manifest, signature.describe())))


def inspect_lines(path: Path, m, signature: str) -> list[str]:
    """The text `inspect` prints; every bundle-supplied value passes through `safe`."""
    lines = [
        f"{path} (format {m.format_version}, kbundle {safe(m.kbundle_version or '?', 64)})",
        f"  name       {safe(m.name, 80)}",
        f"  notebook   {safe(m.notebook)}",
        f"  signature  {signature}",
        f"  python     {safe(m.python or 'unpinned')}",
        f"  cuda       {safe(m.cuda or 'none')}" + (f", cuDNN {safe(m.cudnn)}" if m.cudnn else ""),
        f"  base image {safe(m.base_image)}",
        f"  because    {safe(m.base_image_reason)}",
        f"  channels   {', '.join(safe(c) for c in m.channels)}",
        f"  locked     {'yes' if m.locked else 'no'}"
        + (f" ({safe(m.lock_note)})" if m.lock_note and not m.locked else ""),
        "  conda:",
        *[f"    {safe(d)}" for d in m.dependencies],
    ]
    if m.pip:
        lines += ["  pip:", *[f"    {safe(p)}" for p in m.pip]]
    if m.dropped:
        lines += ["  dropped:", *[f"    {safe(d.spec)}  ({safe(d.reason)})" for d in m.dropped]]
    if m.added:
        lines += ["  added:", *[f"    {safe(a.spec)}  ({safe(a.reason)})" for a in m.added]]
    lines += ["  files:", *[f"    {safe(f.path)}  {f.size} B  sha256:{safe(f.sha256[:12])}" for f in m.files]]
    return lines


def verify(
    bundle: Path = typer.Argument(..., help="The .kbundle file."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: ok, path, members, format and signature."
    ),
) -> None:
    """Check a bundle: format, schema, every member against its sha256, the content hash and the signature."""
    from kbundle.bundle import open_bundle
    from kbundle.trust import read_signature

    opened = open_bundle(bundle)
    signature = read_signature(opened)
    members, version = len(opened.manifest.files), opened.manifest.format_version
    if as_json:
        data = {"ok": True, "path": str(bundle), "members": members, "format": version}
        typer.echo(json.dumps(data | {"signature": signature.to_dict()}, indent=2))
        return
    typer.echo(f"ok: {bundle} ({members} members match the manifest, format {version})")
    typer.echo(f"signature: {signature.describe()}")
