"""The one exception type users see: a one-line message that says what to do."""


class JaonnxError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2."""
