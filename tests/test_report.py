"""The report: tables from summary.csv, figure functions (PNG sizes), the on-the-fly estimated
saliency, and make_figures / the CLI on a tiny synthetic world."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eps.cli import main
from eps.errors import EpsError
from eps.report import (estimated_saliency, image_grid, make_figures, per_class_bars, sample_ids,
                        segmenter_output, training_curves, write_tables)


def size(path):
    with Image.open(path) as img:
        return img.size


def write_summary(path):
    header = ["variant", "stage", "miou", "boundary_precision", "boundary_recall", "boundary_f1",
              "confusion:rail->train", "iou:train"]
    rows = [["cam", "pseudo_masks", "23.2", "30.1", "40.2", "34.4", "1.24", "12.5"],
            ["eps", "pseudo_masks", "42.3", "60.0", "55.5", "57.7", "0.56", "40.6"],
            ["cam", "crf", "26.1", "", "", "", "1.25", "13.0"],
            ["eps", "crf", "53.6", "", "", "", "", ""]]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_tables(tmp_path):
    summary = write_summary(tmp_path / "summary.csv")
    text = write_tables(summary, tmp_path / "tables.md", tmp_path / "tables.html")
    assert (tmp_path / "tables.md").read_text() == text
    assert "| variant | pseudo-masks | pseudo-masks + CRF |" in text
    assert "| eps | 42.3 | 53.6 |" in text
    assert "| eps | pseudo-masks | 60.0 | 55.5 | 57.7 |" in text  # boundary rows only where present
    assert "| variant | m rail->train | IoU train |" in text
    assert "| cam | 1.24 | 12.5 |" in text and "| eps | - | - |" in text  # CRF table: empty cells
    page = (tmp_path / "tables.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>57.7</td>" in page and "rail-&gt;train" in page
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(EpsError, match=r"bad\.csv: not an eps summary\.csv"):
        write_tables(tmp_path / "bad.csv", tmp_path / "t.md")


def test_bars_and_curves_have_fixed_sizes(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"miou": 0.5, "per_class": [
        {"class": "background", "iou": 0.9}, {"class": "train", "iou": 0.1}, {"class": "boat", "iou": None}]}))
    assert size(per_class_bars(metrics, tmp_path / "bars.png", "eps pseudo_masks")) == (640, 320)
    log = tmp_path / "train_log.csv"
    lines = ["iteration,loss,loss_cls,loss_sal,lr,seconds"]
    lines += [f"{i},{1 / i:.4f},{0.5 / i:.4f},{0.5 / i:.4f},0.01,{i * 0.1:.1f}" for i in range(1, 201)]
    log.write_text("\n".join(lines) + "\n")
    cam_log = tmp_path / "cam_log.csv"
    cam_log.write_text("iteration,loss,lr,seconds\n1,0.9,0.01,0.1\n2,0.8,0.01,0.2\n")
    # a grid of two panels a row: loss, loss_cls / loss_sal
    assert size(training_curves({"eps": log, "cam": cam_log}, tmp_path / "curves.png")) == (1280, 640)
    assert size(training_curves({"seg": cam_log}, tmp_path / "seg.png", columns=("loss",))) == (640, 320)
    # the map-selection share gets a fourth panel when a log has values, none when it is empty
    share = tmp_path / "share_log.csv"
    share.write_text("iteration,loss,loss_cls,loss_sal,fg_share,lr,seconds\n1,0.9,0.8,0.1,0.5,0.01,0.1\n"
                     "2,0.8,0.7,0.1,0.75,0.01,0.2\n")
    empty = tmp_path / "empty_share.csv"
    empty.write_text("iteration,loss,loss_cls,loss_sal,fg_share,lr,seconds\n1,0.9,0.9,0,,0.01,0.1\n")
    assert size(training_curves({"eps": share, "cam": empty}, tmp_path / "c4.png")) == (1280, 640)
    # the CAM baseline's loss_sal, zero throughout, is no panel (no flat line): loss, loss_cls
    assert size(training_curves({"cam": empty}, tmp_path / "c3.png")) == (1280, 320)
    with pytest.raises(EpsError, match="metrics.json: not an eps metrics file"):
        metrics.write_text("{}")
        per_class_bars(metrics, tmp_path / "x.png")


def test_grid_size_and_sampling(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    grey = np.full((20, 30), 0.5)
    path = image_grid([[rgb, grey, None], [rgb, grey, rgb]], ["a", "b", "c"], tmp_path / "g.png", row_labels=["x", "y"])
    assert size(path) == (3 * 140, 2 * 140 + 30)
    with pytest.raises(EpsError, match="one panel per title"):
        image_grid([[rgb]], ["a", "b"], tmp_path / "h.png")
    ids = [f"id{i}" for i in range(20)]
    chosen = sample_ids(ids, 6, seed=0)
    assert len(chosen) == 6 and chosen == sample_ids(ids, 6, seed=0) and chosen == sorted(chosen, key=ids.index)
    assert chosen != sample_ids(ids, 6, seed=1)
    assert sample_ids(ids[:3], 6, 0) == ids[:3]


def classifier(background=True, **params):
    from eps.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("small", 2, background=background).eval()
    meta = {"backbone": "small", "num_classes": 2, "background": background, "classes": ["train", "plane"],
            "params": {"tau": 0.4, "lam": 0.5, "selection": "adaptive", "background_classes": [], **params}}
    return model, meta


def test_estimated_saliency_is_the_eps_blend_at_image_size():
    from eps.losses import saliency_loss
    from eps.data.imagenet import normalize

    model, meta = classifier(lam=0.3)
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    sal = np.zeros((40, 56), np.uint8)
    sal[10:30, 10:30] = 255
    est = estimated_saliency(model, meta, image, sal, np.array([1, 0]))
    assert est.shape == (40, 56) and 0 <= est.min() and est.max() <= 1
    # the same numbers as the loss of training, at the CAM's size
    with torch.no_grad():
        cam = model.forward_cam(torch.from_numpy(normalize(image))[None])
        ref = saliency_loss(cam, torch.from_numpy(sal / 255.0).float()[None, None], torch.tensor([[1.0, 0.0]]),
                            0.4, 0.3)[3]
    small = torch.nn.functional.interpolate(torch.from_numpy(est)[None, None], size=ref.shape[-2:], mode="area")
    assert abs(float(small.mean()) - float(ref.clamp(0, 1).mean())) < 0.05
    # predefined selection with a class name, and the CAM baseline (no estimate)
    model2, meta2 = classifier(selection="predefined", background_classes=["train"])
    assert estimated_saliency(model2, meta2, image, sal, np.array([1, 1])).shape == (40, 56)
    cam_model, cam_meta = classifier(background=False)
    assert estimated_saliency(cam_model, cam_meta, image, sal, np.array([1, 0])) is None


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """The session's synthetic world with an index as dataset "tiny", its saliency shard, an
    untrained classifier and segmenter."""
    from eps.data.build import build_index
    from eps.models import build_segmenter
    from eps.saliency import extract_shard

    root = tmp_path_factory.mktemp("world")
    index = root / "res" / "index.csv"
    build_index({"type": "synthetic", "name": "tiny", "root": str(tiny_world["data"])}, index)
    sal = extract_shard(index, "precomputed", "1-of-1", root / "res" / "sal.h5")
    from eps.models import build_classifier

    torch.manual_seed(0)
    cls = build_classifier("small", 5, background=True)
    meta = {"backbone": "small", "num_classes": 5, "background": True, "dataset": "tiny",
            "classes": ["train", "boat", "bird", "cow", "plane"],
            "params": {"tau": 0.4, "lam": 0.5, "selection": "adaptive", "background_classes": []}}
    torch.save({"state_dict": cls.state_dict(), "meta": meta}, root / "classifier.pt")
    seg = build_segmenter("deeplab_small", 6)
    torch.save({"state_dict": seg.state_dict(), "meta": {"model": "deeplab_small", "num_classes": 6}},
               root / "model.pt")
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps({"miou": 0.3, "per_class": [{"class": "background", "iou": 0.3}]}))
    log = root / "train_log.csv"
    log.write_text("iteration,loss,loss_cls,loss_sal,lr,seconds\n1,0.9,0.8,0.1,0.01,0.1\n2,0.7,0.6,0.1,0.01,0.2\n")
    return root, index, sal


def test_make_figures(world, tiny_world, tmp_path):
    root, index, sal = world
    masks = tiny_world["masks"]  # ground truth standing in for pseudo-masks
    written = make_figures(
        tmp_path / "fig", index_csv=index, split="train", metrics=[("eps", "pseudo_masks", root / "metrics.json")],
        train_logs=[("eps", root / "train_log.csv")], seg_logs=[("eps", root / "train_log.csv")],
        masks=[("cam", masks), ("naive", masks), ("eps", masks)], classifier=root / "classifier.pt",
        segmenter=root / "model.pt", saliency_shards=[sal], params={"sample": 3, "seed": 1},
        predict_params={"scales": [1.0], "flip": True})
    names = sorted(p.relative_to(tmp_path / "fig").as_posix() for p in written)
    assert names == ["per_class/eps_pseudo_masks.png", "qualitative.png", "segmenter_curves.png",
                     "training_curves.png", "variants.png"]
    assert size(tmp_path / "fig" / "qualitative.png") == (7 * 140, 3 * 140 + 30)
    assert size(tmp_path / "fig" / "variants.png") == (5 * 140, 3 * 140 + 30)
    with pytest.raises(EpsError, match="report.method: variant 'nope'"):
        make_figures(tmp_path / "x", index_csv=index, split="train", masks=[("cam", masks)],
                     params={"method": "nope"})


def test_segmenter_output_shape(world):
    from eps.models.deeplab import load_segmenter

    root, _, _ = world
    model, _ = load_segmenter(root / "model.pt")
    image = np.zeros((40, 36, 3), np.uint8)
    out = segmenter_output(model, image, {"scales": [1.0, 0.5], "flip": False})
    assert out.shape == (40, 36) and out.dtype == np.uint8 and out.max() < 6


def test_cli(world, tiny_world, tmp_path, capsys):
    root, index, sal = world
    summary = write_summary(tmp_path / "summary.csv")
    assert main(["report-tables", "--summary", str(summary), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").is_file()
    masks = tiny_world["masks"]
    args = ["report-figures", "--index", str(index), "--split", "train", "--masks", f"eps:{masks}",
            "--classifier", str(root / "classifier.pt"), "--saliency", str(sal),
            "--params", '{"sample": 2}', "--out", str(tmp_path / "f")]
    assert main(args) == 0
    assert "wrote 2 figures" in capsys.readouterr().out
    assert size(tmp_path / "f" / "qualitative.png") == (7 * 140, 2 * 140 + 30)
    assert main(args[:-2] + ["--metrics", "broken", "--out", str(tmp_path / "g")]) == 2
    assert "--metrics 'broken': expected NAME:NAME:PATH" in capsys.readouterr().err
    assert main(args[:-4] + ["--params", '{"samples": 2}', "--out", str(tmp_path / "g")]) == 2
    assert "unknown report parameter(s) ['samples']" in capsys.readouterr().err
