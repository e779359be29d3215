"""GPU slots (eps.gpus): concurrent jobs claim distinct devices, a slot frees when its process
exits, `choose_device("auto")` claims one only with several GPUs. No GPU needed: the device
count is a parameter, and torch's CUDA queries are stubbed for choose_device."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import eps.gpus as gpus
from eps.config import choose_device
from eps.errors import EpsError

# A job: claim `n` of `count` slots, print them, hold them until the file `go` exists.
CLAIMER = """
import os, sys, time
from eps.gpus import claim_devices
count, n, folder, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
print(" ".join(map(str, claim_devices(count, n, folder, wait=float(sys.argv[5])))), flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
"""


def start(count, n, folder, go, wait=0.0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(count), str(n), str(folder), str(go), str(wait)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(autouse=True)
def _no_held_slots():
    gpus.release_all()
    yield
    gpus.release_all()


def test_concurrent_processes_get_distinct_slots(tmp_path):
    go = tmp_path / "go"
    procs = [start(4, 1, tmp_path / "locks", go) for _ in range(4)]
    try:
        slots = [int(p.stdout.readline()) for p in procs]
        assert sorted(slots) == [0, 1, 2, 3]
        # every slot is taken: a fifth job finds none (and says so in one line)
        fifth = start(4, 1, tmp_path / "locks", go)
        _, err = fifth.communicate(timeout=30)
        assert fifth.returncode != 0 and "no free GPU slot among 4" in err
    finally:
        go.touch()
        for p in procs:
            p.communicate(timeout=30)
    assert all(p.returncode == 0 for p in procs)


def test_multi_slot_claims_do_not_overlap(tmp_path):
    go = tmp_path / "go"
    procs = [start(4, 2, tmp_path / "locks", go) for _ in range(2)]
    try:
        claimed = [set(map(int, p.stdout.readline().split())) for p in procs]
    finally:
        go.touch()
        for p in procs:
            p.communicate(timeout=30)
    assert [len(c) for c in claimed] == [2, 2] and claimed[0] | claimed[1] == {0, 1, 2, 3}


def test_a_slot_frees_when_its_process_exits_and_waiters_get_it(tmp_path):
    go = tmp_path / "go"
    holder = start(1, 1, tmp_path / "locks", go)
    assert holder.stdout.readline().strip() == "0"
    with pytest.raises(EpsError, match="no free GPU slot"):
        gpus.claim_device(1, tmp_path / "locks", wait=0.2)
    # a waiting claimer gets the slot as soon as the holder exits (however it exits)
    waiter = start(1, 1, tmp_path / "locks", tmp_path / "go2", wait=30)
    time.sleep(0.3)
    holder.kill()
    holder.communicate(timeout=30)
    assert waiter.stdout.readline().strip() == "0"
    (tmp_path / "go2").touch()
    waiter.communicate(timeout=30)


def test_a_process_keeps_its_slot_across_calls(tmp_path):
    first = gpus.claim_device(3, tmp_path)
    assert gpus.claim_device(3, tmp_path) == first
    assert len(gpus.claim_devices(3, 2, tmp_path)) == 2 and first in gpus.claim_devices(3, 2, tmp_path)


def test_bad_requests(tmp_path):
    with pytest.raises(EpsError, match="gpus: 3 requested but only 2"):
        gpus.claim_devices(2, 3, tmp_path)
    with pytest.raises(EpsError, match="device count"):
        gpus.claim_devices(0, 1, tmp_path)


def test_lock_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EPS_GPU_LOCK_DIR", str(tmp_path / "x"))
    assert gpus.lock_dir() == tmp_path / "x"
    monkeypatch.delenv("EPS_GPU_LOCK_DIR")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert gpus.lock_dir().name.startswith("eps-gpu-locks-")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")  # a SLURM job's devices are its own: slots per job
    assert gpus.lock_dir().name.endswith("-slurm-1234")


@pytest.mark.parametrize("count", [0, 1, 3])
def test_choose_device_auto_claims_only_with_several_gpus(tmp_path, monkeypatch, count):
    monkeypatch.setenv("EPS_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    device = choose_device("auto")
    if count == 0:
        assert device == torch.device("cpu")
    elif count == 1:
        assert device == torch.device("cuda") and not list(tmp_path.iterdir())
    else:
        assert device.type == "cuda" and 0 <= device.index < count
        assert (tmp_path / f"gpu-{device.index}.lock").read_text().strip() == str(os.getpid())
        assert choose_device("cuda:2") == torch.device("cuda:2")  # explicit: claims nothing more
        assert sorted(gpus._HELD) == [device.index]
