"""Dense CRF: identical to a direct pydensecrf call, presets, sharpening, pseudo-mask shards."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest

from eps.crf import (CRF_DEFAULTS, PRESETS, cam_scores, dense_crf, kernel_params, refine_cam_shard, refine_cams,
                     refine_probs)
from eps.errors import EpsError
from eps.shards import mask_from_maps, write_cams
from eps.metrics import boundary_scores


def boundary_f1(pred, gt) -> float:
    """Boundary F1 (eps.metrics, the evaluation's) of a 3-class scene at 1 px tolerance."""
    return boundary_scores(pred, gt, 3, tolerance=1)["f1"]


def direct_crf(image, probs, bi_w, bi_xy, bi_rgb, pos_w, pos_xy, iterations):
    """The call as DeepLab's / PSA's code writes it, by hand."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    d.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=np.copy(image), compat=bi_w)
    return np.array(d.inference(iterations)).reshape((c, h, w))


def scene(h=48, w=56, seed=0):
    """An image of three flat, slightly noisy regions, its labels and a blurred, shifted probability map."""
    yy, xx = np.mgrid[:h, :w]
    gt = (((yy - 22) ** 2 + (xx - 30) ** 2) < 12 ** 2).astype(np.uint8)
    gt[32:46, 4:18] = 2
    rng = np.random.default_rng(seed)
    colors = np.array([[40, 90, 160], [200, 60, 50], [60, 170, 70]])
    image = np.clip(colors[gt] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    onehot = np.stack([gt == k for k in range(3)]).astype(np.float32)
    blurred = np.stack([cv2.GaussianBlur(m, (0, 0), 4) for m in onehot])
    blurred = np.roll(blurred, 3, axis=2)  # the map bleeds past the object, as a CAM does
    probs = (0.1 / 3 + 0.9 * blurred / blurred.sum(0, keepdims=True)).astype(np.float32)
    return image, gt, probs


@pytest.mark.parametrize("params", [
    {"preset": "deeplab"},
    {"preset": "psa"},
    {"preset": "deeplab", "bi_w": 5, "bi_xy": 50, "bi_rgb": 5, "pos_w": 2, "pos_xy": 2, "iterations": 3},
])
def test_dense_crf_equals_a_direct_pydensecrf_call(params):
    image, _, probs = scene()
    ours = dense_crf(image, probs, params)
    k = kernel_params(params)
    theirs = direct_crf(image, probs, k["bi_w"], k["bi_xy"], k["bi_rgb"], k["pos_w"], k["pos_xy"], k["iterations"])
    assert ours.shape == probs.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    np.testing.assert_array_equal(ours.argmax(0), theirs.argmax(0))
    np.testing.assert_allclose(ours.sum(0), 1.0, atol=1e-4)


def test_presets_and_explicit_values():
    assert kernel_params({"preset": "deeplab"}) == {"bi_w": 4, "bi_xy": 67, "bi_rgb": 3, "pos_w": 3, "pos_xy": 1,
                                                   "iterations": 10}
    assert kernel_params({"preset": "psa"}) == {"bi_w": 10, "bi_xy": 80, "bi_rgb": 13, "pos_w": 3, "pos_xy": 3,
                                               "iterations": 10}
    assert kernel_params({**CRF_DEFAULTS, "preset": "psa", "bi_rgb": 20, "iterations": 5}) == {
        **PRESETS["psa"], "bi_rgb": 20, "iterations": 5}
    with pytest.raises(EpsError, match="crf.preset"):
        kernel_params({"preset": "fancy"})
    with pytest.raises(EpsError, match="crf.bi_xy"):
        kernel_params({"preset": "deeplab", "bi_xy": 0})


@pytest.mark.parametrize("preset", ["deeplab", "psa"])
def test_crf_sharpens_a_blurred_map(preset):
    image, gt, probs = scene()
    before = probs.argmax(0)
    after = dense_crf(image, probs, {"preset": preset}).argmax(0)
    assert boundary_f1(after, gt) > boundary_f1(before, gt) + 0.2
    assert (after == gt).mean() > (before == gt).mean()


def test_crf_at_half_size_still_sharpens_and_gives_a_full_size_mask():
    image, gt, probs = scene(96, 112)
    gt = np.where(gt > 0, gt, 0)
    maps = probs[1:]  # class maps of classes 0 and 1 (values 1, 2); the background is a threshold
    params = {**CRF_DEFAULTS, "bg_threshold": 0.3}
    full = refine_cams(image, maps, [0, 1], False, params)
    half = refine_cams(image, maps, [0, 1], False, {**params, "scale": 0.5})
    before = mask_from_maps(maps, np.array([0, 1]), False, 0.3)
    assert half.shape == full.shape == gt.shape
    assert (half == full).mean() > 0.97
    assert boundary_f1(half, gt) > boundary_f1(before, gt) + 0.1


def five_class_softmax(h=96, w=112):
    """A segmenter's softmax over five classes of which only 0, 2 and 3 win a pixel (1 and 4 stay low)."""
    image, gt, probs = scene(h, w)
    low = np.full((1, h, w), 0.02, np.float32)
    five = np.concatenate([probs[:1], low, probs[1:], low])
    return image, np.array([0, 2, 3])[gt], five / five.sum(0, keepdims=True)


def test_a_prediction_is_refined_over_the_classes_it_predicts():
    image, gt, probs = five_class_softmax()
    kept = refine_probs(image, probs, {"preset": "deeplab"})
    by_hand = np.array([0, 2, 3])[dense_crf(image, probs[[0, 2, 3]], {"preset": "deeplab"}).argmax(0)]
    np.testing.assert_array_equal(kept, by_hand)
    assert kept.dtype == np.uint8 and set(np.unique(kept)) <= {0, 2, 3}
    every_class = dense_crf(image, probs, {"preset": "deeplab"}).argmax(0)
    assert (kept == every_class).mean() > 0.99
    assert (kept == gt).mean() > (probs.argmax(0) == gt).mean()


def test_a_prediction_refined_at_half_size_is_full_size_and_close():
    image, gt, probs = five_class_softmax()
    full = refine_probs(image, probs, {"preset": "deeplab"})
    half = refine_probs(image, probs, {"preset": "deeplab", "scale": 0.5})
    assert half.shape == gt.shape and (half == full).mean() > 0.97
    with pytest.raises(EpsError, match="crf.scale"):
        refine_probs(image, probs, {"preset": "deeplab", "scale": 2})


def test_without_pairwise_terms_the_crf_gives_the_pseudo_mask():
    image, _, probs = scene()
    maps = probs[1:] / probs[1:].max(axis=(1, 2), keepdims=True)
    classes = np.array([4, 11])
    params = {**CRF_DEFAULTS, "bi_w": 0, "pos_w": 0, "iterations": 5}
    np.testing.assert_array_equal(refine_cams(image, maps, classes, False, params),
                                  mask_from_maps(maps, classes, False, 0.2))
    # the EPS background channel of the CAM is not used
    with_bg = np.concatenate([maps, np.ones_like(maps[:1])], 0)
    np.testing.assert_array_equal(refine_cams(image, with_bg, classes, True, params),
                                  mask_from_maps(maps, classes, False, 0.2))


def test_background_scores():
    maps = np.array([[[0.0, 0.5, 1.0]], [[0.2, 0.1, 0.0]]], np.float32)
    thr = cam_scores(maps, False, {"background": "threshold", "bg_threshold": 0.3})
    np.testing.assert_allclose(thr[0], 0.3)
    np.testing.assert_array_equal(thr[1:], maps)
    power = cam_scores(maps, False, {"background": "power", "alpha": 2})
    np.testing.assert_allclose(power[0], [[0.64, 0.25, 0.0]])
    with pytest.raises(EpsError, match="crf.background"):
        cam_scores(maps, False, {"background": "other"})


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """The session's synthetic world, its index as dataset "w" and a CAM shard made from blurred ground truth."""
    from eps.data.build import build_index
    from eps.data.index import read_index
    from eps.data.io import atomic_h5, read_index_png

    root = tmp_path_factory.mktemp("crf")
    index = root / "index.csv"
    build_index({"name": "w", "type": "synthetic", "root": str(tiny_world["data"])}, index)
    rows = read_index(index)
    rows = rows[[("train" in s) for s in rows["splits"]]]
    cams = root / "cams.h5"
    with atomic_h5(cams, "eps.cams", "w") as f:
        for k, (image_id, mask_path, labels) in enumerate(zip(rows["id"], rows["mask"], rows["labels"])):
            gt = read_index_png(mask_path)
            present = np.array(labels if k else [], np.int16)  # the first image: no labels
            maps = [cv2.GaussianBlur((gt == c + 1).astype(np.float32), (0, 0), 3) for c in present]
            maps = [m / max(m.max(), 1e-5) for m in maps] + [np.ones(gt.shape, np.float32)]  # + EPS bg channel
            # one full-size "scale": upsampling to its own size is the identity
            write_cams(f, image_id, [np.stack(maps)], present, True, gt.shape)
    return {"index": index, "cams": cams, "ids": list(rows["id"]), "masks": dict(zip(rows["id"], rows["mask"]))}


def test_refine_cam_shard_writes_masks_and_does_not_depend_on_workers(world, tmp_path):
    one = refine_cam_shard(world["cams"], world["index"], tmp_path / "a.h5", "w", dict(CRF_DEFAULTS), workers=1)
    two = refine_cam_shard(world["cams"], world["index"], tmp_path / "b.h5", "w", dict(CRF_DEFAULTS), workers=2)
    with h5py.File(one) as a, h5py.File(two) as b:
        assert a.attrs["format"] == "eps.masks" and a.attrs["dataset"] == "w"
        assert list(a.keys()) == sorted(world["ids"])
        for key in a:
            assert a[key].dtype == np.uint8
            np.testing.assert_array_equal(a[key][()], b[key][()])
        assert not a[world["ids"][0]][()].any()  # unlabelled: all background
    assert not list(tmp_path.glob("*.tmp"))


def test_refine_cam_shard_errors(world, tmp_path):
    with pytest.raises(EpsError, match="crf.preset"):
        refine_cam_shard(world["cams"], world["index"], tmp_path / "x.h5", "w", {**CRF_DEFAULTS, "preset": "x"})
    with pytest.raises(EpsError, match="dataset"):
        refine_cam_shard(world["cams"], world["index"], tmp_path / "x.h5", "other", dict(CRF_DEFAULTS))
    assert not (tmp_path / "x.h5").exists()


def test_crf_command(world, tmp_path, capsys):
    from eps.cli import main

    out = tmp_path / "m.h5"
    assert main(["crf", "--cams", str(world["cams"]), "--index", str(world["index"]), "--dataset", "w",
                 "--params", '{"preset": "psa", "background": "power", "alpha": 4}', "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["crf", "--cams", str(world["cams"]), "--index", str(world["index"]), "--dataset", "w",
                 "--params", '{"sigma": 3}', "--out", str(tmp_path / "n.h5")]) == 2
    assert "unknown crf parameter" in capsys.readouterr().err
