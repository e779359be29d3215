"""Progress bars a person can follow in a terminal and in a rule's log file.

On a terminal: tqdm as usual. Written to a file (a Snakemake log): one complete line per
update, at most every `EPS_PROGRESS_SECONDS` seconds (default 30), instead of carriage
returns that turn the whole run into one line; `tail -f results/{ds}/logs/...` follows it.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


class _Lines:
    """A stream that turns tqdm's carriage-return updates into whole lines."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            line = line.rstrip()
            if line.strip() and line != self.last:  # tqdm repeats the last state when it closes
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


class _FileBar(tqdm):
    """A bar written to a file: its postfix (loss, lr) shows at the next timed update, not at once."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable=None, **kwargs):
    """tqdm over `iterable`; to a file, readable lines at a sensible interval."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        try:
            seconds = float(os.environ.get("EPS_PROGRESS_SECONDS", "30"))
        except ValueError:
            seconds = 30.0
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), seconds)
        kwargs.setdefault("ascii", True)
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
        return _FileBar(iterable, file=_Lines(stream), **kwargs)
    return tqdm(iterable, file=stream, **kwargs)
