"""Classifier training: outputs, exact resume, determinism, poly lr, failures, augmentation.

Everything runs on a 12-image synthetic world of 40 px images with the small backbone and
a handful of iterations, so the whole module takes a few seconds on one CPU core.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eps.train as train_mod
from eps.config import TRAIN_DEFAULTS
from eps.errors import EpsError
from eps.data.imagenet import MEAN, STD
from eps.models.classifier import load_classifier
from eps.train import augment, train_classifier
from eps.training import make_optimizer, set_poly_lr

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("EPS_THREADS", "1")  # train_classifier calls set_threads()


@pytest.fixture
def tiny(tiny_world) -> dict:
    return tiny_world


def params(**overrides) -> dict:
    p = dict(TRAIN_DEFAULTS)
    p.update(backbone="small", iterations=4, batch_size=2, crop=32, resize_long=[32, 48],
             checkpoint_every=2, device="cpu", num_workers=0, seed=0)
    p.update(overrides)
    return p


def train(tiny, out_dir: Path, saliency=True, **overrides) -> Path:
    shards = [tiny["sal"]] if saliency else ()
    return train_classifier(tiny["index"], out_dir / "classifier.pt", params(**overrides), saliency_shards=shards)


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def losses(rows) -> list[tuple]:
    return [(r["iteration"], r["loss"], r["loss_cls"], r["loss_sal"], r["lr"]) for r in rows]


# ---------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("loss", ["cam", "eps"])
def test_training_writes_classifier_meta_and_log(tiny, tmp_path, loss):
    out = train(tiny, tmp_path, loss=loss, saliency=(loss == "eps"))
    assert out == tmp_path / "classifier.pt" and out.is_file()

    meta = json.loads((tmp_path / "classifier.json").read_text())
    assert meta["background"] is (loss == "eps")
    assert meta["num_classes"] == NUM_CLASSES and meta["dataset"] == "t"
    assert meta["params"]["loss"] == loss

    rows = read_log(tmp_path / "train_log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    for r in rows:
        values = [float(r[k]) for k in ("loss", "loss_cls", "loss_sal", "lr")]
        assert all(math.isfinite(v) for v in values)
        assert float(r["loss"]) == pytest.approx(float(r["loss_cls"]) + float(r["loss_sal"]), abs=2e-6)
        if loss == "cam":
            assert float(r["loss_sal"]) == 0.0
        else:
            assert float(r["loss_sal"]) > 0.0
    # a finished run leaves no checkpoint folder: nothing to be "resumed" by a later, different run
    assert not (tmp_path / "checkpoints").exists()
    assert not list(tmp_path.rglob("*.tmp"))

    model, meta2 = load_classifier(out)
    k = NUM_CLASSES + 1 if loss == "eps" else NUM_CLASSES
    assert model.fc8.out_channels == k and model.background is (loss == "eps")
    assert meta2["classes"] == meta["classes"]
    assert not model.training
    assert_same_weights(model.state_dict(), weights(out))
    with torch.no_grad():
        logits, cam = model(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, k) and cam.shape == (1, k, 4, 4)


def test_fg_share_logged_and_selection_warmup_starts_naive(tiny, tmp_path):
    """selection_warmup: the first iterations of an adaptive run are exactly a naive run's."""
    naive = read_log(train(tiny, tmp_path / "naive", selection="naive").parent / "train_log.csv")
    warm = read_log(train(tiny, tmp_path / "warm", selection_warmup=2).parent / "train_log.csv")
    cold = read_log(train(tiny, tmp_path / "cold").parent / "train_log.csv")
    assert losses(warm[:2]) == losses(naive[:2])
    assert losses(cold[:1]) != losses(naive[:1])  # adaptive from the first iteration differs
    assert all(r["fg_share"] == "1.0000" for r in naive)
    # the adaptive share is logged during the warm-up too; a fresh head selects nothing
    assert float(cold[0]["fg_share"]) == 0.0
    assert all(0.0 <= float(r["fg_share"]) <= 1.0 for r in warm + cold)
    cam_rows = read_log(train(tiny, tmp_path / "cam", saliency=False, loss="cam").parent / "train_log.csv")
    assert all(r["fg_share"] == "" for r in cam_rows)


def test_load_classifier_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(EpsError, match="missing.pt"):
        load_classifier(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(EpsError, match="other.pt: not an eps classifier"):
        load_classifier(other)


# ---------------------------------------------------------------------------- resume / determinism


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path, kill_at_checkpoint, capsys):
    n = 6
    ref = train(tiny, tmp_path / "ref", iterations=n, checkpoint_every=2)

    # Interrupted run: the second checkpoint (iteration 4) never happens; the log already
    # holds rows 1..4 (flushed just before it), the checkpoint is the one of iteration 2.
    kill = kill_at_checkpoint(2)
    run_dir = tmp_path / "run"
    with pytest.raises(kill.error):
        train(tiny, run_dir, iterations=n, checkpoint_every=2)
    kill.restore()
    assert kill.calls == [2, 4]
    assert not (run_dir / "classifier.pt").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    log = run_dir / "checkpoints" / "train_log.csv"
    assert [r["iteration"] for r in read_log(log)] == ["1", "2", "3", "4"]
    # a killed process flushes its buffer mid-line: the log may end in a partial row
    with open(log, "a") as f:
        f.write("1")
    capsys.readouterr()

    train(tiny, run_dir, iterations=n, checkpoint_every=2)
    assert "resuming from" in capsys.readouterr().out

    assert_same_weights(weights(ref), weights(run_dir / "classifier.pt"))
    rows = read_log(run_dir / "train_log.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, n + 1))
    assert losses(rows) == losses(read_log(tmp_path / "ref" / "train_log.csv"))


def test_identical_runs_give_identical_weights_and_seed_matters(tiny, tmp_path):
    a = weights(train(tiny, tmp_path / "a", iterations=3))
    b = weights(train(tiny, tmp_path / "b", iterations=3))
    assert_same_weights(a, b)
    c = weights(train(tiny, tmp_path / "c", iterations=3, seed=1))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_of_another_run_is_not_resumed(tiny, tmp_path, kill_at_checkpoint, capsys):
    """A rerun after a parameter change (Snakemake reruns into the same folder) starts afresh."""
    kill = kill_at_checkpoint(1, save_first=True)
    with pytest.raises(kill.error):
        train(tiny, tmp_path / "run", iterations=4, lr=0.01)
    kill.restore()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    capsys.readouterr()

    changed = weights(train(tiny, tmp_path / "run", iterations=4, lr=0.02))
    assert "resuming" not in capsys.readouterr().out
    fresh = weights(train(tiny, tmp_path / "fresh", iterations=4, lr=0.02))
    assert_same_weights(changed, fresh)
    assert len(read_log(tmp_path / "run" / "train_log.csv")) == 4

    # a finished run, rerun with other parameters in the same folder, trains again too
    other = weights(train(tiny, tmp_path / "run", iterations=4, lr=0.02, seed=5))
    assert_same_weights(other, weights(train(tiny, tmp_path / "fresh5", iterations=4, lr=0.02, seed=5)))


# ---------------------------------------------------------------------------- optimiser


class FourGroups(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def get_parameter_groups(self):
        return [self.body.weight], [self.body.bias], [self.head.weight], [self.head.bias]


def test_parameter_groups_get_lr_2x_10x_20x_and_poly_decay():
    p = params(lr=0.01, weight_decay=5e-4)
    opt = make_optimizer(FourGroups(), p)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0, 5e-4, 0.0]

    assert set_poly_lr(opt, 0, 100, 0.9) == pytest.approx(0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    factor = 0.5 ** 0.9
    assert set_poly_lr(opt, 50, 100, 0.9) == pytest.approx(0.01 * factor)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([m * factor for m in (0.01, 0.02, 0.1, 0.2)])
    set_poly_lr(opt, 99, 100, 0.9)
    assert opt.param_groups[3]["lr"] == pytest.approx(0.2 * 0.01 ** 0.9)
    # the schedule is a function of the iteration, not of how often it was applied
    set_poly_lr(opt, 50, 100, 0.9)
    assert opt.param_groups[2]["lr"] == pytest.approx(0.1 * factor)


def test_real_classifier_parameters_land_in_their_lr_group():
    from eps.models import build_classifier

    model = build_classifier("small", 3, background=True)
    opt = make_optimizer(model, params(lr=0.01))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    assert lr_of[id(model.fc8.weight)] == pytest.approx(0.1)
    assert lr_of[id(model.stage1[0].weight)] == pytest.approx(0.01)
    assert lr_of[id(model.stage1[1].bias)] == pytest.approx(0.02)  # GroupNorm bias


# ---------------------------------------------------------------------------- failures


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    real_loss = train_mod.classification_loss
    calls = []

    def nan_at_third(logits, labels):
        calls.append(1)
        loss = real_loss(logits, labels)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "classification_loss", nan_at_third)
    with pytest.raises(EpsError, match=r"iteration 3\b") as info:
        train(tiny, tmp_path, loss="cam", saliency=False, iterations=6, checkpoint_every=2)
    assert "nan" in str(info.value)
    ckpt = tmp_path / "checkpoints" / "last.pt"
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["iteration"] == 2
    assert str(ckpt) in str(info.value)
    assert not (tmp_path / "classifier.pt").exists()
    assert not (tmp_path / "classifier.json").exists()
    assert not (tmp_path / "train_log.csv").exists()


def test_eps_loss_needs_saliency(tiny, tmp_path):
    with pytest.raises(EpsError, match="saliency"):
        train(tiny, tmp_path, loss="eps", saliency=False)
    assert not (tmp_path / "checkpoints").exists()  # a refused run leaves nothing behind


def test_unknown_background_class_and_loss_are_errors(tiny, tmp_path):
    with pytest.raises(EpsError, match="background_classes: unknown class 'rail'"):
        train(tiny, tmp_path, selection="predefined", background_classes=["rail"])
    with pytest.raises(EpsError, match="loss: unknown value 'bce'"):
        train(tiny, tmp_path, loss="bce")
    assert not (tmp_path / "classifier.pt").exists()


def test_saliency_shard_of_another_dataset_is_refused(tiny, tmp_path):
    from eps.data.io import atomic_h5

    foreign = tmp_path / "foreign.h5"
    with atomic_h5(foreign, "eps.saliency", "voc") as f:
        f.create_dataset("x", data=np.zeros((4, 4), np.uint8))
    with pytest.raises(EpsError, match="foreign.h5"):
        train_classifier(tiny["index"], tmp_path / "m" / "classifier.pt", params(), saliency_shards=[foreign])


# ---------------------------------------------------------------------------- augmentation


def _image_and_saliency(h=40, w=30, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    sal = image[:, :, 0].copy()  # saliency = red channel: image and map must move together
    return image, sal


def _red(out_image):
    """Undo the normalisation of channel 0 -> 0..255."""
    return (out_image[0] * STD[0] + MEAN[0]) * 255.0


@pytest.mark.parametrize("seed", range(6))
def test_augment_pads_with_zeros_and_keeps_image_and_saliency_aligned(seed):
    image, _ = _image_and_saliency()
    sal = np.full(image.shape[:2], 255, np.uint8)
    # long side 40 -> 24: image 24 x 18, smaller than the 32 px crop in both directions
    out, out_sal = augment(image, sal, np.random.default_rng(seed), (24, 24), 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert out_sal.shape == (32, 32) and out_sal.dtype == np.float32
    ys, xs = np.nonzero(out_sal)
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (24, 18)
    assert np.count_nonzero(out_sal) == 24 * 18 and np.all(out_sal[ys, xs] == 1.0)
    inside = np.zeros((32, 32), bool)
    inside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    assert np.all(out[:, ~inside] == 0)  # the image padding is zero too, at the same place


@pytest.mark.parametrize("seed", range(6))
def test_augment_crop_and_flip_move_image_and_saliency_together(seed):
    image, sal = _image_and_saliency()
    # no resize (long side stays 40), crop 24 < 30 and < 40: a pure crop, maybe flipped
    out, out_sal = augment(image, sal, np.random.default_rng(seed), (40, 40), 24)
    assert out.shape == (3, 24, 24) and out_sal.shape == (24, 24)
    assert 0.0 <= out_sal.min() and out_sal.max() <= 1.0
    np.testing.assert_allclose(_red(out), out_sal * 255.0, atol=1e-3)


def test_augment_is_a_function_of_the_rng_seed():
    image, sal = _image_and_saliency()
    a = augment(image, sal, np.random.default_rng([7, 3, 1]), (20, 60), 32)
    b = augment(image, sal, np.random.default_rng([7, 3, 1]), (20, 60), 32)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    others = [augment(image, sal, np.random.default_rng([7, s, 1]), (20, 60), 32)[0] for s in range(4, 10)]
    assert any(o.shape != a[0].shape or not np.array_equal(o, a[0]) for o in others)
    only_image, none = augment(image, None, np.random.default_rng([7, 3, 1]), (20, 60), 32)
    assert none is None and np.array_equal(only_image, a[0])
