"""The one exception type the CLI turns into a calm `error: ...` line."""


class KbundleError(Exception):
    """A problem the user can act on. The message is one line, shown as `error: <message>`."""

    exit_code = 1


class UsageError(KbundleError):
    """Bad input: a wrong file, an unknown option value."""

    exit_code = 2


def first_line(message: object) -> str:
    """The first non-blank line of a message or exception, for one-line `error:` output.

    An exception with no text gives its type's name, so the line is never empty."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return type(message).__name__ if isinstance(message, BaseException) else ""
