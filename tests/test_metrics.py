"""Metrics: golden conformance with the official evaluation, hand-made confusion, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eps.data.io import write_index_png
from eps.errors import EpsError
from eps.metrics import (
    confusion,
    evaluate_masks,
    iou_from_confusion,
    miou,
    precision_from_confusion,
    recall_from_confusion,
    write_metrics,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden" / "miou_reference.npz"


def golden():
    if not GOLDEN.is_file():
        pytest.skip(f"golden file {GOLDEN} absent (needs ../shared beside the checkout)")
    return np.load(GOLDEN)


def write_masks(folder: Path, masks: dict[str, np.ndarray]) -> None:
    for name, mask in masks.items():
        write_index_png(folder / f"{name}.png", mask)


# --- golden conformance ------------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1])
def test_golden_confusion_and_miou(case):
    ref = golden()
    gt, pred = ref[f"c{case}_gt"], ref[f"c{case}_pred"]
    n = int(ref[f"c{case}_num_classes"])
    hist = sum(confusion(g, p, n) for g, p in zip(gt, pred))
    assert np.array_equal(hist, ref[f"c{case}_hist"])
    np.testing.assert_allclose(iou_from_confusion(hist), ref[f"c{case}_iou"], rtol=0, atol=1e-12)
    assert abs(miou(hist) - float(ref[f"c{case}_miou"])) <= 1e-12


@pytest.mark.parametrize("case", [0, 1])
def test_golden_through_png_files(tmp_path, case):
    ref = golden()
    gt, pred = ref[f"c{case}_gt"], ref[f"c{case}_pred"]
    n = int(ref[f"c{case}_num_classes"])
    ids = [f"img{i}" for i in range(len(gt))]
    write_masks(tmp_path / "gt", dict(zip(ids, gt)))
    write_masks(tmp_path / "pred", dict(zip(ids, pred)))
    result = evaluate_masks(tmp_path / "pred", tmp_path / "gt", ids, n)
    assert np.array_equal(np.array(result["hist"]), ref[f"c{case}_hist"])
    assert abs(result["miou"] - float(ref[f"c{case}_miou"])) <= 1e-12
    assert result["num_images"] == len(ids)
    got_iou = [row["iou"] for row in result["per_class"]]
    np.testing.assert_allclose(got_iou, ref[f"c{case}_iou"], rtol=0, atol=1e-12)


# --- conventions: void and absent classes ------------------------------------------------


def test_void_in_gt_or_pred_is_ignored():
    gt = np.array([[0, 1, 255], [1, 1, 0]], np.uint8)
    pred = np.array([[0, 255, 1], [1, 0, 0]], np.uint8)
    hist = confusion(gt, pred, 2)
    # (0,0)x2, (1,1)x1, (1,0)x1; the void gt pixel and the void pred pixel are dropped
    assert hist.tolist() == [[2, 0], [1, 1]]
    assert hist.dtype == np.int64
    # the official script reads masks as int32: same counts
    assert np.array_equal(confusion(gt.astype(np.int32), pred.astype(np.int32), 2), hist)


def test_absent_class_is_nan_and_left_out_of_miou():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    pred = np.array([[0, 0, 1, 3]], np.uint8)
    hist = confusion(gt, pred, 4)
    iou = iou_from_confusion(hist)
    assert iou[0] == 1.0 and iou[1] == 0.5
    assert math.isnan(iou[2])  # in neither gt nor prediction
    assert iou[3] == 0.0  # predicted only: counts as a zero
    assert miou(hist) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert math.isnan(precision_from_confusion(hist)[2])
    assert math.isnan(recall_from_confusion(hist)[3])
    assert precision_from_confusion(hist)[1] == 1.0
    assert recall_from_confusion(hist)[1] == 0.5


# --- co-occurrence confusion on a hand-made image ---------------------------------------


@pytest.fixture
def rail_case(tmp_path):
    """10x10: train (class 1) on top; rail (context 2) below it, partly predicted as train."""
    gt = np.zeros((10, 10), np.uint8)
    gt[:5] = 1
    gt[9] = 255  # void row: never counted, even though context and prediction say rail/train
    ctx = np.zeros((10, 10), np.uint8)
    ctx[5:7] = 1  # water
    ctx[7:] = 2  # rail
    pred = np.zeros((10, 10), np.uint8)
    pred[:5] = 1  # TP_train = 50
    pred[7:] = 1  # rail rows 7, 8 -> FP_{rail,train} = 20 (row 9 is void)
    pred[5, 0] = 1  # one water pixel -> FP_{water,train} = 1
    write_masks(tmp_path / "gt", {"a": gt})
    write_masks(tmp_path / "pred", {"a": pred})
    write_masks(tmp_path / "ctx", {"a": ctx})
    return tmp_path


def test_co_occurrence_confusion_known_counts(rail_case):
    result = evaluate_masks(
        rail_case / "pred",
        rail_case / "gt",
        ["a"],
        2,
        context_dir=rail_case / "ctx",
        pairs=[(2, 1), ("water", "train")],
        class_names=["train"],
        context_names=["water", "rail"],
    )
    rail, water = result["confusion"]
    assert rail["pair"] == "rail->train" and (rail["context"], rail["class"]) == (2, 1)
    assert (rail["fp"], rail["tp"]) == (20, 50)
    assert rail["m"] == pytest.approx(0.4)
    assert water["pair"] == "water->train" and (water["fp"], water["tp"]) == (1, 50)
    assert water["m"] == pytest.approx(0.02)
    # train: TP 50, FP 21, FN 0; background: TP 19 of 40 gt pixels, none over-predicted
    assert rail["class_iou"] == pytest.approx(50 / 71)
    per_class = {row["class"]: row for row in result["per_class"]}
    assert per_class["train"]["iou"] == pytest.approx(50 / 71)
    assert per_class["background"]["iou"] == pytest.approx(19 / 40)
    assert per_class["background"]["precision"] == 1.0
    assert per_class["background"]["recall"] == pytest.approx(19 / 40)
    assert result["miou"] == pytest.approx((50 / 71 + 19 / 40) / 2)


def test_confusion_without_true_positives_is_null_and_json_safe(tmp_path):
    """FP > 0 but TP = 0: m is undefined (null), and metrics.json still writes."""
    gt = np.zeros((4, 4), np.uint8)
    ctx = np.ones((4, 4), np.uint8)
    pred = np.ones((4, 4), np.uint8)  # every rail pixel predicted as train, no train in gt
    write_masks(tmp_path / "gt", {"a": gt})
    write_masks(tmp_path / "pred", {"a": pred})
    write_masks(tmp_path / "ctx", {"a": ctx})
    result = evaluate_masks(tmp_path / "pred", tmp_path / "gt", ["a"], 2, context_dir=tmp_path / "ctx",
                            pairs=[(1, 1)], class_names=["train"], context_names=["rail"])
    (pair,) = result["confusion"]
    assert (pair["fp"], pair["tp"], pair["m"]) == (16, 0, None)
    write_metrics(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["confusion"][0]["m"] is None


def test_pairs_need_contexts_and_known_names(rail_case):
    args = (rail_case / "pred", rail_case / "gt", ["a"], 2)
    with pytest.raises(EpsError, match="context_dir"):
        evaluate_masks(*args, pairs=[(2, 1)])
    with pytest.raises(EpsError, match="unknown context 'road'"):
        evaluate_masks(*args, context_dir=rail_case / "ctx", pairs=[("road", 1)], context_names=["rail"])
    with pytest.raises(EpsError, match="class value 5 out of range"):
        evaluate_masks(*args, context_dir=rail_case / "ctx", pairs=[(1, 5)])
    with pytest.raises(EpsError, match="class_names"):
        evaluate_masks(*args, class_names=["a", "b", "c"])


# --- errors ------------------------------------------------------------------------------


@pytest.fixture
def small_set(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"im{i}" for i in range(6)]
    gts = {i: rng.integers(0, 3, (8, 12), dtype=np.uint8) for i in ids}
    preds = {i: rng.integers(0, 3, (8, 12), dtype=np.uint8) for i in ids}
    write_masks(tmp_path / "gt", gts)
    write_masks(tmp_path / "pred", preds)
    return tmp_path, ids


def test_missing_prediction(small_set):
    root, ids = small_set
    (root / "pred" / "im3.png").unlink()
    with pytest.raises(EpsError, match=r"im3\.png: file not found"):
        evaluate_masks(root / "pred", root / "gt", ids, 3)


def test_prediction_of_another_size(small_set):
    root, ids = small_set
    write_index_png(root / "pred" / "im2.png", np.zeros((8, 10), np.uint8))
    with pytest.raises(EpsError, match=r"im2\.png: prediction size 10x8 differs from the ground truth 12x8"):
        evaluate_masks(root / "pred", root / "gt", ids, 3)


def test_truncated_prediction(small_set):
    root, ids = small_set
    path = root / "pred" / "im1.png"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(EpsError, match=r"im1\.png: cannot decode"):
        evaluate_masks(root / "pred", root / "gt", ids, 3)


def test_missing_context(small_set):
    root, ids = small_set
    with pytest.raises(EpsError, match=r"im0\.png: file not found"):
        evaluate_masks(root / "pred", root / "gt", ids, 3, context_dir=root / "ctx", pairs=[(1, 1)])


def test_workers_two_equals_one(small_set):
    root, ids = small_set
    one = evaluate_masks(root / "pred", root / "gt", ids, 3, workers=1)
    two = evaluate_masks(root / "pred", root / "gt", ids, 3, workers=2)
    assert one == two


def test_worker_error_reaches_the_caller(small_set):
    root, ids = small_set
    (root / "pred" / "im5.png").unlink()
    with pytest.raises(EpsError, match=r"im5\.png: file not found"):
        evaluate_masks(root / "pred", root / "gt", ids, 3, workers=2)


# --- outputs -----------------------------------------------------------------------------


def test_write_metrics_files(rail_case, tmp_path):
    result = evaluate_masks(
        rail_case / "pred",
        rail_case / "gt",
        ["a"],
        3,
        context_dir=rail_case / "ctx",
        pairs=[(2, 1)],
        class_names=["background", "train", "bus"],
        context_names=["water", "rail"],
    )
    out = tmp_path / "out"
    write_metrics(result, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_class.csv"]
    data = json.loads((out / "metrics.json").read_text())
    assert data == result
    assert data["per_class"][2]["iou"] is None  # bus never appears: null, not NaN
    assert data["confusion"][0]["pair"] == "rail->train"
    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["background", "train", "bus"]
    assert list(rows[0]) == ["class", "iou", "precision", "recall"]
    assert float(rows[1]["iou"]) == pytest.approx(50 / 71)
    assert rows[2]["iou"] == "nan"


def test_write_metrics_leaves_nothing_on_error(tmp_path):
    bad = {"miou": float("nan"), "per_class": []}  # NaN is not valid JSON
    with pytest.raises(ValueError):
        write_metrics(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- properties --------------------------------------------------------------------------


@st.composite
def mask_pairs(draw):
    n = draw(st.integers(1, 6))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    values = st.integers(0, n - 1) | st.just(255)
    gt = np.array(draw(st.lists(values, min_size=h * w, max_size=h * w)), np.uint8).reshape(h, w)
    pred = np.array(draw(st.lists(st.integers(0, n - 1), min_size=h * w, max_size=h * w)), np.uint8)
    return gt, pred.reshape(h, w), n


@settings(max_examples=150, deadline=None)
@given(mask_pairs())
def test_confusion_properties(case):
    gt, pred, n = case
    hist = confusion(gt, pred, n)
    assert hist.sum() == np.count_nonzero(gt != 255)
    iou = iou_from_confusion(hist)
    present = ~np.isnan(iou)
    assert np.all((iou[present] >= 0) & (iou[present] <= 1))
    perfect = confusion(gt, np.where(gt == 255, 0, gt), n)
    if perfect.sum():
        assert miou(perfect) == 1.0


def test_voc_class_names_without_a_classes_file(tmp_path):
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 15  # person
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        write_index_png(tmp_path / folder / "a.png", gt)
    from eps.metrics import evaluate_masks, write_metrics

    result = evaluate_masks(tmp_path / "pred", tmp_path / "gt", ["a"], 21)
    write_metrics(result, tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_class.csv")))
    assert [r[next(iter(r))] for r in rows][:2] == ["background", "aeroplane"]
    assert rows[15][next(iter(rows[15]))] == "person"
