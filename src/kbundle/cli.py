"""The `kbundle` command line: the typer app, its commands, and one `error:` line per failure."""

from __future__ import annotations

import os
import sys

import typer

from kbundle import __version__
from kbundle.commands import bundle, kernels, pack, run, trust
from kbundle.errors import KbundleError

app = typer.Typer(
    name="kbundle",
    help="Pack a notebook with its environment into one small file, and run it as a kernel elsewhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(pack.pack)
app.command()(bundle.inspect)
app.command()(bundle.verify)
app.command()(run.run)
app.command()(run.doctor)
app.add_typer(kernels.kernels_app, name="kernels")
app.add_typer(trust.trust_app, name="trust")
app.command()(kernels.gc)


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


def _run_app() -> int:
    try:
        result = app(standalone_mode=False)
    except KbundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:  # usage errors from click (vendored by newer typer) and anything unexpected
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `kbundle` shows the help
            typer.echo(exc.format_message(), err=True)
            return 0
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            typer.echo(f"error: {exc.format_message()}", err=True)
            return exc.exit_code
        if os.environ.get("KBUNDLE_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (set KBUNDLE_DEBUG=1 for details)", err=True)
        return 1
    return result if isinstance(result, int) else 0


def main() -> None:
    """Entry point. Leaves with os._exit because an interpreter that used rattler can crash at exit."""
    code = _run_app()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
