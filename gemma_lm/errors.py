"""Errors a user can fix. The CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """Bad input: the message says what was wrong and what to do instead."""


def one_line(message, limit: int = 200) -> str:
    """A library's message (or exception) as one short line for a UserError: runs of whitespace
    become one space, and a text longer than `limit` is cut, ending in "...". An exception without
    text is named by its type."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
