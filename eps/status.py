"""`eps status`: where each stage of a run is, read from the rules' logs.

Every rule's log starts with the command that reruns it and ends with `# eps <stage>: done in
N s` (or the one-line error); in between, progress lines. The status is the last of them.
"""

from __future__ import annotations

from pathlib import Path

from eps.errors import EpsError


def log_state(path: Path) -> tuple[str, str]:
    """(state, detail) of one log: done / failed / running (its last progress line) / waiting."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        return "unreadable", exc.strerror or type(exc).__name__
    if not lines:
        return "started", ""
    last = lines[-1]
    if last.startswith("# eps ") and ": done in " in last:
        return "done", last.split(": done in ", 1)[1]
    errors = [line for line in lines if line.startswith("eps: error: ")]
    if errors:
        return "failed", errors[-1][len("eps: error: "):]
    if last.startswith("# rerun:"):
        return "started", ""
    return "running", last[-100:]


def status(results) -> list[tuple[str, str, str]]:
    """(log name, state, detail) of every log under `results`/logs, sorted by name."""
    logs = Path(results) / "logs"
    if not logs.is_dir():
        raise EpsError(f"{logs}: no logs yet (is {results} the results folder of a run, e.g. results/voc12?)")
    rows = []
    for path in sorted(logs.rglob("*.log")):
        rows.append((path.relative_to(logs).with_suffix("").as_posix(), *log_state(path)))
    return rows
