"""Consent to run an image someone else built (`run --image`, `run --slurm`): pulling it is
running their code, so it is shown and asked, unless --yes."""

from __future__ import annotations

import sys
from typing import Optional

from rich.markup import escape

from kbundle.display import safe
from kbundle.errors import KbundleError
from kbundle.flows.review import _ask


def pull_review_lines(sender: str, ref) -> list[str]:
    """What `run --image` is about to do, for the consent question (pure)."""
    return [
        f"sender      {safe(sender)}",
        f"image       {safe(str(ref))}",
        f"contacts    {safe(ref.registry)} (the image is pulled from there)",
        "built       nothing: the image was built elsewhere; its labels must name this bundle's content hash",
    ]


def consent_to_pull(console, yes: bool, lines: list[str], ask=_ask, interactive: Optional[bool] = None) -> None:
    """Running an image someone else built is running their code: show it and ask, unless --yes."""
    if yes:
        return
    if not (sys.stdin.isatty() if interactive is None else interactive):
        raise KbundleError(
            "this runs an image someone else built; review the bundle (kbundle inspect) and pass --yes "
            "to pull it (stdin is not a terminal, so kbundle cannot ask)"
        )
    console.print("[bold]About to pull an image and register a kernel; nothing is built:[/]", soft_wrap=True)
    for line in lines:
        console.print(escape(line), soft_wrap=True, highlight=False)
    if not ask(console, "Pull it and register the kernel? [y/N] "):
        raise KbundleError("not pulled: you declined (pass --yes to skip the question)")
