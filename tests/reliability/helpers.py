"""Helpers of the reliability tests: the real `eps` command in a subprocess and a tiny world.

Every case runs `python -m eps ...` as a user would, so exit codes and stderr are the real
ones. One thread per process (EPS_THREADS=1): the machine's few cores are shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny_workflow import snakemake_env

ROOT = Path(__file__).resolve().parents[2]


def subprocess_env() -> dict:
    """tiny_workflow.snakemake_env (this Python's bin first on PATH), one thread, the checkout first on PYTHONPATH."""
    pythonpath = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    return snakemake_env(EPS_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)


def eps(*argv, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the real `eps` command (`python -m eps`)."""
    return subprocess.run([sys.executable, "-m", "eps", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())


def assert_user_error(proc: subprocess.CompletedProcess, *names, only_line: bool = True) -> str:
    """Exit status 2, no traceback, one `eps: error: <file>: <problem>` line naming every `names`.

    `only_line`: stderr holds nothing else (stages that print progress bars pass False; the
    error must then still be the last line).
    """
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("eps: error: ")]
    assert len(errors) == 1, err[-3000:]
    line = errors[0]
    if only_line:
        assert lines == [line], err[-3000:]
    else:
        assert lines[-1] == line, err[-3000:]  # splitlines() also splits progress bars at \r
    for name in names:
        assert str(name) in line, f"{name!r} not in: {line}"
    return line


def leftovers(root: Path) -> list[Path]:
    """Temporary files a writer left behind (there must be none)."""
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def synthetic_block(data: Path, **extra) -> dict:
    return {"type": "synthetic", "name": "t", "root": str(data), **extra}


TRAIN_PARAMS = {"loss": "cam", "backbone": "small", "iterations": 4, "batch_size": 2, "crop": 32,
                "resize_long": [32, 40], "checkpoint_every": 2, "device": "cpu", "num_workers": 0, "seed": 0}
