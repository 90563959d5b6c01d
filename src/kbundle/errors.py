"""The one exception type the CLI turns into a calm `error: ...` line.

Exit codes (docs/usage.md): 1 anything else, 2 usage or a missing file, 3 a damaged bundle
(BundleError), 4 this machine cannot run it, 130 interrupted.

Every error type lives here, so that raising one never imports the module that raises it
elsewhere (the bundle reader, signatures and trust all raise BundleError without importing
each other).
"""


class KbundleError(Exception):
    """A problem the user can act on. The message is one line, shown as `error: <message>`."""

    exit_code = 1


class UsageError(KbundleError):
    """Bad input: a wrong or missing file, an unknown option value."""

    exit_code = 2


class BundleError(KbundleError):
    """The bundle is damaged, tampered with, or from an unknown format version.

    Also importable as `kbundle.bundle.BundleError` and `kbundle.bundle.reader.BundleError`."""

    exit_code = 3


class MachineError(KbundleError):
    """This machine cannot run the bundle: no engine answers, GPUs refused, too little disk."""

    exit_code = 4


class UnsafeName(KbundleError):
    """A name from outside (a URL, an index link) that cannot become a file name: a bundle that
    carries it is refused as a bundle is (exit 3)."""

    exit_code = 3


class Interrupted(KbundleError):
    """Ctrl-C or SIGTERM: the run cleaned up and stops."""

    exit_code = 130

    def __init__(self, message: str = "interrupted"):
        super().__init__(message)


def first_line(message: object) -> str:
    """The first non-blank line of a message or exception, for one-line `error:` output.

    An exception with no text gives its type's name, so the line is never empty."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return type(message).__name__ if isinstance(message, BaseException) else ""
