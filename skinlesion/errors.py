"""The one exception type the command line turns into a clean message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment that the user can fix: the message says what and how.

    Raise it with a message naming the file, row, key or value at fault and what to do about it;
    `skinlesion.cli` prints it as ``error: <message>`` and exits with status 2.
    """
