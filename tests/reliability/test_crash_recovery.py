"""kill -9 during training: the rerun resumes from the last checkpoint and ends with exactly the
weights (and log) of an uninterrupted run (CPU, fixed seed, one thread)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import torch

from .helpers import TRAIN_PARAMS, eps, leftovers, subprocess_env

ITERATIONS = 120


def read_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_time(rows) -> list[tuple]:
    return [(r["iteration"], r["loss"], r["loss_cls"], r["loss_sal"], r["lr"]) for r in rows]


def test_kill_9_during_training_resumes_to_the_weights_of_an_uninterrupted_run(indexed, tmp_path, monkeypatch):
    from eps.config import TRAIN_DEFAULTS
    from eps.train import train_classifier

    params = {**TRAIN_PARAMS, "iterations": ITERATIONS, "checkpoint_every": 2}

    # The uninterrupted run (in-process, one thread as the subprocesses).
    monkeypatch.setenv("EPS_THREADS", "1")
    reference = train_classifier(indexed["index"], tmp_path / "reference" / "classifier.pt",
                                 {**TRAIN_DEFAULTS, **params})

    out = tmp_path / "run" / "classifier.pt"
    ckpt = out.parent / "checkpoints" / "last.pt"
    work_log = out.parent / "checkpoints" / "train_log.csv"
    argv = ["train-classifier", "--index", str(indexed["index"]), "--out", str(out), "--params", json.dumps(params)]
    with open(tmp_path / "killed.out", "w") as stdout, open(tmp_path / "killed.err", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "eps", *argv], stdout=stdout, stderr=stderr,
                                env=subprocess_env())
        try:
            deadline = time.monotonic() + 240
            # kill once a few checkpoints are down (the log is flushed at each), between two of them
            while not (ckpt.is_file() and work_log.is_file() and len(work_log.read_text().splitlines()) > 20):
                assert proc.poll() is None, "training ended before it could be killed: raise ITERATIONS"
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.002)
            time.sleep(0.013)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "training had finished before the kill: raise ITERATIONS"
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=True)["iteration"]
    assert 0 < killed_at < ITERATIONS

    # The same command again: resumes, finishes, cleans up.
    rerun = eps(*argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {ckpt} at iteration {killed_at}" in rerun.stdout
    assert not ckpt.exists() and not leftovers(out.parent)

    got = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    want = torch.load(reference, map_location="cpu", weights_only=True)["state_dict"]
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the uninterrupted run"
    log = read_log(out.parent / "train_log.csv")
    assert [int(r["iteration"]) for r in log] == list(range(1, ITERATIONS + 1))
    assert without_time(log) == without_time(read_log(reference.parent / "train_log.csv"))
