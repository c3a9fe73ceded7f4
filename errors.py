"""The base of errors a user can act on: the ``flare`` command prints their first line and exits non-zero."""


class FlareError(RuntimeError):
    """A failure with a one-line explanation (no traceback on the command line)."""
