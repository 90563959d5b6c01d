"""`kbundle push`: thin over kbundle/flows/push.py.

Progress and warnings go to stderr; stdout carries only the pushed reference (the last line,
so `ref=$(kbundle push b.kbundle --to 127.0.0.1:5000/lab -y)` works) or the `--json` object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def push(
    bundle: Path = typer.Argument(..., help="The .kbundle file whose image is pushed (built first when missing)."),
    to: str = typer.Option(..., "--to", help="REGISTRY/NAMESPACE, e.g. 127.0.0.1:5000/lab or ghcr.io/alice."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Build without asking (you reviewed the bundle)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the reference."),
    base_image: Optional[str] = typer.Option(
        None, "--base-image", help="Build FROM this image instead of the bundle's."
    ),
    progress: str = typer.Option(
        "auto", "--progress", help="auto (rich on a terminal, else plain) | rich | plain (a line every 5 s) | none"
    ),
    engine_timeout: float = typer.Option(
        10.0, "--engine-timeout", help="Seconds the Docker engine may take to answer before kbundle gives up."
    ),
) -> None:
    """Push a bundle's image to a registry; print NAME@sha256:… for `kbundle run BUNDLE --image`."""
    from kbundle.commands.run import _print_json, _timeout
    from kbundle.flows.push import PushOptions, push_bundle
    from kbundle.progress import reporter

    console = reporter(progress)
    result = push_bundle(PushOptions(bundle, to, base_image, yes, _timeout(engine_timeout)), console)
    if as_json:
        _print_json(result.to_dict())
    else:
        typer.echo(result.reference)
