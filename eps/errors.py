"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class EpsError(Exception):
    """A problem with the user's input (a file, a config value), not a bug in eps.

    The message must name the file (or config key) and the problem on one line.
    """


def file_error(path, problem: str) -> "EpsError":
    """The standard one-line error about a file, "<path>: <problem>", for the caller to raise."""
    return EpsError(f"{path}: {problem}")
