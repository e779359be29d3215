"""Data-parallel classifier training (`gpus: N` > 1): DistributedDataParallel on CPU with gloo.

Two ranks each take half of every global batch; with the small backbone (GroupNorm, no batch
statistics) that is the same computation as one process on the whole batch, so the weights
agree up to float rounding. Rank 0 alone writes the outputs.
"""

from __future__ import annotations

import csv

import pytest
import torch

from eps.config import TRAIN_DEFAULTS
from eps.errors import EpsError
from eps.train import train_classifier
from eps.training import RankPositions


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("EPS_THREADS", "1")


@pytest.fixture
def tiny(tiny_world) -> dict:
    return tiny_world


def params(**overrides) -> dict:
    p = dict(TRAIN_DEFAULTS)
    p.update(backbone="small", iterations=4, batch_size=4, crop=32, resize_long=[32, 48],
             checkpoint_every=2, device="cpu", num_workers=0, seed=0, momentum=0.9)
    p.update(overrides)
    return p


def train(tiny, out_dir, **overrides):
    return train_classifier(tiny["index"], out_dir / "classifier.pt", params(**overrides), saliency_shards=[tiny["sal"]])


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rank_positions_cover_each_global_batch_once():
    per_rank = [list(RankPositions(2, 5, 6, r, 3)) for r in range(3)]
    assert [len(p) for p in per_rank] == [6, 6, 6]
    for step in range(3):  # steps 2, 3, 4 of the run
        batch = [p for r in range(3) for p in per_rank[r][step * 2:(step + 1) * 2]]
        assert batch == list(range((2 + step) * 6, (3 + step) * 6))


def test_two_ranks_match_one_process(tiny, tmp_path):
    one = train(tiny, tmp_path / "one")
    two = train(tiny, tmp_path / "two", gpus=2)
    assert two.stat().st_size > 0
    assert (two.parent / "classifier.json").is_file()
    assert not (two.parent / "checkpoints" / "last.pt").exists()  # finished runs leave no checkpoint
    log1, log2 = read_log(one.parent / "train_log.csv"), read_log(two.parent / "train_log.csv")
    assert [r["iteration"] for r in log2] == ["1", "2", "3", "4"]
    for a, b in zip(log1, log2):
        assert a["lr"] == b["lr"]
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        assert float(a["loss_sal"]) == pytest.approx(float(b["loss_sal"]), abs=1e-5)
    w1 = torch.load(one, map_location="cpu", weights_only=True)["state_dict"]
    w2 = torch.load(two, map_location="cpu", weights_only=True)["state_dict"]
    assert w1.keys() == w2.keys()  # no "module." prefix: the file loads as a single-process one
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), key


def test_batch_must_split_evenly(tiny, tmp_path):
    with pytest.raises(EpsError, match="batch_size: 4 does not split evenly over gpus: 3"):
        train(tiny, tmp_path, gpus=3)
    assert not (tmp_path / "checkpoints").exists()


def test_explicit_single_gpu_device_is_refused(tiny, tmp_path):
    with pytest.raises(EpsError, match="device"):
        train(tiny, tmp_path, gpus=2, device="cuda:1")


def test_bad_gpus_value(tiny, tmp_path):
    with pytest.raises(EpsError, match="gpus: must be an integer"):
        train(tiny, tmp_path, gpus=0)


def test_two_ranks_resume_a_checkpoint_exactly_where_it_stopped(tiny, tmp_path, kill_at_checkpoint, capfd):
    """A run interrupted after its iteration-2 checkpoint, resumed with gpus: 2, ends where an
    uninterrupted run ends (gpus does not change the sample sequence, so the checkpoint is valid)."""
    ref = train(tiny, tmp_path / "ref")
    kill = kill_at_checkpoint(2)  # checkpoints at iterations 2 and 4: dies at 4
    run_dir = tmp_path / "run"
    with pytest.raises(kill.error):
        train(tiny, run_dir)
    kill.restore()
    assert kill.calls == [2, 4]
    capfd.readouterr()
    train(tiny, run_dir, gpus=2)
    assert "resuming from" in capfd.readouterr().out  # printed by rank 0 only
    rows = read_log(run_dir / "train_log.csv")
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4"]
    w1 = torch.load(ref, map_location="cpu", weights_only=True)["state_dict"]
    w2 = torch.load(run_dir / "classifier.pt", map_location="cpu", weights_only=True)["state_dict"]
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), key
