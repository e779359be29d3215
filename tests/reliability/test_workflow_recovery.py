"""The workflow under a crash, and its determinism (slow: real Snakemake runs of a tiny config).

- kill -9 of Snakemake and its jobs while `infer_cams` writes a shard: finished shards are kept
  (same mtime), the half-written shard only ever exists as `<name>.tmp`, which Snakemake does
  not take for the output; after `--unlock`, a `--rerun-incomplete` run redoes only the
  unfinished shard(s) and ends with the masks of an uninterrupted run.
- two runs of the same config give identical pseudo-masks (HDF5 and PNG).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import torch

import tiny_workflow

from .helpers import ROOT, leftovers, subprocess_env

pytestmark = pytest.mark.slow

VARIANT = "cam"
RESULTS = Path("results") / "synthetic"
CAMS = RESULTS / VARIANT / "cams" / "train"
MASKS = RESULTS / VARIANT / "masks" / "train"
TARGETS = [str(MASKS / "png")]  # synth, index, train_classifier, 2 x infer_cams, 2 x pseudo_masks, export


def tiny_config(directory: Path) -> Path:
    """tests/tiny.yaml with 12 + 2 images, a CAM classifier of a few iterations on the small
    backbone, and many inference scales so that infer_cams lasts long enough to be killed."""
    return tiny_workflow.tiny_config(
        directory / "tiny.yaml", ROOT / "config.yaml",
        synth={"num_train": 12, "num_val": 2, "size": 40, "seed": 1}, device="cpu",
        classifier__backbone="small", classifier__iterations=4, classifier__crop=40,
        classifier__resize_long=[36, 44],
        variants={VARIANT: {"loss": "cam"}},
        infer__scales=[1.0, 2.0, 3.0, 4.0, 5.0], infer__flip=True, infer__batch_size=1)


def snakemake_argv(directory: Path, *extra) -> list[str]:
    """The arguments after `python -m snakemake`."""
    # targets first: --configfile takes several values
    return [*TARGETS, "--cores", "1", "-s", str(ROOT / "Snakefile"),
            "--directory", str(directory), *extra, "--configfile", str(directory / "tiny.yaml")]


def snakemake(directory: Path, *extra, timeout=900) -> subprocess.CompletedProcess:
    return tiny_workflow.snakemake(snakemake_argv(directory, *extra), timeout=timeout, env=subprocess_env())


def read_shards(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(folder.glob("shard-*.h5")):
        with h5py.File(shard) as f:
            for key in f:
                out[key] = f[key][()]
    return out


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> job count."""
    table = dry_run_output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)
            if m.group(1) != "total"}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """One uninterrupted run of the tiny config."""
    directory = tmp_path_factory.mktemp("clean")
    tiny_config(directory)
    proc = snakemake(directory)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return directory


def test_two_runs_give_identical_pseudo_masks(clean_run, tmp_path):
    tiny_config(tmp_path)
    proc = snakemake(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = read_shards(clean_run / MASKS), read_shards(tmp_path / MASKS)
    assert first and first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    pngs = sorted(p.name for p in (clean_run / MASKS / "png").glob("*.png"))
    assert pngs == sorted(p.name for p in (tmp_path / MASKS / "png").glob("*.png")) and pngs
    for name in pngs:
        assert (clean_run / MASKS / "png" / name).read_bytes() == (tmp_path / MASKS / "png" / name).read_bytes()
    a = torch.load(clean_run / RESULTS / VARIANT / "classifier.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / RESULTS / VARIANT / "classifier.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL Snakemake and every process it started (all in the session it leads)."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything forked meanwhile
    except ProcessLookupError:
        pass
    proc.wait()
    for pid in family[1:]:  # the jobs must be gone too: they would otherwise finish the shard
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
            time.sleep(0.01)


def test_kill_9_during_infer_cams_reruns_only_the_unfinished_shard(clean_run, tmp_path):
    tiny_config(tmp_path)
    cams = tmp_path / CAMS
    with open(tmp_path / "killed.log", "w") as log:
        proc = tiny_workflow.start_snakemake(snakemake_argv(tmp_path), log, env=subprocess_env(),
                                             start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            # wait until one shard is finished and another one is being written
            while not (list(cams.glob("shard-*.h5")) and list(cams.glob("shard-*.h5.tmp"))):
                assert proc.poll() is None, "the run ended before infer_cams could be killed"
                assert time.monotonic() < deadline, "infer_cams never started"
                time.sleep(0.003)
        finally:
            kill_tree(proc)

    finished = {p.name: p.stat().st_mtime_ns for p in cams.glob("shard-*.h5")}
    half = [p for p in cams.iterdir() if p.name.endswith(".h5.tmp")]
    assert len(finished) == 1 and len(half) == 1, sorted(os.listdir(cams))
    unfinished = half[0].name[: -len(".tmp")]
    assert not (cams / unfinished).exists()  # the half-written shard never had its final name

    from eps.data.io import open_h5

    for name in finished:  # every .h5 present is complete and readable
        with open_h5(cams / name, "eps.cams", "synthetic") as f:
            assert len(f) == 6

    # Snakemake 9 keeps the lock of a killed run: --unlock, then --rerun-incomplete.
    unlock = snakemake(tmp_path, "--unlock")
    assert unlock.returncode == 0, unlock.stdout[-2000:] + unlock.stderr[-2000:]
    plan = snakemake(tmp_path, "--rerun-incomplete", "-n")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    counts = job_counts(plan.stdout + plan.stderr)
    assert counts.get("infer_cams") == 1, counts  # only the unfinished shard
    assert not {"synth", "index", "train_classifier"} & counts.keys(), counts
    assert f"Missing output files: {CAMS / unfinished}" in plan.stdout + plan.stderr  # the .tmp is no output

    rerun = snakemake(tmp_path, "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for name, mtime in finished.items():
        assert (cams / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert (cams / unfinished).is_file()
    assert not leftovers(tmp_path / RESULTS)

    # recovered = uninterrupted
    got, want = read_shards(tmp_path / MASKS), read_shards(clean_run / MASKS)
    assert got.keys() == want.keys() and len(got) == 12
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    again = snakemake(tmp_path, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
