"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """Bad input: the message says what was wrong and what to do instead."""
