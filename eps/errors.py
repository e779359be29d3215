"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class EpsError(Exception):
    """A problem with the user's input (a file, a config value), not a bug in eps.

    The message must name the file (or config key) and the problem on one line.
    """


def fail(path, problem: str) -> "EpsError":
    """Build the standard one-line error: '<path>: <problem>'."""
    return EpsError(f"{path}: {problem}")
