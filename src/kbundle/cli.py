"""The `kbundle` command line. Commands stay thin: they parse, call one module, and print."""

from __future__ import annotations

import os
import sys

import typer

from kbundle.app import app
from kbundle.errors import KbundleError

# Each module registers its commands on `app` when imported.
from kbundle.commands import load_all as _load_commands

_load_commands()


def fail(message: str, code: int = 1) -> None:
    """Print one `error:` line on stderr and leave with a non-zero code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
