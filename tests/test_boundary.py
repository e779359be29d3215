"""Boundary precision / recall / F1 (the paper's Table 1), context masks as .mat (PASCAL-Context),
SBD boundaries, and the summary columns they feed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from eps.cli import main
from eps.errors import EpsError
from eps.metrics import (boundary_counts, boundary_scores, evaluate_boundaries, evaluate_masks, fill_void,
                         mask_edges, read_context, read_gt_boundaries)
from eps.summary import collect_summary


def square(size=64, lo=20, hi=40, grow=0, shift=(0, 0), value=1):
    m = np.zeros((size, size), np.uint8)
    dy, dx = shift
    m[lo - grow + dy:hi + grow + dy, lo - grow + dx:hi + grow + dx] = value
    return m


def save_png(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(mask, np.uint8), mode="L").save(path)


# ------------------------------------------------------------------------------- edges

def test_edges_are_both_sides_of_a_label_change_and_not_the_border():
    m = square(16, 4, 8)
    e = mask_edges(m)
    assert e[4, 5] and e[3, 5]  # inner ring and outer ring
    assert e[3, 5] and e[8, 5] and e[5, 3] and e[5, 8]
    assert not e[5, 5] and not e[0, 0]
    assert not mask_edges(np.ones((8, 8))).any()  # a uniform map has no edges, not even on the border


def test_neighbouring_labels_do_not_cancel():
    # a 2 between a 1 and a 3: the label-map Laplacian 1 + 3 + 2 + 2 - 4 * 2 = 0 would miss it
    m = np.array([[2, 2, 2], [1, 2, 3], [2, 2, 2]], np.uint8)
    assert mask_edges(m)[1, 1]


def test_void_creates_no_boundary():
    gt = np.zeros((20, 20), np.uint8)
    gt[8:11, 8:11] = 255  # a void fragment inside the background
    assert not mask_edges(fill_void(gt, 2)).any()
    # a VOC void band around an object: one boundary, along the band
    gt = square(40, 10, 30, value=1)
    band = (square(40, 8, 32) > 0) & ~(square(40, 12, 28) > 0)
    gt[band] = 255
    edges = mask_edges(fill_void(gt, 2))
    assert edges.any() and not edges[~band].any()  # the boundary runs inside the band
    assert edges[10, 20] and edges[9, 20] and not edges[8, 20] and not edges[11, 20]  # its middle


# ---------------------------------------------------------------------- known shifts

def test_boundary_shifted_by_one_pixel_is_within_tolerance():
    gt = square()
    for pred in (square(grow=1), square(grow=-1), square(shift=(1, 0)), square(shift=(0, -1))):
        s = boundary_scores(pred, gt, 2, tolerance=2)
        assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)


def test_boundary_shifted_by_four_pixels_is_missed():
    gt = square()
    for pred in (square(grow=4), square(grow=-4)):
        s = boundary_scores(pred, gt, 2, tolerance=2)
        assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)
    # a wider tolerance accepts it
    assert boundary_scores(square(grow=4), gt, 2, tolerance=8)["f1"] == 1.0  # corners: 5 * sqrt(2) px


def test_exact_counts_and_accumulation_over_images():
    gt = square(16, 4, 8)
    counts = boundary_counts(gt, gt, 2, 0)
    ring = int(mask_edges(gt).sum())
    assert counts.tolist() == [ring, ring, ring, ring]
    empty = np.zeros_like(gt)
    # no predicted edge: recall 0, precision undefined, F1 0
    s = boundary_scores(empty, gt, 2)
    assert s["recall"] == 0.0 and s["precision"] is None and s["f1"] == 0.0
    # two images: counts add before dividing (not a mean of per-image scores)
    both = boundary_scores([gt, empty], [gt, gt], 2, tolerance=0)
    assert both["recall"] == pytest.approx(0.5) and both["precision"] == 1.0
    assert both["gt_edges"] == 2 * ring


def test_predicted_edges_on_void_are_not_judged():
    gt = np.zeros((32, 32), np.uint8)
    gt[:, 16:] = 255
    pred = square(32, 20, 28)  # an object inside the void half only
    s = boundary_scores(pred, gt, 2)
    assert s["pred_edges"] == 0 and s["gt_edges"] == 0


def test_an_edge_inside_a_void_band_is_matched_to_the_boundary_in_that_band():
    gt = square(64, 20, 40)
    ring = square(64, 17, 43) & ~square(64, 23, 37).astype(bool)
    gt[ring.astype(bool)] = 255  # a VOC void band 6 px wide around the object
    pred = square(64, 18, 42)  # its edge 1 px inside the band's outer side, 2 px off its middle
    s = boundary_scores(pred, gt, 2, tolerance=1)
    assert s["pred_edges"] > 0 and s["matched_pred"] == s["pred_edges"]
    # outside the band the tolerance still applies: an edge 6 px out is unmatched
    far = boundary_scores(square(64, 12, 48), gt, 2, tolerance=1)
    assert far["pred_edges"] > 0 and far["matched_pred"] == 0


SHARED_MASKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc12_photos" / "SegmentationClassAug"


def test_a_perfect_prediction_scores_one_on_real_voc_masks():
    if not SHARED_MASKS.is_dir():
        pytest.skip("../shared/data/voc12_photos not found (real VOC masks)")
    from eps.data.io import read_index_png

    gts = [read_index_png(p) for p in sorted(SHARED_MASKS.glob("*.png"))[:40]]
    assert sum(int((g == 255).sum()) for g in gts) > 10000  # the void bands are there
    for pred in ([fill_void(g, 21) for g in gts], gts):
        s = boundary_scores(pred, gts, 21)
        assert s["precision"] == s["recall"] == s["f1"] == 1.0
        assert s["pred_edges"] == s["gt_edges"] > 10000


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        boundary_counts(np.zeros((4, 4)), np.zeros((4, 5)), 2)


# ---------------------------------------------------------------- folders, SBD, .mat

def make_folders(tmp_path, ids=("a", "b")):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for k, i in enumerate(ids):
        save_png(gt_dir / f"{i}.png", square(32, 8, 24))
        save_png(pred_dir / f"{i}.png", square(32, 8, 24, grow=k))  # b: one pixel larger
    return gt_dir, pred_dir


def test_evaluate_masks_reports_boundaries(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path)
    result = evaluate_masks(pred_dir, gt_dir, ["a", "b"], 2, boundary_tolerance=2)
    b = result["boundary"]
    assert b["precision"] == b["recall"] == b["f1"] == 1.0 and b["source"] == "masks"
    assert "boundary" not in evaluate_masks(pred_dir, gt_dir, ["a"], 2)
    strict = evaluate_boundaries(pred_dir, gt_dir, ["a", "b"], 2, tolerance=0)
    assert 0 < strict["f1"] < 1
    assert evaluate_boundaries(pred_dir, gt_dir, ["a", "b"], 2, tolerance=0, workers=2) == strict


def sbd_mat(path, boundaries, segmentation):
    cells = np.empty((len(boundaries), 1), dtype=object)
    for k, b in enumerate(boundaries):
        cells[k, 0] = scipy.sparse.csc_matrix(b.astype(np.uint8))
    scipy.io.savemat(path, {"GTcls": {"Boundaries": cells, "Segmentation": segmentation.astype(np.uint8),
                                      "CategoriesPresent": np.array([[1]], np.uint8)}})


def test_sbd_boundaries_from_mat(tmp_path):
    gt_dir, pred_dir = make_folders(tmp_path, ids=("a",))
    one, two = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    one[8, 8:24] = True
    two[23, 8:24] = True
    (tmp_path / "cls").mkdir()
    sbd_mat(tmp_path / "cls" / "a.mat", [one, two], square(32, 8, 24))
    edges = read_gt_boundaries(tmp_path / "cls", "a", (32, 32))
    assert edges.dtype == bool and (edges == (one | two)).all()
    # only the top and bottom boundaries are given: every one is found, half the predicted ones match
    b = evaluate_masks(pred_dir, gt_dir, ["a"], 2, boundary_tolerance=2, boundary_dir=tmp_path / "cls")["boundary"]
    assert b["recall"] == 1.0 and 0.3 < b["precision"] < 0.7 and b["source"] == "boundaries"
    with pytest.raises(EpsError, match=r"b\.mat: file not found"):
        read_gt_boundaries(tmp_path / "cls", "b", (32, 32))
    with pytest.raises(EpsError, match="boundary size 32x32 differs"):
        read_gt_boundaries(tmp_path / "cls", "a", (30, 32))
    # no Boundaries field: the edges of the Segmentation
    scipy.io.savemat(tmp_path / "cls" / "c.mat", {"GTcls": {"Segmentation": square(32, 8, 24)}})
    assert (read_gt_boundaries(tmp_path / "cls", "c", (32, 32)) == mask_edges(square(32, 8, 24))).all()


def test_known_confusion_with_pascal_context_mat(tmp_path):
    """m = FP / TP with a .mat context (PASCAL-Context LabelMap, values above 255)."""
    gt = np.zeros((10, 10), np.uint8)
    gt[0:2, :] = 1  # 20 pixels of class 1
    pred = gt.copy()
    pred[2:4, :] = 1  # 20 more pixels predicted as class 1 ...
    ctx = np.full((10, 10), 7, np.int32)
    ctx[2:3, :] = 300  # ... 10 of them on context 300 ("rail"): m = 10 / 20
    save_png(tmp_path / "gt" / "x.png", gt)
    save_png(tmp_path / "pred" / "x.png", pred)
    (tmp_path / "ctx").mkdir()
    scipy.io.savemat(tmp_path / "ctx" / "x.mat", {"LabelMap": ctx.astype(np.uint16)})
    assert (read_context(tmp_path / "ctx", "x", (10, 10)) == ctx).all()
    result = evaluate_masks(tmp_path / "pred", tmp_path / "gt", ["x"], 2, context_dir=tmp_path / "ctx",
                            pairs=[(300, 1)])
    (item,) = result["confusion"]
    assert (item["fp"], item["tp"], item["m"]) == (10, 20, 0.5)
    assert item["class_iou"] == pytest.approx(0.5)
    with pytest.raises(EpsError, match=r"y\.png: file not found"):
        read_context(tmp_path / "ctx", "y", (10, 10))
    (tmp_path / "ctx" / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(EpsError, match=r"bad\.mat: not a readable MATLAB file"):
        read_context(tmp_path / "ctx", "bad", (10, 10))


# ------------------------------------------------------------------- CLI and summary

def test_cli_and_summary_columns(tmp_path, capsys):
    gt_dir, pred_dir = make_folders(tmp_path)
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\n")
    out = tmp_path / "eval"
    assert main(["evaluate-masks", "--pred", str(pred_dir), "--gt", str(gt_dir), "--ids", str(ids),
                 "--num-classes", "2", "--boundary-tolerance", "2", "--out", str(out)]) == 0
    assert "boundary (tolerance 2 px): P 100.00 R 100.00 F 100.00" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["confusion"] = [{"pair": "rail->train", "m": 0.25, "class_iou": 0.4},
                            {"pair": "platform->train", "m": 0.5, "class_iou": 0.4}]
    (out / "metrics.json").write_text(json.dumps(metrics))
    summary = tmp_path / "summary.csv"
    collect_summary([("eps", "pseudo_masks", out / "metrics.json")], summary)
    header, row = list(csv.reader(summary.open()))
    assert header == ["variant", "stage", "miou", "boundary_precision", "boundary_recall", "boundary_f1",
                      "confusion:rail->train", "iou:train", "confusion:platform->train"]
    values = dict(zip(header, row))
    assert float(values["boundary_f1"]) == pytest.approx(100.0)
    assert float(values["iou:train"]) == pytest.approx(40.0)
    assert float(values["confusion:platform->train"]) == pytest.approx(0.5)


def test_index_takes_pascal_context_mat(tiny_voc, tmp_path):
    from eps.data.build import build_index
    from eps.data.index import read_index

    ctx = tiny_voc / "trainval"
    ctx.mkdir()
    scipy.io.savemat(ctx / "2007_000001.mat", {"LabelMap": np.full((12, 16), 300, np.uint16)})
    dataset = {"type": "voc", "name": "v", "root": str(tiny_voc), "context_dir": "trainval",
               "labels_file": "cls_labels.npy", "splits": {"train": "train.txt"}}
    build_index(dataset, tmp_path / "index.csv")
    index = read_index(tmp_path / "index.csv").set_index("id")
    assert index.loc["2007_000001", "context"].endswith("trainval/2007_000001.mat")
    assert index.loc["2007_000000", "context"] == ""
    (ctx / "2007_000001.mat").unlink()
    with pytest.raises(EpsError, match="no context file for any listed id"):
        build_index(dataset, tmp_path / "index2.csv")


@pytest.mark.parametrize("tolerance", [0, 1, 1.5, 2, 3.7, 8, 11])
def test_pixels_near_an_edge_are_those_of_the_distance_transform(tolerance):
    from scipy import ndimage

    from eps.metrics import _near

    rng = np.random.default_rng(int(tolerance * 10))
    for shape, density in (((37, 53), 0.02), ((40, 31), 0.3), ((25, 25), 0.0), ((3, 20), 0.1), ((1, 9), 0.3)):
        edges = rng.random(shape) < density
        edges[0, 5] = edges[-1, -1] = density > 0  # edges on the border: shifts must not wrap around
        expected = (ndimage.distance_transform_edt(~edges) <= tolerance) if edges.any() else np.zeros(shape, bool)
        assert np.array_equal(_near(edges, tolerance), expected)
