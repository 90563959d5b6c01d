"""The one exception type the CLI turns into a calm `error: ...` line."""


class KbundleError(Exception):
    """A problem the user can act on. The message is one line, shown as `error: <message>`."""

    exit_code = 1


class UsageError(KbundleError):
    """Bad input: a wrong file, an unknown option value."""

    exit_code = 2
