"""The `kbundle` command line: the typer app, its commands, and one `error:` line per failure.

Failures are handled here, once: `error: <message>` on stderr and the error's exit code
(docs/usage.md); with `--json`, `{"error": {"code": N, "message": "..."}}` on stdout as well.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import typer

from kbundle import __version__
from kbundle.commands import bundle, kernels, pack, push, run, trust
from kbundle.errors import Interrupted, KbundleError

HELP_NAMES = ["-h", "--help"]
app = typer.Typer(
    name="kbundle",
    help="Pack a notebook with its environment into one small file, and run it as a kernel elsewhere.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_NAMES},
)
app.command()(pack.pack)
app.command()(bundle.inspect)
app.command()(bundle.verify)
app.command()(run.run)
app.command()(run.doctor)
app.command()(push.push)
app.add_typer(kernels.kernels_app, name="kernels")
app.add_typer(trust.trust_app, name="trust")
app.command()(kernels.gc)

# One example per command, shown at the end of its --help.
EXAMPLES = {
    "pack": "kbundle pack analysis.ipynb -e environment.yml --include data/ -o analysis.kbundle",
    "inspect": "kbundle inspect analysis.kbundle --json",
    "verify": "kbundle verify analysis.kbundle && echo intact",
    "run": "kbundle run analysis.kbundle --yes --progress plain --json",
    "doctor": "kbundle doctor analysis.kbundle",
    "push": "ref=$(kbundle push analysis.kbundle --to 127.0.0.1:5000/lab --yes) && kbundle run analysis.kbundle --image $ref",
    "kernels": "kbundle kernels list --json",
    "kernels list": "kbundle kernels list --json",
    "kernels remove": "kbundle kernels remove kbundle-analysis",
    "trust": 'kbundle trust add alice@example.org "ssh-ed25519 AAAA..."',
    "trust add": "kbundle trust add alice@example.org ~/alice.pub",
    "trust list": "kbundle trust list --json",
    "gc": "kbundle gc --dry-run",
}


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


def _polish(command, path: str = "") -> None:
    """Flags show no `<bool>` placeholder, and every command's help ends with an example."""
    help_option = command.get_help_option(typer.Context(command, help_option_names=HELP_NAMES))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    example = EXAMPLES.get(path)
    if example and not command.epilog:
        command.epilog = f"Example: {example}"
    for name, sub in (getattr(command, "commands", None) or {}).items():
        _polish(sub, f"{path} {name}".strip())


def command():
    """The click command behind `app`, polished (see _polish)."""
    built = typer.main.get_command(app)
    _polish(built)
    return built


def wants_json(args: list[str]) -> bool:
    """Whether the command line asks for JSON (before any `--`)."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


def _fail(code: int, message: str, as_json: bool) -> int:
    typer.echo(f"error: {message}", err=True)
    if as_json:
        typer.echo(json.dumps({"error": {"code": code, "message": message}}))
    return code


def describe_os_error(exc: OSError) -> str:
    """`no space left on device (ENOSPC): /path`, rather than `unexpected OSError`."""
    import errno

    name = errno.errorcode.get(exc.errno or 0)
    what = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    path = exc.filename or ""
    return f"{what} ({name}){': ' + str(path) if path else ''}" if name else f"{exc}"


def _os_error_code(exc: OSError) -> int:
    """A full disk or quota is this machine's limit (exit 4, as docs/usage.md says); anything else 1."""
    import errno

    from kbundle.errors import MachineError

    return MachineError.exit_code if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 1


def _terminated(signum, frame) -> None:
    """SIGTERM is handled like Ctrl-C: the run cleans up, then `error: interrupted`, exit 130."""
    raise KeyboardInterrupt


def _run_app(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    as_json = wants_json(args)
    signal.signal(signal.SIGTERM, _terminated)
    if args[:1] != ["gc"]:
        from kbundle import activity

        activity.hold()  # `kbundle gc` then knows this process's temporary folders are not orphans
    try:
        result = command().main(args, prog_name="kbundle", standalone_mode=False)
    except KbundleError as exc:
        return _fail(exc.exit_code, str(exc), as_json)
    except typer.Exit as exc:
        result = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _fail(Interrupted.exit_code, "interrupted", as_json)
    except OSError as exc:  # a disk or permission fault outside any step's own handling: name it and its path
        if os.environ.get("KBUNDLE_DEBUG"):
            raise
        return _fail(_os_error_code(exc), describe_os_error(exc), as_json)
    except Exception as exc:  # usage errors from click (vendored by newer typer) and anything unexpected
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `kbundle` shows the help
            typer.echo(exc.format_message(), err=True)
            return 0
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            return _fail(exc.exit_code, exc.format_message(), as_json)
        if os.environ.get("KBUNDLE_DEBUG"):
            raise
        message = f"unexpected {type(exc).__name__}: {exc} (set KBUNDLE_DEBUG=1 for details)"
        return _fail(1, message, as_json)
    if result == Interrupted.exit_code:  # typer turns KeyboardInterrupt (and so SIGTERM) into Exit(130)
        return _fail(Interrupted.exit_code, "interrupted", as_json)
    return result if isinstance(result, int) else 0


def main() -> None:
    """Entry point. Leaves with os._exit because an interpreter that used rattler can crash at exit."""
    code = _run_app()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
