"""GPU slots on a multi-GPU workstation: N concurrent jobs on N different devices.

`snakemake --cores C --resources gpu=N` runs at most N GPU jobs at a time but does not say
which GPU each should use. With `device: auto` and more than one visible CUDA device, a job
claims a free device *slot*: a non-blocking exclusive `fcntl.flock` on one lock file per
device (``gpu-<k>.lock``) in a lock directory. The lock is held by an open file descriptor
kept for the life of the process, so the kernel frees the slot when the process exits,
however it exits (crash, kill -9 included); nothing is ever left to clean up.

The lock directory is ``$EPS_GPU_LOCK_DIR`` if set, else ``<tmp>/eps-gpu-locks-<user>``.
It must be on a local filesystem (flock over NFS is not reliable) and shared by the jobs
that share the GPUs: every job of one machine, by default. Under SLURM each job sees only
its own GPUs (CUDA_VISIBLE_DEVICES), usually one, so no slot is claimed there; a job with
several GPUs keys its folder by $SLURM_JOB_ID (its devices are numbered from 0 like those
of any other job on the node, but are not shared with them).

This module knows nothing about torch: the device count is a parameter (tests pass one
without any GPU).
"""

from __future__ import annotations

import fcntl
import getpass
import os
import sys
import tempfile
import time
from pathlib import Path

from eps.errors import EpsError

# Slots this process holds: device index -> open file (the flock lives as long as the file).
_HELD: dict[int, object] = {}


def lock_dir() -> Path:
    """Where the per-device lock files live ($EPS_GPU_LOCK_DIR, else a per-user temp folder)."""
    given = os.environ.get("EPS_GPU_LOCK_DIR")
    if given:
        return Path(given)
    try:
        user = getpass.getuser()
    except Exception:  # no user name (some containers): the uid keys the folder
        user = str(os.getuid())
    name = f"eps-gpu-locks-{user}"
    job = os.environ.get("SLURM_JOB_ID")
    if job:  # a SLURM job's GPUs are its own, numbered from 0 in every job: slots per job
        name += f"-slurm-{job}"
    return Path(tempfile.gettempdir()) / name


def _try_lock(path: Path):
    """An open file holding an exclusive flock on `path`, or None if another process holds it."""
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except OSError as exc:
        f.close()
        raise EpsError(f"{path}: cannot lock a GPU slot ({exc.strerror or exc})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def claim_devices(count: int, n: int = 1, directory: str | os.PathLike | None = None,
                  wait: float | None = None, poll: float = 0.2) -> list[int]:
    """Claim `n` free slots among `count` devices; return their indices (ascending).

    Slots already held by this process are reused first (a second call claims nothing new).
    When fewer than `n` slots are free, waits up to `wait` seconds ($EPS_GPU_WAIT, default
    600) for others to exit, then fails with one line: with `--resources gpu=N` no more
    than N jobs run at once, so a wait only happens when something outside the workflow
    also holds slots.
    """
    if count < 1:
        raise EpsError(f"GPU slots: device count must be >= 1, got {count}")
    if not 1 <= n <= count:
        raise EpsError(f"gpus: {n} requested but only {count} CUDA device(s) are visible")
    if wait is None:
        wait = float(os.environ.get("EPS_GPU_WAIT", "600"))
    folder = Path(directory) if directory is not None else lock_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EpsError(f"{folder}: cannot create the GPU lock folder ({exc.strerror or exc})") from None
    mine = sorted(k for k in _HELD if k < count)[:n]
    deadline = time.monotonic() + wait
    warned = False
    while True:
        for k in range(count):
            if len(mine) == n:
                return sorted(mine)
            if k in _HELD:
                continue
            f = _try_lock(folder / f"gpu-{k}.lock")
            if f is not None:
                _HELD[k] = f
                mine.append(k)
        if len(mine) == n:
            return sorted(mine)
        if time.monotonic() >= deadline:
            raise EpsError(f"{folder}: no free GPU slot among {count} device(s) after {wait:g} s "
                           f"(held by other processes; see the pids in the gpu-*.lock files)")
        if not warned:
            print(f"waiting for a free GPU slot in {folder} ({len(mine)} of {n} claimed)",
                  file=sys.stderr, flush=True)
            warned = True
        time.sleep(poll)


def claim_device(count: int, directory: str | os.PathLike | None = None, wait: float | None = None) -> int:
    """Claim one free slot among `count` devices (see `claim_devices`); held until the process exits."""
    return claim_devices(count, 1, directory, wait)[0]


def release_all() -> None:
    """Give back every slot this process holds (normally the process exit does it)."""
    for k in list(_HELD):
        _HELD.pop(k).close()
