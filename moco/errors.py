"""The one exception a user sees as a message: a mistake in the command line, the data or a file is
one line on stderr and exit code 2, not a traceback (README, "When things go wrong")."""


class UserError(Exception):
    """A mistake in the command line, the data or a file: reported as one line, exit code 2."""


def first_line(exc, limit=200):
    """The first non-empty line of an exception's message (its type name if it has none), for one-line
    errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
