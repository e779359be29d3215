"""CAM inference and pseudo-masks: the official mask rule, multi-scale + flip, shards, PNGs.

The dataset is a 12 + 4 image synthetic world of 40 px images; the classifiers are small
backbones trained for two iterations (their maps are arbitrary, the contracts are not).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eps.infer as infer_mod
from eps.config import INFER_DEFAULTS, TRAIN_DEFAULTS
from eps.errors import EpsError
from eps.infer import infer_cams, multiscale_cams, multiscale_parts
from eps.shards import export_pngs, mask_from_maps, pseudo_masks, read_cams, upsample_sum, write_cams

UNLABELLED = "syn_val_00001"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("EPS_THREADS", "1")


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory) -> dict:
    """The session's synthetic world with its own index (one val image stripped of its labels),
    saliency, and a CAM and an EPS classifier trained for two iterations."""
    from eps.data.build import build_index
    from eps.saliency import extract_shard
    from eps.train import train_classifier

    root = tmp_path_factory.mktemp("world")
    index = root / "index.csv"
    build_index({"name": "t", "type": "synthetic", "root": str(tiny_world["data"])}, index)
    df = pd.read_csv(index, dtype=str, keep_default_na=False)
    df.loc[df["id"] == UNLABELLED, "labels"] = ""  # an image with no labels: all background
    df.to_csv(index, index=False)
    sal = extract_shard(index, "precomputed", "1-of-1", root / "sal.h5")
    classifiers = {}
    for loss in ("cam", "eps"):
        p = dict(TRAIN_DEFAULTS, loss=loss, backbone="small", iterations=2, batch_size=2, crop=32,
                 resize_long=[32, 48], checkpoint_every=2, device="cpu")
        classifiers[loss] = train_classifier(index, root / loss / "classifier.pt", p, saliency_shards=[sal])
    ids = [line for line in (root / "ids" / "val.txt").read_text().split()]
    labels = {i: [int(c) for c in s.split()] for i, s in zip(df["id"], df["labels"])}
    rows = dict(zip(df["id"], df["image"]))
    return {"root": root, "index": index, "classifiers": classifiers, "ids": ids, "labels": labels, "rows": rows}


def infer_params(**overrides) -> dict:
    p = dict(INFER_DEFAULTS)
    p.update(scales=[1.0, 0.5], flip=True, batch_size=3, device="cpu")
    p.update(overrides)
    return p


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- mask rule


def official_rule(maps, classes, background, thr, num_classes=10):
    """evaluate/infer of the official code: a full (C+1, H, W) tensor, channel 0 = threshold."""
    fg = maps[:-1] if background else maps
    tensor = np.zeros((num_classes + 1,) + maps.shape[1:], np.float32)
    for i, c in enumerate(classes):
        tensor[c + 1] = fg[i]
    tensor[0] = thr
    return np.argmax(tensor, axis=0).astype(np.uint8)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("classes", [[3], [0, 9], [1, 4, 7], []])
def test_mask_from_maps_is_the_official_rule(background, classes):
    rng = np.random.default_rng(len(classes) + 10 * background)
    k = len(classes) + (1 if background else 0)
    maps = rng.random((k, 9, 11)).astype(np.float16)
    maps[:, 0, 0] = 0.05  # below the threshold everywhere: background
    for thr in (0.2, 0.5):
        got = mask_from_maps(maps, np.array(classes), background, thr)
        assert got.dtype == np.uint8 and got.shape == (9, 11)
        np.testing.assert_array_equal(got, official_rule(maps.astype(np.float32), classes, background, thr))
        assert got[0, 0] == 0
        assert set(np.unique(got)) <= {0} | {c + 1 for c in classes}
    if not classes:
        assert not mask_from_maps(maps, np.array(classes, np.int16), background, 0.2).any()
    if background:  # the background map never decides: only the threshold does
        flipped = maps.copy()
        flipped[-1] = 1 - flipped[-1]
        np.testing.assert_array_equal(mask_from_maps(flipped, np.array(classes), True, 0.2),
                                      mask_from_maps(maps, np.array(classes), True, 0.2))


# ---------------------------------------------------------------------------- multi-scale + flip


@pytest.mark.parametrize("background", [False, True])
def test_batched_inference_equals_per_image(background):
    from eps.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("small", 3, background=background).eval()
    images = torch.randn(3, 3, 40, 36)
    scales = [1.0, 0.5, 1.5]
    batched = multiscale_cams(model, images, scales, flip=True, background=background)
    assert batched.shape == (3, 4 if background else 3, 40, 36) and batched.dtype == torch.float32
    for i in range(3):
        single = multiscale_cams(model, images[i:i + 1], scales, flip=True, background=background)
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)
    if background:  # softmax per forward: each scale x flip contributes maps summing to 1
        torch.testing.assert_close(batched.sum(1), torch.full((3, 40, 36), 2.0 * len(scales)))
    else:  # the CAM baseline's maps are rectified, as the official forward_cam
        assert batched.min() >= 0


class KnownModel(torch.nn.Module):
    """forward_cam: a position-dependent, sign-changing function of the input, at input size."""

    def forward_cam(self, x):
        ramp = torch.linspace(-1.0, 2.0, x.shape[-1])
        return torch.stack([x[:, 0] * ramp, x[:, 1] - x[:, 2] * ramp], 1)


@pytest.mark.parametrize("background", [False, True])
def test_flip_adds_the_flipped_back_maps(background):
    model = KnownModel()
    x = torch.randn(2, 3, 8, 10)
    post = (lambda c: F.softmax(c, dim=1)) if background else F.relu
    expected = post(model.forward_cam(x)) + post(model.forward_cam(x.flip(-1))).flip(-1)
    got = multiscale_cams(model, x, [1.0], flip=True, background=background)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    plain = multiscale_cams(model, x, [1.0], flip=False, background=background)
    torch.testing.assert_close(plain, post(model.forward_cam(x)), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, 2 * plain, atol=1e-3)


def test_scales_are_summed_at_input_size():
    model = KnownModel()
    x = torch.randn(1, 3, 8, 10)
    both = multiscale_cams(model, x, [1.0, 2.0], flip=False, background=True)
    one = multiscale_cams(model, x, [1.0], flip=False, background=True)
    two = multiscale_cams(model, x, [2.0], flip=False, background=True)
    assert both.shape == (1, 2, 8, 10)
    torch.testing.assert_close(both, one + two)


# ---------------------------------------------------------------------------- CAM shards


def read_shard(path):
    """Attributes and {id: (array, attrs)}; CAM entries as their full-size maps (read_cams)."""
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        if attrs["format"] == "eps.cams":
            items = {}
            for k in f.keys():
                maps, classes, background = read_cams(f, k)
                items[k] = (maps, {"classes": classes, "background": background, **dict(f[k].attrs)})
        else:
            items = {k: (f[k][()], dict(f[k].attrs)) for k in f.keys()}
    return attrs, items


@pytest.mark.parametrize("loss,keep", [("cam", False), ("eps", False), ("eps", True)])
def test_infer_cams_writes_normalised_maps_of_the_labelled_classes(world, tmp_path, loss, keep):
    out = infer_cams(world["index"], world["classifiers"][loss], tmp_path / "shard-1-of-1.h5", "val",
                     "1-of-1", infer_params(keep_background=keep))
    assert out == tmp_path / "shard-1-of-1.h5"
    attrs, items = read_shard(out)
    assert attrs["format"] == "eps.cams" and attrs["dataset"] == "t" and attrs["version"] == 1
    assert list(items) == sorted(world["ids"])
    background = loss == "eps" and keep  # the EPS background map only on request
    for image_id, (maps, a) in items.items():
        labels = world["labels"][image_id]
        assert maps.dtype == np.float32
        assert maps.shape == (len(labels) + background, 40, 40)
        assert list(a["size"]) == [40, 40]
        assert list(a["classes"]) == labels
        assert bool(a["background"]) is background
        assert np.all(np.isfinite(maps)) and maps.min(initial=0) >= 0 and maps.max(initial=0) <= 1.001
        for m in maps:
            peak = float(m.max())
            assert abs(peak - 1.0) < 2e-3 or peak == 0.0, f"{image_id}: map max {peak}"
    assert items[UNLABELLED][0].shape == ((1, 40, 40) if background else (0, 40, 40))
    assert not leftovers(tmp_path)


def test_cam_shard_keeps_per_scale_maps_and_reads_back_the_full_size_sum(world, tmp_path):
    """Lossless: the shard's per-scale maps give exactly the float32 sum computed at full size."""
    from eps.models.classifier import load_classifier

    params = infer_params(scales=[0.5, 1.0, 1.5], flip=True)
    out = infer_cams(world["index"], world["classifiers"]["eps"], tmp_path / "cams.h5", "val", "1-of-1", params)
    model, _ = load_classifier(world["classifiers"]["eps"])
    model = infer_mod.prepare_model(model, "cpu")
    with h5py.File(out, "r") as f:
        for image_id in world["ids"]:
            labels = world["labels"][image_id]
            entry = f[image_id]
            # the scales' maps at CAM resolution side by side (small backbone: output stride 8)
            assert entry.dtype == np.float32 and entry.shape == (len(labels), 9 + 25 + 64)
            assert entry.attrs["shapes"].tolist() == [[3, 3], [5, 5], [8, 8]]
            row = world["rows"][image_id]
            pixels = torch.from_numpy(np.array(infer_mod.read_image(row))).permute(2, 0, 1)[None]
            direct = multiscale_cams(model, pixels, params["scales"], True, True, channels=labels)[0].numpy()
            if labels:
                direct = direct / (direct.max(axis=(1, 2), keepdims=True) + 1e-5)
            maps, classes, background = read_cams(f, image_id)
            assert list(classes) == labels and background is False
            np.testing.assert_allclose(maps, direct, rtol=0, atol=1e-5)


def test_upsample_sum_of_parts_is_multiscale_cams_and_full_size_part_is_identity():
    from eps.models import build_classifier

    torch.manual_seed(0)
    model = infer_mod.prepare_model(build_classifier("small", 3), "cpu")
    images = torch.randint(0, 256, (2, 3, 24, 32), dtype=torch.uint8)
    parts = multiscale_parts(model, images, [0.5, 1.0], True, True)
    assert [tuple(p.shape) for p in parts] == [(2, 4, 2, 2), (2, 4, 3, 4)]
    torch.testing.assert_close(upsample_sum(parts, (24, 32)), multiscale_cams(model, images, [0.5, 1.0], True, True))
    full = torch.rand(1, 2, 24, 32)
    assert torch.equal(upsample_sum([full], (24, 32)), full)


def test_cam_entry_of_the_old_layout_is_refused(tmp_path):
    from eps.data.io import atomic_h5

    path = tmp_path / "old.h5"
    with atomic_h5(path, "eps.cams", "t") as f:
        f.create_dataset("img1", data=np.zeros((1, 4, 4), np.float16))
        write_cams(f, "img2", [np.ones((1, 2, 2), np.float32), np.ones((1, 1, 1), np.float32)], np.array([0]),
                   False, (4, 4))
    with h5py.File(path, "r") as f:
        with pytest.raises(EpsError, match=r"old\.h5: 'img1' is not a CAM entry of this eps version"):
            read_cams(f, "img1")
        maps, classes, _ = read_cams(f, "img2")
    assert maps.shape == (1, 4, 4) and np.allclose(maps, 1.0, atol=1e-4) and list(classes) == [0]
    with pytest.raises(EpsError, match="not a CAM entry"):
        pseudo_masks(path, tmp_path / "masks.h5", "t", {"bg_threshold": 0.2})
    assert not (tmp_path / "masks.h5").exists()


def test_shards_partition_the_split_and_masks_follow_the_rule(world, tmp_path):
    clf = world["classifiers"]["eps"]
    whole = read_shard(infer_cams(world["index"], clf, tmp_path / "all.h5", "val", "1-of-1", infer_params()))[1]
    parts = [read_shard(infer_cams(world["index"], clf, tmp_path / f"cams-{i}.h5", "val", f"{i}-of-2",
                                   infer_params(batch_size=1)))[1] for i in (1, 2)]
    ids = world["ids"]
    assert sorted(parts[0]) == sorted(ids[:2]) and sorted(parts[1]) == sorted(ids[2:])
    for part in parts:
        for image_id, (maps, _) in part.items():  # batching does not change the maps
            np.testing.assert_allclose(maps, whole[image_id][0], atol=1e-5)

    mask_shards = [pseudo_masks(tmp_path / f"cams-{i}.h5", tmp_path / f"masks-{i}.h5", "t", {"bg_threshold": 0.2})
                   for i in (1, 2)]
    for i, shard in enumerate(mask_shards):
        attrs, masks = read_shard(shard)
        assert attrs["format"] == "eps.masks" and attrs["dataset"] == "t"
        assert sorted(masks) == sorted(parts[i])
        for image_id, (mask, _) in masks.items():
            maps, a = parts[i][image_id]
            assert mask.dtype == np.uint8 and mask.shape == (40, 40)
            np.testing.assert_array_equal(mask, mask_from_maps(maps, a["classes"], bool(a["background"]), 0.2))

    png_dir = export_pngs(mask_shards, tmp_path / "png", "t")
    assert sorted(p.name for p in png_dir.iterdir()) == sorted([f"{i}.png" for i in ids] + [".eps-output"])
    for image_id in ids:
        with Image.open(png_dir / f"{image_id}.png") as img:
            assert img.mode == "P"
            values = set(np.unique(np.asarray(img)).tolist())
        assert values <= {0} | {c + 1 for c in world["labels"][image_id]}
    with Image.open(png_dir / f"{UNLABELLED}.png") as img:
        assert not np.asarray(img).any()
    # exporting again replaces the folder (a stale PNG does not survive)
    (png_dir / "stale.png").write_bytes(b"")
    export_pngs(mask_shards, png_dir, "t")
    assert not (png_dir / "stale.png").exists()
    assert not leftovers(tmp_path)


def test_cam_classifier_masks_stay_within_the_labels(world, tmp_path):
    cams = infer_cams(world["index"], world["classifiers"]["cam"], tmp_path / "cams.h5", "val", "1-of-1",
                      infer_params(scales=[1.0], flip=False))
    masks = read_shard(pseudo_masks(cams, tmp_path / "masks.h5", "t", {"bg_threshold": 0.2}))[1]
    for image_id, (mask, _) in masks.items():
        assert set(np.unique(mask).tolist()) <= {0} | {c + 1 for c in world["labels"][image_id]}
    assert not masks[UNLABELLED][0].any()


# ---------------------------------------------------------------------------- failures


def test_shard_of_another_dataset_is_refused(world, tmp_path):
    cams = infer_cams(world["index"], world["classifiers"]["eps"], tmp_path / "cams.h5", "val", "1-of-1",
                      infer_params(scales=[1.0], flip=False))
    with pytest.raises(EpsError, match=r"cams\.h5: shard belongs to dataset 't', not 'voc'"):
        pseudo_masks(cams, tmp_path / "masks.h5", "voc", {"bg_threshold": 0.2})
    assert not (tmp_path / "masks.h5").exists()
    good = pseudo_masks(cams, tmp_path / "masks.h5", "t", {"bg_threshold": 0.2})
    with pytest.raises(EpsError, match=r"masks\.h5: shard belongs to dataset 't'"):
        export_pngs([good], tmp_path / "png", "voc")
    with pytest.raises(EpsError, match="format 'eps.masks'"):
        export_pngs([cams], tmp_path / "png", "t")
    assert not (tmp_path / "png").exists()
    assert not leftovers(tmp_path)


def test_failures_leave_no_output_and_no_tmp(world, tmp_path, monkeypatch):
    out = tmp_path / "cams.h5"
    with pytest.raises(EpsError, match=r"missing\.pt: file not found"):
        infer_cams(world["index"], tmp_path / "missing.pt", out, "val", "1-of-1", infer_params())
    with pytest.raises(EpsError, match="unknown split 'test'"):
        infer_cams(world["index"], world["classifiers"]["eps"], out, "test", "1-of-1", infer_params())

    real = infer_mod.write_cams
    calls = []

    def fail_on_third(*args):  # fails half-way through writing the shard
        calls.append(1)
        if len(calls) == 3:
            raise EpsError("boom: simulated failure")
        return real(*args)

    monkeypatch.setattr(infer_mod, "write_cams", fail_on_third)
    with pytest.raises(EpsError, match="boom"):
        infer_cams(world["index"], world["classifiers"]["eps"], out, "val", "1-of-1", infer_params(batch_size=1))
    assert len(calls) == 3
    assert not out.exists()
    assert not leftovers(tmp_path)


def test_classifier_of_another_class_count_is_refused(world, tmp_path):
    from eps.models import build_classifier

    clf = tmp_path / "classifier.pt"
    meta = {"backbone": "small", "num_classes": 3, "background": True}
    torch.save({"state_dict": build_classifier("small", 3).state_dict(), "meta": meta}, clf)
    with pytest.raises(EpsError, match="trained for 3 classes, dataset has 5"):
        infer_cams(world["index"], clf, tmp_path / "cams.h5", "val", "1-of-1", infer_params())
    assert not (tmp_path / "cams.h5").exists()


def test_a_shard_reads_its_images_a_batch_at_a_time(world, tmp_path, monkeypatch):
    reads = []
    real = infer_mod.read_image
    monkeypatch.setattr(infer_mod, "read_image", lambda path: reads.append(path) or real(path))
    model, _ = infer_mod.load_classifier(world["classifiers"]["eps"], "cpu")
    index = pd.read_csv(world["index"], dtype=str, keep_default_na=False)
    paths = list(index["image"])
    from eps.data.index import labels_of, read_classes

    labels = labels_of(index, len(read_classes(world["index"])["classes"]))
    parts = infer_mod.iter_cam_parts(infer_mod.prepare_model(model, "cpu"), paths, labels,
                                     infer_params(batch_size=2), True, "cpu")
    next(parts)
    assert len(reads) <= 2  # one batch decoded when its first maps come out, not the shard
    assert sum(1 for _ in parts) == len(paths) - 1 and len(reads) == len(paths)
