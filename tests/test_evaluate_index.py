"""Evaluation reads each image's ground truth from the index, whatever the dataset layout:
a VOC folder with only SegmentationClass, COCO label PNGs, a folder dataset with one split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from tiny_workflow import snakemake

from eps.cli import main
from eps.data.build import build_index
from eps.data.index import split_ground_truth
from eps.data.io import read_index_png, write_gray_png, write_index_png, write_rgb

ROOT = Path(__file__).resolve().parents[1]


def VOC(root) -> dict:
    return {"type": "voc", "name": "tiny", "root": str(root), "splits": {"train": "train.txt", "val": "val.txt"}}


def predictions_from_masks(index_csv, split, out: Path, wrong_id=None) -> Path:
    """The split's ground truth as predictions; in `wrong_id` the first row becomes class 1."""
    ids, masks, _ = split_ground_truth(index_csv, split)
    for image_id in ids:
        mask = read_index_png(masks[image_id]).copy()
        if image_id == wrong_id:
            mask[0] = 1
        write_index_png(out / f"{image_id}.png", mask)
    return out


def evaluate(index_csv, split, pred, out, *extra) -> dict:
    code = main(["evaluate-masks", "--pred", str(pred), "--index", str(index_csv), "--split", split,
                 "--out", str(out), *map(str, extra)])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_voc_folder_with_only_segmentation_class(tiny_voc, tmp_path):
    index = tmp_path / "idx" / "index.csv"
    build_index(VOC(tiny_voc), index)
    assert not (tiny_voc / "SegmentationClassAug").exists()
    perfect = evaluate(index, "train", predictions_from_masks(index, "train", tmp_path / "p1"), tmp_path / "m1",
                       "--boundary-tolerance", 1)
    assert perfect["miou"] == 1.0 and perfect["num_images"] == 3 and perfect["num_classes"] == 21
    assert perfect["boundary"]["f1"] == 1.0
    worse = evaluate(index, "train", predictions_from_masks(index, "train", tmp_path / "p2", "2007_000002"),
                     tmp_path / "m2")
    assert worse["miou"] < 1.0 and worse["hist"][20][1] > 0  # class 20 of 2007_000002 predicted as 1


def test_coco_label_pngs_are_scored_with_its_81_classes(tmp_path):
    root = tmp_path / "coco"
    ids = ["COCO_val2014_000000000009", "COCO_val2014_000000000025"]
    for k, image_id in enumerate(ids):
        write_rgb(root / "val2014" / f"{image_id}.jpg", np.zeros((6, 8, 3), np.uint8))
        mask = np.zeros((6, 8), np.uint8)
        mask[:3, :4] = 1 + 79 * k  # person, toothbrush
        mask[-1] = 255
        write_index_png(root / "masks" / f"{image_id}.png", mask)
    (root / "val.txt").write_text("\n".join(ids) + "\n")
    index = tmp_path / "idx" / "index.csv"
    build_index({"type": "coco", "name": "c", "root": str(root),
                 "splits": {"val": {"images": "val2014", "masks": "masks", "list": "val.txt"}}}, index)
    metrics = evaluate(index, "val", predictions_from_masks(index, "val", tmp_path / "p"), tmp_path / "m")
    assert metrics["num_classes"] == 81 and metrics["miou"] == 1.0
    assert metrics["per_class"][80]["class"] == "toothbrush" and metrics["per_class"][80]["iou"] == 1.0


def test_a_folder_dataset_with_one_split(tmp_path):
    root = tmp_path / "f"
    for k, name in enumerate("ab"):
        write_rgb(root / "images" / f"{name}.png", np.zeros((5, 5, 3), np.uint8))
        write_index_png(root / "masks" / f"{name}.png", np.full((5, 5), k + 1, np.uint8))
    (root / "labels.csv").write_text("id,labels\na,cat\nb,dog\n")
    index = tmp_path / "idx" / "index.csv"
    build_index({"type": "folder", "name": "f", "root": str(root), "labels_csv": "labels.csv",
                 "mask_dir": "masks", "split": "test"}, index)
    metrics = evaluate(index, "test", predictions_from_masks(index, "test", tmp_path / "p", "b"), tmp_path / "m")
    assert metrics["num_images"] == 2 and metrics["hist"][2] == [0, 5, 20]


def test_evaluation_through_the_index_refuses_what_it_cannot_score(tiny_voc, tmp_path, capsys):
    index = tmp_path / "idx" / "index.csv"
    build_index(VOC(tiny_voc), index)
    pred = predictions_from_masks(index, "train", tmp_path / "p")
    base = ["evaluate-masks", "--pred", str(pred), "--index", str(index), "--out", str(tmp_path / "m")]
    cases = [
        (base + ["--split", "train", "--gt", str(tiny_voc)], "drop --gt"),
        (base, "needs --split"),
        (base + ["--split", "nope"], "unknown split 'nope'"),
        (base + ["--split", "train", "--num-classes", "5"], "the index has 21 classes"),
        (base + ["--split", "train", "--pairs", '[["rail", "train"]]'], "unknown context"),
        (base[:3] + ["--gt", str(tiny_voc), "--split", "train", "--out", str(tmp_path / "m")], "--split goes with --index"),
        (base[:3] + ["--gt", str(tiny_voc), "--out", str(tmp_path / "m")], "--gt needs --ids"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "m").exists()
    # a split with an image that has no mask (labels from cls_labels.npy): one line naming the index
    (tiny_voc / "SegmentationClass" / "2007_000003.png").unlink()
    build_index({**VOC(tiny_voc), "labels_file": "cls_labels.npy"}, index)
    assert main(base[:-2] + ["--split", "val", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(index) in err[0] and "no ground-truth mask" in err[0], err
    assert not (tmp_path / "m").exists()


def _snakemake(args, cwd):
    return snakemake([*args, "-s", str(ROOT / "Snakefile"), "--directory", str(cwd)], cwd=cwd)


def test_the_workflow_evaluates_through_the_index(tiny_voc, tmp_path):
    """A VOC folder without SegmentationClassAug: every evaluation command reads the index
    (a dry run), and the saliency evaluation runs for real against SegmentationClass."""
    cfg = yaml.safe_load((ROOT / "configs" / "voc12_cpu.yaml").read_text())
    cfg["dataset"] = {"name": "tiny", "type": "voc", "root": str(tiny_voc), "saliency_dir": "SALImages",
                      "splits": {"train": "train.txt", "val": "val.txt"}}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    dry = _snakemake(["-n", "-p", "--cores", "1", "--configfile", str(config)], tmp_path)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out
    commands = [line for line in out.splitlines() if "eps evaluate-masks" in line]
    # pseudo-masks and CRF of cam and eps on train, the EPS segmenter without and with CRF on val
    assert len(commands) == 6 and all("--index results/tiny/index.csv" in c for c in commands)
    assert "SegmentationClassAug" not in out
    run = _snakemake(["results/tiny/saliency/precomputed/metrics.json", "--cores", "1", "--configfile", str(config)],
                     tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    scores = json.loads((tmp_path / "results/tiny/saliency/precomputed/metrics.json").read_text())
    assert scores["images"] == 4 and scores["mae"] == 0  # the tiny folder's saliency maps are its masks


def test_a_folder_dataset_declares_only_its_split(tmp_path):
    root = tmp_path / "f"
    for name in "ab":
        write_rgb(root / "images" / f"{name}.png", np.zeros((5, 5, 3), np.uint8))
        write_gray_png(root / "sal" / f"{name}.png", np.zeros((5, 5), np.uint8))
    (root / "labels.csv").write_text("id,labels\na,cat\nb,dog\n")
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["dataset"] = {"name": "f", "type": "folder", "root": str(root), "labels_csv": "labels.csv",
                      "saliency_dir": "sal", "split": "train"}
    cfg["saliency"]["method"] = "precomputed"
    cfg["segmenter"]["enabled"] = False
    config = tmp_path / "f.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = _snakemake(["results/f/index.csv", "--cores", "1", "--configfile", str(config)], tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "results/f/ids").iterdir()) == ["train.txt"]


def test_the_co_occurrence_confusion_reads_the_context_masks_the_index_records(tiny_world, tmp_path, capsys):
    index = tmp_path / "idx" / "index.csv"
    build_index({"type": "synthetic", "name": "w", "root": str(tiny_world["data"])}, index)
    pred = predictions_from_masks(index, "train", tmp_path / "p")
    pairs = json.dumps([["rail", "train"], ["water", "boat"]])
    metrics = evaluate(index, "train", pred, tmp_path / "m", "--pairs", pairs)
    assert [c["pair"] for c in metrics["confusion"]] == ["rail->train", "water->boat"]
    assert all(c["fp"] == 0 for c in metrics["confusion"])  # a perfect prediction confuses nothing
    # predict every context pixel as the class that co-occurs with it: now counted
    ids, _, contexts = split_ground_truth(index, "train")
    for image_id in ids:
        mask = read_index_png(pred / f"{image_id}.png").copy()
        mask[read_index_png(contexts[image_id]) == 1] = 1  # rail -> train
        write_index_png(pred / f"{image_id}.png", mask)
    confused = evaluate(index, "train", pred, tmp_path / "m2", "--pairs", pairs)
    assert confused["confusion"][0]["fp"] > 0 and confused["confusion"][1]["fp"] == 0
    # an index whose split lacks a context mask: one line with the count and an example id
    import pandas as pd

    rows = pd.read_csv(index, dtype=str, keep_default_na=False)
    rows.loc[0, "context"] = ""
    rows.to_csv(index, index=False)
    assert main(["evaluate-masks", "--pred", str(pred), "--index", str(index), "--split", "train",
                 "--pairs", pairs, "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of the 12 ids of split 'train' have no context mask" in err[0], err
    assert not (tmp_path / "m3").exists()
