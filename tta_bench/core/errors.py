"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class TTAError(Exception):
    """A bad input (flag, name, value, missing asset); the message says how to fix it."""
