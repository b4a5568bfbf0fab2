"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class TTAError(Exception):
    """A bad input (flag, name, value, missing asset); the message says how to fix it."""


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an error's message (its type's name if it has none), at most `limit` long:
    what a one-line TTAError quotes of the error behind it."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]
