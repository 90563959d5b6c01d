"""Warnings for the recipient: collected for `--json` and printed on stderr, each on one line.

Bundle text reaches them (names, paths), so each is made safe for a terminal first."""

from __future__ import annotations

from rich.markup import escape

from kbundle.display import safe


def print_warnings(console, warnings: list[str]) -> None:
    for message in warnings:
        console.print(f"[yellow]warning:[/] {escape(safe(message))}", soft_wrap=True)


def warn(console, warnings: list[str], message: str) -> None:
    """Keep `message` for the result and print it now."""
    warnings.append(message)
    print_warnings(console, [message])
