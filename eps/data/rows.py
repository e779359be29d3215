"""What every dataset reader builds rows with: id checks, one index row, paths, config keys.

Its own module so that the readers (voc, coco, folder) and the index that calls them do not
import each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from eps.errors import EpsError


def id_problem(id_: str) -> str | None:
    """Why `id_` cannot be an image id (ids become file and HDF5 names), or None if it can."""
    if not id_:
        return "empty id"
    if "/" in id_ or "\\" in id_ or os.sep in id_:
        return f"id {id_!r} contains a path separator"
    if ".." in id_:
        return f"id {id_!r} contains '..'"
    if id_.startswith("."):
        return f"id {id_!r} starts with '.' (a hidden or relative file name)"
    if id_ != id_.strip() or any(ord(c) < 32 for c in id_):
        return f"id {id_!r} contains whitespace or control characters at its ends"
    return None


def make_row(id_, image, mask="", saliency="", context="", labels=(), splits=()) -> dict:
    """One index row; paths are made absolute, labels sorted unique 0-based ints."""
    def absolute(p):
        return os.path.abspath(p) if p else ""

    return {
        "id": id_, "image": absolute(image), "mask": absolute(mask),
        "saliency": absolute(saliency), "context": absolute(context),
        "labels": sorted({int(c) for c in labels}), "splits": list(splits),
    }


def resolve(root: Path, path) -> Path | None:
    """`path` relative to `root` unless absolute; None stays None."""
    if path is None or path == "":
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def check_keys(block: dict, allowed: Iterable[str], where: str) -> None:
    """Unknown keys are typos more often than not: refuse them."""
    allowed = set(allowed)
    for key in block:
        if key not in allowed:
            raise EpsError(f"{where}.{key}: unknown key (accepted: {', '.join(sorted(allowed))})")
