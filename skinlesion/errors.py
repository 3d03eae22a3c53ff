"""The one exception type the command line turns into a clean message instead of a traceback."""

from __future__ import annotations

_RERAISED = "skinlesion.errors.UserError: "


class UserError(Exception):
    """Bad input or environment that the user can fix: the message says what and how.

    Raise it with a message naming the file, row, key or value at fault and what to do about it;
    `skinlesion.cli` prints it as ``error: <message>`` and exits with status 2.
    """

    def __str__(self) -> str:
        # A DataLoader worker's exception comes back re-raised with the worker's whole traceback as
        # its message; the user needs only the original line.
        text = super().__str__()
        if text.startswith("Caught UserError") and _RERAISED in text:
            return text.rsplit(_RERAISED, 1)[1].strip()
        return text
