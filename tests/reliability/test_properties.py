"""Property-based tests (hypothesis) of the metric code and of mask / saliency PNG I/O.

Complements tests/test_metrics.py (histogram total, IoU range, perfect prediction) with
properties that tie the metrics to their definition: class relabelling, image order and
splitting, gt/pred symmetry, a naive reference; and round trips of every PNG writer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from eps.data import io
from eps.metrics import (
    confusion,
    evaluate_masks,
    iou_from_confusion,
    miou,
    precision_from_confusion,
    recall_from_confusion,
)

VOID = 255
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_pair(draw, void=True, max_side=12):
    """(gt, pred, n): two masks of one random shape with values 0..n-1 (and 255 = void in gt)."""
    n = draw(st.integers(1, 7))
    shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    values = st.integers(0, n - 1) | st.just(VOID) if void else st.integers(0, n - 1)
    gt = draw(hnp.arrays(np.uint8, shape, elements=values))
    pred = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, n - 1)))
    return gt, pred, n


def naive_confusion(gt, pred, n):
    hist = np.zeros((n, n), np.int64)
    for g, p in zip(np.ravel(gt), np.ravel(pred)):
        if g < n and p < n:
            hist[g, p] += 1
    return hist


def same(a, b) -> bool:
    return np.allclose(a, b, equal_nan=True)


# ---------------------------------------------------------------------------- metrics


@SETTINGS
@given(labelled_pair())
def test_confusion_equals_the_naive_count(case):
    gt, pred, n = case
    assert np.array_equal(confusion(gt, pred, n), naive_confusion(gt, pred, n))


@SETTINGS
@given(labelled_pair(), st.randoms(use_true_random=False))
def test_relabelling_the_classes_permutes_the_histogram_and_keeps_miou(case, rnd):
    gt, pred, n = case
    perm = list(range(n))
    rnd.shuffle(perm)
    lut = np.array(perm + list(range(n, 256)), np.uint8)  # void stays void
    hist = confusion(gt, pred, n)
    relabelled = confusion(lut[gt], lut[pred], n)
    assert np.array_equal(relabelled[np.ix_(perm, perm)], hist)  # class i is now perm[i]
    assert same(iou_from_confusion(relabelled)[perm], iou_from_confusion(hist))
    assert same(miou(relabelled), miou(hist))


@SETTINGS
@given(labelled_pair(), st.data())
def test_histograms_add_up_across_any_split_of_the_pixels(case, data):
    gt, pred, n = case
    flat_gt, flat_pred = gt.ravel(), pred.ravel()
    cut = data.draw(st.integers(0, flat_gt.size))
    order = data.draw(st.permutations(range(flat_gt.size)))
    g, p = flat_gt[order], flat_pred[order]
    parts = confusion(g[:cut], p[:cut], n) + confusion(g[cut:], p[cut:], n)
    assert np.array_equal(parts, confusion(gt, pred, n))  # pixel order and splits do not matter


@SETTINGS
@given(labelled_pair(void=False))
def test_swapping_gt_and_pred_transposes_the_histogram_and_keeps_iou(case):
    gt, pred, n = case
    hist, swapped = confusion(gt, pred, n), confusion(pred, gt, n)
    assert np.array_equal(swapped, hist.T)
    assert same(iou_from_confusion(swapped), iou_from_confusion(hist))
    assert same(precision_from_confusion(swapped), recall_from_confusion(hist))


@SETTINGS
@given(labelled_pair())
def test_void_pixels_are_exactly_the_ones_left_out(case):
    gt, pred, n = case
    keep = gt != VOID
    assert np.array_equal(confusion(gt, pred, n), confusion(gt[keep], pred[keep], n))
    iou = iou_from_confusion(confusion(gt, pred, n))
    # a class is nan exactly when it is in neither the (non-void) ground truth nor the prediction
    present = np.zeros(n, bool)
    present[np.unique(gt[keep])] = True
    present[np.unique(pred[keep])] = True
    assert np.array_equal(np.isnan(iou), ~present)
    assert np.isnan(miou(confusion(gt, pred, n))) == (not keep.any())


@st.composite
def image_set(draw):
    """A few (gt, pred) mask pairs of random shapes, and n."""
    n = draw(st.integers(2, 5))
    count = draw(st.integers(1, 4))
    pairs = []
    for _ in range(count):
        shape = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
        gt = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, n - 1) | st.just(VOID)))
        pred = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, n - 1)))
        pairs.append((gt, pred))
    return pairs, n


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image_set(), st.randoms(use_true_random=False))
def test_evaluate_masks_does_not_depend_on_the_order_of_the_ids(case, rnd):
    pairs, n = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ids = [f"im{i}" for i in range(len(pairs))]
        for image_id, (gt, pred) in zip(ids, pairs):
            io.write_index_png(root / "gt" / f"{image_id}.png", gt)
            io.write_index_png(root / "pred" / f"{image_id}.png", pred)
        shuffled = list(ids)
        rnd.shuffle(shuffled)
        a = evaluate_masks(root / "pred", root / "gt", ids, n)
        b = evaluate_masks(root / "pred", root / "gt", shuffled, n)
    assert a == b
    total = sum(confusion(g, p, n) for g, p in pairs)
    assert a["hist"] == total.tolist()  # one histogram over all images, not a mean of per-image scores


# ---------------------------------------------------------------------------- mask and saliency I/O


masks = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40))


@SETTINGS
@given(masks)
def test_index_png_round_trip_keeps_values_and_the_voc_palette(mask):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub" / "m.png"
        io.write_index_png(path, mask)
        assert np.array_equal(io.read_index_png(path), mask)
        with Image.open(path) as img:
            assert img.mode == "P"
            assert img.getpalette()[: 3 * 256] == io.VOC_PALETTE.reshape(-1).tolist()
        assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]  # no .tmp left


@SETTINGS
@given(masks)
def test_gray_png_round_trip_through_read_saliency(array):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.png"
        io.write_gray_png(path, array)
        got = io.read_saliency(path)
        assert got.dtype == np.uint8 and np.array_equal(got, array)
        assert np.array_equal(io.read_index_png(path), array)  # a grayscale PNG is a valid index mask


@SETTINGS
@given(hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24)))
def test_16_bit_saliency_maps_are_scaled_from_the_full_16_bit_range(array):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s16.png"
        Image.fromarray(array).save(path)  # mode I;16
        got = io.read_saliency(path)
    expected = np.round(array.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(got, expected)


@SETTINGS
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))))
def test_rgb_png_round_trip(image):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.png"
        io.write_rgb(path, image)
        assert np.array_equal(io.read_image(path), image)


@pytest.mark.parametrize("shape", [(3,), (2, 2, 2)])
def test_index_png_refuses_a_mask_that_is_not_2d(tmp_path, shape):
    with pytest.raises(ValueError, match="2-D"):
        io.write_index_png(tmp_path / "m.png", np.zeros(shape, np.uint8))
    assert not list(tmp_path.iterdir())
