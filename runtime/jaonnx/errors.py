"""The one exception type users see: a one-line message that says what to do."""

from __future__ import annotations


class JaonnxError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with code 2.

    `field` names the option or input at fault (e.g. "top_p", "prompt"), so the HTTP layer maps
    an error to its request field without parsing the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
