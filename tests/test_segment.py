"""Segmenters: shapes and output stride, frozen BN, training on pseudo-masks (ignore 255,
exact resume), init metadata, multi-scale prediction and the VOC server layout.

A 12-image synthetic world of 40 px images with its ground truth as pseudo-masks and the
small CPU segmenter; the whole module runs in well under a minute on one core.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from eps.errors import EpsError
from eps.models import build_segmenter
from eps.models.deeplab import SEGMENTERS, load_segmenter, sha256_file
from eps.predict import multiscale_probs, predict, server_dir
from eps.segment import (IGNORE, SEGMENT_DEFAULTS, SegSamples, augment_pair, epoch_items, repeat_factors,
                         segmentation_loss, train_segmenter)

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("EPS_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_world) -> dict:
    """The shared tiny synthetic world; its ground truth stands for pseudo-masks."""
    return tiny_world


def params(**overrides) -> dict:
    p = dict(SEGMENT_DEFAULTS)
    p.update(model="deeplab_small", iterations=4, batch_size=2, crop=32, scale_range=[0.8, 1.2],
             checkpoint_every=2, device="cpu", num_workers=0, seed=0)
    p.update(overrides)
    return p


def train(tiny, out_dir: Path, masks=None, **overrides) -> Path:
    return train_segmenter(tiny["index"], masks or tiny["masks"], out_dir / "model.pt", params(**overrides))


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- networks

@pytest.mark.parametrize("name", SEGMENTERS)
def test_networks_give_logits_at_their_output_stride(name):
    torch.manual_seed(0)
    model = build_segmenter(name, 21).eval()
    stride = 16 if "efficientnet_lite0" in name else 8
    assert model.output_stride == stride
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 21, 64 // stride, 64 // stride)
    assert torch.isfinite(out).all()
    groups = model.get_parameter_groups()
    head = {id(p) for p in model.head.parameters()}
    assert groups[2] and all(id(p) in head for p in groups[2] + groups[3])
    assert all(id(p) not in head for p in groups[0] + groups[1])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g) for g in groups) == n_trainable


def test_resnet101_keeps_batchnorm_frozen():
    model = build_segmenter("deeplab_v2_resnet101", 3).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bns[0].running_mean)
    assert len(model.head.branches) == 4
    assert [b.dilation for b in model.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]


def test_unknown_model_is_an_error():
    with pytest.raises(EpsError, match="unknown model"):
        build_segmenter("deeplab_v3", 3)


# ---------------------------------------------------------------------------- loss and augmentation

def test_ignore_label_255_is_really_ignored():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    label = torch.randint(0, 4, (2, 8, 8))
    label[:, :, :3] = IGNORE
    loss = segmentation_loss(logits, label)
    valid = label != IGNORE
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], label[valid])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[:, :, :, :3].abs().max() == 0
    assert logits.grad[:, :, :, 3:].abs().max() > 0
    # changing the logits under ignored pixels does not change the loss
    other = logits.detach().clone()
    other[:, :, :, :3] = 100.0
    torch.testing.assert_close(segmentation_loss(other, label), expected.detach())
    # an all-ignored batch gives 0, not nan
    all_void = torch.full((2, 8, 8), IGNORE)
    assert segmentation_loss(logits, all_void).item() == 0.0


def test_augment_pads_the_label_with_255_and_keeps_image_and_label_aligned():
    rng_image = np.zeros((20, 30, 3), np.uint8)
    rng_image[:, 10:] = 255
    label = np.zeros((20, 30), np.uint8)
    label[:, 10:] = 3
    for seed in range(5):
        image, lab = augment_pair(rng_image, label, np.random.default_rng(seed), [1.0, 1.0], 40)
        assert image.shape == (3, 40, 40) and lab.shape == (40, 40) and lab.dtype == np.int64
        pad = lab == IGNORE
        assert pad.sum() == 40 * 40 - 20 * 30
        assert np.all(image[:, pad] == 0)  # the mean after normalisation
        bright = image[0] > 1.0
        assert np.array_equal(bright, lab == 3)


# ---------------------------------------------------------------------------- training

def test_a_few_steps_reduce_the_loss(tiny, tmp_path):
    out = train(tiny, tmp_path, iterations=40, batch_size=4, lr=0.02, checkpoint_every=40)
    losses = [float(r["loss"]) for r in read_log(tmp_path / "train_log.csv")]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["model"] == "deeplab_small" and meta["num_classes"] == NUM_CLASSES + 1
    assert meta["init"] == "scratch" and meta["init_pretraining"] == "none"
    assert not (tmp_path / "checkpoints").exists()  # a finished run leaves no checkpoint folder
    model, _ = load_segmenter(out)
    assert not model.training


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path, kill_at_checkpoint, capsys):
    n = 6
    ref = train(tiny, tmp_path / "ref", iterations=n)
    kill = kill_at_checkpoint(2)
    with pytest.raises(kill.error):
        train(tiny, tmp_path / "run", iterations=n)
    kill.restore()
    assert kill.calls == [2, 4]
    with open(tmp_path / "run" / "checkpoints" / "train_log.csv", "a") as f:
        f.write("5,0.1")  # a partial row of a killed process
    capsys.readouterr()
    out = train(tiny, tmp_path / "run", iterations=n)
    assert "resuming from" in capsys.readouterr().out
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = read_log(tmp_path / "run" / "train_log.csv")
    assert [int(r["iteration"]) for r in rows] == list(range(1, n + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(tmp_path / "ref" / "train_log.csv")]


def test_checkpoint_of_other_pseudo_masks_is_not_resumed(tiny, tmp_path, kill_at_checkpoint, capsys):
    import shutil

    other = tmp_path / "other_masks"
    shutil.copytree(tiny["masks"], other)
    first = sorted(other.glob("*.png"))[0]
    from eps.data.io import write_index_png
    write_index_png(first, np.zeros(np.asarray(Image.open(first)).shape, np.uint8))

    kill = kill_at_checkpoint(1, save_first=True)
    with pytest.raises(kill.error):
        train(tiny, tmp_path / "run", iterations=4)
    kill.restore()
    capsys.readouterr()
    train(tiny, tmp_path / "run", masks=other, iterations=4)
    assert "ignoring" in capsys.readouterr().out


def test_bad_masks_and_parameters_fail_with_one_line(tiny, tmp_path):
    from eps.data.io import write_index_png

    bad = tmp_path / "bad"
    bad.mkdir()
    for png in tiny["masks"].glob("*.png"):
        mask = np.asarray(Image.open(png)).copy()
        mask[0, 0] = 77
        write_index_png(bad / png.name, mask)
    with pytest.raises(EpsError, match="mask value 77"):
        train(tiny, tmp_path / "a", masks=bad)
    with pytest.raises(EpsError, match="no pseudo-mask"):
        train(tiny, tmp_path / "b", masks=tmp_path)
    with pytest.raises(EpsError, match="init_pretraining"):
        train(tiny, tmp_path / "c", init_pretraining="coco")
    with pytest.raises(EpsError, match="'classifier' needs the classifier file"):
        train(tiny, tmp_path / "c", init_pretraining="classifier")
    with pytest.raises(EpsError, match="not found"):
        train(tiny, tmp_path / "d", weights=str(tmp_path / "missing.pth"), init_pretraining="imagenet")
    junk = tmp_path / "junk.pth"
    torch.save({"something.weight": torch.zeros(3)}, junk)
    with pytest.raises(EpsError, match="do not fit") as err:
        train(tiny, tmp_path / "e", weights=str(junk), init_pretraining="imagenet")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "a" / "model.pt").exists()


def test_init_from_a_weights_file_is_recorded(tiny, tmp_path):
    from eps.models import build_classifier

    clf = build_classifier("small", NUM_CLASSES)
    path = tmp_path / "classifier.pt"
    torch.save({"state_dict": clf.state_dict(), "meta": {"backbone": "small"}}, path)
    out = train(tiny, tmp_path / "run", iterations=1, lr=1e-12, weights=str(path), init_pretraining="imagenet")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["init"] == {"file": str(path), "sha256": sha256_file(path)}
    assert meta["init_pretraining"] == "imagenet"
    got = weights(out)
    torch.testing.assert_close(got["backbone.stage1.0.weight"], clf.state_dict()["stage1.0.weight"])


def test_torchvision_resnet101_state_dict_loads_into_the_backbone(tmp_path):
    from torchvision.models import resnet101

    from eps.models.deeplab import load_backbone

    ref = resnet101(weights=None)
    path = tmp_path / "resnet101.pth"
    torch.save(ref.state_dict(), path)
    model = build_segmenter("deeplab_v1_resnet101", 3)
    load_backbone(model, path)
    torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)


def _deeplab_caffe_name(key: str) -> str:
    """torchvision ResNet-101 name -> the DeepLab (Caffe-converted) name of the COCO init."""
    if key.startswith(("conv1.", "bn1.")):
        return f"layer1.conv1.{'conv' if key.startswith('conv1') else 'bn'}.{key.split('.', 1)[1]}"
    layer, block, unit, *rest = key.split(".")
    units = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv", "bn2": "conv3x3.bn",
             "conv3": "increase.conv", "bn3": "increase.bn"}
    if unit == "downsample":
        unit = "shortcut.conv" if rest[0] == "0" else "shortcut.bn"
        rest = rest[1:]
    else:
        unit = units[unit]
    return f"base.layer{int(layer[5:]) + 1}.block{int(block) + 1}.{unit}.{'.'.join(rest)}"


def test_a_deeplab_coco_initialisation_runs_in_the_caffe_layout(tmp_path):
    from eps.models.deeplab import CAFFE_MEAN_BGR, load_backbone, read_init, to_caffe_input
    from eps.data.imagenet import normalize

    ref = build_segmenter("deeplab_v2_resnet101", 3).backbone.state_dict()
    caffe_file = tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth"
    state = {_deeplab_caffe_name(k): v.half() for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    state["base.aspp.c0.weight"] = torch.zeros(91, 2048, 3, 3, dtype=torch.half)  # a COCO head: dropped
    torch.save(state, caffe_file)
    weights = read_init(caffe_file)
    assert weights.layout == "deeplab-resnet101"
    model = build_segmenter("deeplab_v2_resnet101", 3, caffe=True)
    load_backbone(model, caffe_file, weights)
    torch.testing.assert_close(model.backbone.layer3[5].conv2.weight, ref["layer3.5.conv2.weight"].half().float())
    bb = model.backbone
    assert bb.layer2[0].conv1.stride == (2, 2) and bb.layer2[0].conv2.stride == (1, 1)
    assert {b.conv2.dilation for b in bb.layer3} == {(2, 2)} and {b.conv2.dilation for b in bb.layer4} == {(4, 4)}
    assert bb.maxpool.ceil_mode
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape[:2] == (1, 3)
    # the network sees BGR 0..255 minus the Caffe mean
    image = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    got = to_caffe_input(torch.from_numpy(normalize(image))[None])[0].numpy()
    want = image[..., ::-1].transpose(2, 0, 1).astype(np.float32) - np.array(CAFFE_MEAN_BGR, np.float32)[:, None, None]
    np.testing.assert_allclose(got, want, atol=1e-3)
    with pytest.raises(EpsError, match="ResNet-101 only"):
        build_segmenter("deeplab_small", 3, caffe=True)


# ---------------------------------------------------------------------------- prediction

@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    torch.set_num_threads(1)
    return train_segmenter(tiny["index"], tiny["masks"], out / "model.pt",
                           params(iterations=30, batch_size=4, lr=0.02, checkpoint_every=30))


def test_multiscale_probs_average_softmax_over_scales_and_flips(trained):
    model, _ = load_segmenter(trained)
    x = torch.randn(2, 3, 40, 40)
    probs = multiscale_probs(model, x, [1.0], flip=False)
    assert probs.shape == (2, NUM_CLASSES + 1, 40, 40)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 40, 40))
    with torch.no_grad():
        direct = torch.softmax(torch.nn.functional.interpolate(model(x), size=(40, 40), mode="bilinear",
                                                               align_corners=False), 1)
    torch.testing.assert_close(probs, direct)
    both = multiscale_probs(model, x, [1.0, 0.5], flip=True)
    torch.testing.assert_close(both.sum(1), torch.ones(2, 40, 40))


def test_predict_writes_masks_crf_and_server_layout_pngs(tiny, trained, tmp_path, capsys):
    from eps.cli import main
    from eps.data.index import read_index, split_rows

    out = tmp_path / "pred.h5"
    crf_out = tmp_path / "pred_crf.h5"
    server = tmp_path / "server"
    code = main(["predict", "--index", str(tiny["index"]), "--model", str(trained), "--split", "val",
                 "--shard", "1-of-1", "--params", '{"scales": [1.0, 0.75], "device": "cpu"}',
                 "--crf", '{"preset": "deeplab"}', "--crf-out", str(crf_out), "--server-layout", str(server),
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "mIoU" in capsys.readouterr().out
    ids = list(split_rows(read_index(tiny["index"]), "val")["id"])
    target = server / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert target == server_dir(server)
    pngs = sorted(target.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(ids)
    with h5py.File(out) as f, h5py.File(crf_out) as g:
        assert f.attrs["format"] == "eps.masks" and g.attrs["format"] == "eps.masks"
        assert sorted(f.keys()) == sorted(ids) == sorted(g.keys())
        for p in pngs:
            img = Image.open(p)
            assert img.mode == "P"
            mask = np.asarray(img)
            assert mask.shape == (40, 40) and mask.max() <= NUM_CLASSES
            np.testing.assert_array_equal(mask, g[p.stem][()])  # the server gets the final (CRF) masks


def test_predict_shards_cover_the_split_and_refuse_other_datasets(tiny, trained, tmp_path):
    p = {"scales": [1.0], "flip": False, "batch_size": 3, "device": "cpu", "amp": False}
    seen = []
    for i in (1, 2):
        shard = predict(tiny["index"], trained, tmp_path / f"s{i}.h5", "val", f"{i}-of-2", p)
        with h5py.File(shard) as f:
            seen += list(f.keys())
    assert len(seen) == 4 and len(set(seen)) == 4
    with pytest.raises(EpsError, match="not an eps segmenter"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
        predict(tiny["index"], tmp_path / "bad.pt", tmp_path / "x.h5", "val", "1-of-1", p)


def test_head_lr_mult_sets_the_heads_learning_rate():
    from eps.training import make_optimizer

    model = build_segmenter("deeplab_small", NUM_CLASSES + 1)
    for mult, expected in ((10, [1, 2, 10, 20]), (1, [1, 2, 1, 2])):
        optimizer = make_optimizer(model, {**SEGMENT_DEFAULTS, "lr": 0.01, "head_lr_mult": mult})
        assert [round(g["lr"] / 0.01, 6) for g in optimizer.param_groups] == expected


def test_repeat_factors_follow_the_rarest_label():
    # class 0 in 8 of 10 photos, class 1 in 2, class 2 in 1; one photo without labels
    labels = [[0]] * 7 + [[0, 1], [1, 2], []]
    factors = repeat_factors(labels, 0.4)
    assert factors[:7] == pytest.approx([1.0] * 7)  # f = 0.8 > t: once
    assert factors[7] == pytest.approx(np.sqrt(0.4 / 0.2))  # the rarer of its two labels
    assert factors[8] == pytest.approx(np.sqrt(0.4 / 0.1))
    assert factors[9] == 1.0
    assert (repeat_factors(labels, 0.0) == 1).all()


def test_epoch_items_repeat_rare_photos_and_stay_fixed():
    factors = np.array([1.0, 1.0, 2.0, 2.5] * 50)
    items = epoch_items(factors, seed=0)
    counts = np.bincount(items, minlength=len(factors))
    assert set(counts[0::4]) == {1} and set(counts[2::4]) == {2}
    assert set(counts[3::4]) == {2, 3} and 0.3 < (counts[3::4] == 3).mean() < 0.7  # frac 0.5 drawn once
    assert (epoch_items(factors, seed=0) == items).all()
    other = epoch_items(factors, seed=1)
    assert len(other) != len(items) or not (other == items).all()


def test_segsamples_epoch_holds_the_repeats(tmp_path):
    params = {**SEGMENT_DEFAULTS, "repeat_threshold": 1.0, "crop": 8, "scale_range": [1.0, 1.0]}
    images, masks = [], []
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
        Image.fromarray(np.full((8, 8), int(k == 3), np.uint8)).save(tmp_path / f"{k}m.png")
        images.append(tmp_path / f"{k}.png")
        masks.append(tmp_path / f"{k}m.png")
    labels = [[], [], [], [1]]  # class 1 in a quarter of the photos: factor sqrt(1 / 0.25) = 2 exactly
    samples = SegSamples(images, masks, 2, params, labels=labels)
    assert samples.num_items == 5
    assert list(np.bincount(samples.items)) == [1, 1, 1, 2]
    # one epoch reads photo 3 (the only one whose mask is 1) twice, every other photo once
    ones = [bool((samples[p]["label"] == 1).all()) for p in range(samples.num_items)]
    assert sum(ones) == 2
    assert SegSamples(images, masks, 2, {**params, "repeat_threshold": 0.0}, labels=labels).num_items == 4
    assert torch.equal(samples[0]["image"], samples[0]["image"])  # a pure function of the position


def test_repeat_threshold_outside_zero_one_is_refused():
    from eps.segment import check_train_params

    with pytest.raises(EpsError, match="repeat_threshold"):
        check_train_params({**SEGMENT_DEFAULTS, "repeat_threshold": 2})
