"""The typer application object. Command modules in `kbundle.commands` register on it.

Kept apart from `cli.py` so command modules can import it without a cycle. Command
modules import heavy libraries (docker, rattler, jupyter_client) inside their
functions: `kbundle pack` must start about as fast as importing typer itself.
"""

from __future__ import annotations

import typer

from kbundle import __version__

app = typer.Typer(
    name="kbundle",
    help="Pack a notebook with its environment into one small file, and run it as a kernel elsewhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kbundle {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """kbundle: "it ran on my machine, on my GPU", now on theirs too."""
