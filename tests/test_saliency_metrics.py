"""Saliency metrics: hand-computed cases, the adaptive-threshold and max-F conventions,
S-measure's degenerate cases, and folder evaluation with its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eps.data.io import write_gray_png
from eps.errors import EpsError
from eps.saliency.metrics import (
    adaptive_threshold,
    evaluate_dirs,
    f_adaptive,
    f_curve,
    f_max,
    mae,
    max_of_mean_curve,
    pr_curve,
    precision_recall,
    s_measure,
    write_json,
)


def square_gt() -> np.ndarray:
    """8x8 with a centred 4x4 object: every quadrant around its centroid is mixed."""
    gt = np.zeros((8, 8), bool)
    gt[2:6, 2:6] = True
    return gt


def f_beta(p, r, beta2=0.3):
    return (1 + beta2) * p * r / (beta2 * p + r)


# --- per image ----------------------------------------------------------------------------


def test_perfect_prediction():
    gt = square_gt()
    pred = gt.astype(float)
    assert mae(pred, gt) == 0
    assert f_adaptive(pred, gt) == pytest.approx(1)
    assert f_max(pred, gt) == pytest.approx(1)
    assert s_measure(pred, gt) == pytest.approx(1)


def test_inverted_prediction():
    gt = square_gt()
    pred = 1.0 - gt
    assert mae(pred, gt) == 1
    assert f_adaptive(pred, gt) == 0  # it selects background only
    assert s_measure(pred, gt) == 0  # both object terms 0, every quadrant anti-correlated: clipped
    # the best threshold is 0: everything predicted, precision = object share 1/4, recall 1
    assert f_max(pred, gt) == pytest.approx(f_beta(0.25, 1.0))


def test_shifted_prediction_by_hand():
    # object: columns 0-3 of 8; prediction: columns 2-7 (2 columns right, 4 false)
    gt = np.zeros((4, 8), bool)
    gt[:, :4] = True
    pred = np.zeros((4, 8))
    pred[:, 2:] = 1.0
    assert mae(pred, gt) == pytest.approx(6 / 8)  # columns 0, 1 missed, 4-7 false
    precision, recall = precision_recall(pred >= 0.5, gt)
    assert (precision, recall) == (pytest.approx(2 / 6), pytest.approx(2 / 4))
    # binary map: 2 x mean = 1.5 is capped at 1, which keeps the predicted columns
    assert adaptive_threshold(pred) == 1.0
    assert f_adaptive(pred, gt) == pytest.approx(f_beta(1 / 3, 1 / 2))
    assert f_adaptive(pred, gt, beta2=1.0) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_half_grey_prediction_mae():
    gt = np.zeros((2, 4), bool)
    gt[:, :2] = True
    pred = np.full((2, 4), 0.25)
    pred[:, :2] = 0.5
    assert mae(pred, gt) == pytest.approx((4 * 0.5 + 4 * 0.25) / 8)


def test_adaptive_threshold_is_twice_the_mean():
    gt = np.zeros((1, 10), bool)
    gt[0, :2] = True
    pred = np.array([[0.9, 0.9, 0.3, 0.3, 0.3, 0, 0, 0, 0, 0]])
    assert adaptive_threshold(pred) == pytest.approx(2 * 2.7 / 10)  # 0.54: only the 0.9s
    assert f_adaptive(pred, gt) == pytest.approx(1)
    # a fixed threshold of 0.25 would keep the 0.3s too: precision 2/5
    assert precision_recall(pred >= 0.25, gt) == (pytest.approx(0.4), 1.0)


def test_adaptive_threshold_is_capped_at_one():
    gt = np.zeros((2, 5), bool)
    gt[0, 0] = True
    pred = np.full((2, 5), 0.6)
    pred[0, 0] = 1.0  # mean 0.64: 2 x mean = 1.28, capped to 1, keeps the one object pixel
    assert adaptive_threshold(pred) == 1.0
    assert f_adaptive(pred, gt) == pytest.approx(1)


def test_black_map_is_thresholded_at_zero_and_keeps_everything():
    # as in the reference toolkits: 2 x mean = 0 and pred >= 0 holds everywhere
    gt = square_gt()
    assert f_adaptive(np.zeros((8, 8)), gt) == pytest.approx(f_beta(0.25, 1.0))
    assert f_max(np.zeros((8, 8)), gt) == pytest.approx(f_beta(0.25, 1.0))


def test_no_true_positive_scores_zero_f():
    gt = square_gt()
    pred = np.zeros((8, 8))
    pred[0, 0] = 1.0  # one background pixel
    assert f_adaptive(pred, gt) == 0
    assert f_curve(pred, gt)[1:].max() == 0


def test_pr_curve_by_hand():
    gt = np.array([[True, True, False, False]])
    pred = np.array([[1.0, 0.4, 0.4, 0.0]])  # 8-bit levels 255, 102, 102, 0
    precision, recall = pr_curve(pred, gt)
    assert precision.shape == recall.shape == (256,)
    assert (precision[0], recall[0]) == (0.5, 1.0)  # threshold 0: every pixel
    assert np.allclose(precision[1:103], 2 / 3) and np.allclose(recall[1:103], 1.0)
    assert np.allclose(precision[103:], 1.0) and np.allclose(recall[103:], 0.5)
    assert np.allclose(f_curve(pred, gt), f_beta(precision, recall))


def test_dataset_max_f_maximises_the_mean_curve_not_each_image():
    gt = np.array([[True, False]])
    a = np.array([[1.0, 0.2]])  # perfect above level 51
    b = np.array([[0.2, 0.0]])  # perfect at levels 1..51, empty above
    assert f_max(a, gt) == pytest.approx(1) and f_max(b, gt) == pytest.approx(1)
    # mean curve: levels 1..51 average (F(1/2, 1) + 1) / 2, above it (1 + 0) / 2
    expected = (f_beta(0.5, 1.0) + 1) / 2
    assert max_of_mean_curve([f_curve(a, gt), f_curve(b, gt)]) == pytest.approx(expected)


def test_f_max_at_least_f_adaptive_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(3, 20, 2)
        gt = rng.random((h, w)) < rng.uniform(0.05, 0.7)
        noise = rng.random((h, w)) * rng.uniform(0, 1.5)
        pred = np.clip(gt * rng.uniform(0, 1) + noise, 0, 1)
        pred = np.rint(pred * 255) / 255  # 8-bit, as maps are stored
        one = f_max(pred, gt)
        assert 0 <= f_adaptive(pred, gt) <= one + 1e-12 <= 1 + 1e-12


def test_s_measure_degenerate_ground_truths():
    pred = np.full((4, 4), 0.25)
    pred[0, 0] = 0.65  # mean 0.275
    assert s_measure(pred, np.zeros((4, 4), bool)) == pytest.approx(1 - 0.275)
    assert s_measure(pred, np.ones((4, 4), bool)) == pytest.approx(0.275)


def test_s_measure_by_hand():
    # object: the left half of 4x4; a flat 0.5 prediction
    gt = np.zeros((4, 4), bool)
    gt[:, :2] = True
    pred = np.full((4, 4), 0.5)
    # object term: 2 x 0.5 / (0.25 + 1 + 0) = 0.8 for object and background alike.
    # centroid (row 1.5, col 0.5) splits after row 2 and column 1 (1-based, rounded half up):
    # each quadrant has a flat prediction and a flat gt, whose SSIM is 1.
    assert s_measure(pred, gt) == pytest.approx(0.5 * 0.8 + 0.5 * 1.0)
    assert s_measure(pred, gt, alpha=1.0) == pytest.approx(0.8)


def test_s_measure_prefers_the_better_map():
    gt = square_gt()
    blurred = np.clip(gt * 0.8 + 0.1, 0, 1)
    shifted = np.roll(gt, 2, axis=1).astype(float)
    assert s_measure(blurred, gt) > s_measure(shifted, gt) > s_measure(1.0 - gt, gt)


# --- folders ------------------------------------------------------------------------------


def make_folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_a = np.zeros((8, 8), np.uint8)
    gt_a[:, :4] = 255
    gt_b = np.zeros((6, 10), np.uint8)
    gt_b[1:5, 3:7] = 1  # any non-zero value is object; every quadrant of its centroid is mixed
    write_gray_png(gt_dir / "a.png", gt_a)
    write_gray_png(gt_dir / "b.png", gt_b)
    big_a = np.zeros((16, 16), np.uint8)
    big_a[:, :8] = 255  # twice the size: bilinear halving keeps the edge exactly
    write_gray_png(pred_dir / "a.png", big_a)
    write_gray_png(pred_dir / "b.png", np.where(gt_b > 0, 0, 255).astype(np.uint8))  # inverted
    write_gray_png(pred_dir / "extra.png", gt_a)  # no ground truth: ignored
    return pred_dir, gt_dir


def test_evaluate_dirs(tmp_path):
    pred_dir, gt_dir = make_folders(tmp_path)
    result = evaluate_dirs(pred_dir, gt_dir)
    assert set(result) == {"mae", "f_adaptive", "f_max", "s_measure", "images"}
    assert result["images"] == 2
    assert result["mae"] == pytest.approx((0 + 1) / 2)  # a perfect (once resized), b inverted
    assert result["f_adaptive"] == pytest.approx((1 + 0) / 2)
    assert result["s_measure"] == pytest.approx((1 + 0) / 2)
    gt_b = np.zeros((6, 10), bool)
    gt_b[1:5, 3:7] = True
    # mean curve: a is 1 above threshold 0; b's best is threshold 0 (everything)
    f_b0 = f_beta(gt_b.mean(), 1.0)
    assert result["f_max"] == pytest.approx(max((f_beta(0.5, 1.0) + f_b0) / 2, (1 + 0) / 2))


def test_write_json_round_trip(tmp_path):
    pred_dir, gt_dir = make_folders(tmp_path)
    result = evaluate_dirs(pred_dir, gt_dir)
    out = write_json(result, tmp_path / "deep" / "scores.json")
    assert json.loads(out.read_text()) == result
    assert [p.name for p in out.parent.iterdir()] == ["scores.json"]


def test_missing_prediction_names_the_file(tmp_path):
    pred_dir, gt_dir = make_folders(tmp_path)
    (pred_dir / "b.png").unlink()
    with pytest.raises(EpsError) as err:
        evaluate_dirs(pred_dir, gt_dir)
    message = str(err.value)
    assert str(pred_dir / "b.png") in message and "no prediction" in message and "\n" not in message


def test_unreadable_prediction_names_the_file(tmp_path):
    pred_dir, gt_dir = make_folders(tmp_path)
    (pred_dir / "a.png").write_bytes(b"not a png")
    with pytest.raises(EpsError, match="a.png: cannot decode image") as err:
        evaluate_dirs(pred_dir, gt_dir)
    assert "\n" not in str(err.value)


def test_empty_or_missing_folders(tmp_path):
    pred_dir, gt_dir = make_folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EpsError, match="empty: no ground-truth PNG files"):
        evaluate_dirs(pred_dir, empty)
    with pytest.raises(EpsError, match="absent: folder not found"):
        evaluate_dirs(tmp_path / "absent", gt_dir)
