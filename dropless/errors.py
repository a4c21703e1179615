"""The project's error type for user mistakes: the CLI prints it as one line, without a traceback."""


class DroplessError(ValueError):
    """A bad input (path, number, checkpoint, ...) the user can fix; the message says how."""
