"""Dataset readers and the index: real VOC files when ../shared is present, tiny hand-made sets always."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from eps.data import build, coco, folder, index, voc
from eps.data.io import write_index_png, write_rgb
from eps.errors import EpsError


def _labels_table(path):
    table = np.load(path, allow_pickle=True).item()
    return {k: np.flatnonzero(v).tolist() for k, v in table.items()}


# ---------------------------------------------------------------------------- real VOC data

def test_voc_sample(shared_dir, tmp_path):
    root = shared_dir / "data" / "voc12_sample"
    rows, classes = voc.read_voc(root, {"clean": "clean.txt", "boxed": "boxed.txt"},
                                 saliency_dir="SALImages")
    assert classes == voc.VOC_CLASSES
    assert len(rows) == 63
    assert sum(r["splits"] == ["clean"] for r in rows) == 18
    assert sum(r["splits"] == ["boxed"] for r in rows) == 45
    assert all(r["mask"].endswith(f"SegmentationClassAug/{r['id']}.png") for r in rows)
    assert all(r["saliency"] and r["context"] == "" and r["labels"] for r in rows)

    # Labels derived from the masks agree with the official label file on these ids.
    official = _labels_table(shared_dir / "data" / "voc12_masks" / "metadata" / "cls_labels.npy")
    assert {r["id"]: r["labels"] for r in rows} == {r["id"]: official[r["id"]] for r in rows}

    # Same through the config path, with the label file, and back from disk.
    cfg = {"type": "voc", "name": "sample", "root": str(root), "saliency_dir": "SALImages",
           "labels_file": str(shared_dir / "data" / "voc12_masks" / "metadata" / "cls_labels.npy"),
           "splits": {"clean": "clean.txt", "boxed": str(root / "ImageSets/Segmentation/boxed.txt")}}
    df = build.build_index(cfg, tmp_path / "index.csv")
    assert list(df["id"]) == [r["id"] for r in rows]
    assert list(df["labels"]) == [r["labels"] for r in rows]
    assert index.read_classes(tmp_path / "index.csv")["dataset"] == "sample"
    assert (tmp_path / "ids" / "clean.txt").read_text().split() == \
        (root / "ImageSets/Segmentation/clean.txt").read_text().split()


# Official VOC train/val ids whose SegmentationClassAug mask and cls_labels.npy disagree
# (found by comparing all 12,031): the label file misses a masked class, or has one more.
KNOWN_VOC_MISMATCH = {
    "2008_005245": ([6, 13, 14], [6, 13]),   # val: person (14) masked, not in the label file
    "2011_001621": ([8, 14], [8, 14, 19]),   # train: tvmonitor (19) in the label file, not masked
}


def test_voc_masks_vs_label_file(shared_dir):
    """Official label file vs labels derived from masks on a few hundred real ids.

    On VOC train/val ids they agree (but for two known ids); on SBD-only train_aug ids the
    label file (from detection annotations) may list more classes than the SBD mask shows,
    never fewer.
    """
    meta = shared_dir / "data" / "voc12_masks" / "metadata"
    masks = shared_dir / "data" / "voc12_masks" / "SegmentationClassAug"
    official = _labels_table(meta / "cls_labels.npy")
    voc_ids = set((meta / "train.txt").read_text().split()) | set((meta / "val.txt").read_text().split())
    aug = (meta / "train_aug.txt").read_text().split()
    sample = sorted(voc_ids)[::20] + aug[::50] + list(KNOWN_VOC_MISMATCH)
    assert len(sample) > 300
    superset = 0
    for id_ in sample:
        derived = voc.mask_labels(masks / f"{id_}.png", 20)
        if id_ in KNOWN_VOC_MISMATCH:
            assert (derived, official[id_]) == KNOWN_VOC_MISMATCH[id_]
        elif id_ in voc_ids:
            assert derived == official[id_], id_
        else:
            assert set(derived) <= set(official[id_]), id_
            superset += derived != official[id_]
    assert superset > 0  # the SBD difference shows up in the sample


# ---------------------------------------------------------------------------- tiny VOC

def test_voc_labels_file_equals_masks(tiny_voc):
    from_masks, _ = voc.read_voc(tiny_voc, {"train": "train.txt", "val": "val.txt"})
    from_file, _ = voc.read_voc(tiny_voc, {"train": "train.txt", "val": "val.txt"},
                                labels_file="cls_labels.npy", saliency_dir="SALImages")
    assert [r["labels"] for r in from_masks] == [[0], [1, 14], [19], []]
    assert [r["labels"] for r in from_file] == [r["labels"] for r in from_masks]
    assert [r["splits"] for r in from_file] == [["train"], ["train"], ["train", "val"], ["val"]]
    assert from_masks[0]["mask"].endswith("SegmentationClass/2007_000000.png")  # auto mask_dir


def test_voc_deeplab_list_and_png_images(tiny_voc):
    id_ = "2007_000001"
    (tiny_voc / "JPEGImages" / f"{id_}.jpg").rename(tiny_voc / "JPEGImages" / f"{id_}.png")
    lst = tiny_voc / "deeplab.txt"
    lst.write_text(f"/JPEGImages/{id_}.jpg /SegmentationClassAug/{id_}.png\n\n")
    rows, _ = voc.read_voc(tiny_voc, {"train": str(lst)})
    assert rows[0]["id"] == id_ and rows[0]["image"].endswith(".png")


@pytest.mark.parametrize("line, problem", [
    ("2007_000000/x", "path separator"),
    ("..", "'..'"),
    ("../2007_000000", "path separator"),
    ("2007_000009", "not found"),
])
def test_voc_bad_ids(tiny_voc, line, problem):
    lst = tiny_voc / "ImageSets" / "Segmentation" / "bad.txt"
    lst.write_text(f"2007_000000\n{line}\n")
    with pytest.raises(EpsError, match=problem) as exc:
        voc.read_voc(tiny_voc, {"train": "bad.txt"})
    assert str(exc.value).startswith(f"{lst}: ")


def test_voc_label_errors(tiny_voc):
    bad = {"2007_000000": np.zeros(21, np.float32)}
    np.save(tiny_voc / "bad.npy", bad, allow_pickle=True)
    with pytest.raises(EpsError, match="length 21, expected 20") as exc:
        voc.read_voc(tiny_voc, {"train": "train.txt"}, labels_file="bad.npy")
    assert str(exc.value).startswith(f"{tiny_voc / 'bad.npy'}: ")
    # not in the label file and no mask: no labels at all
    (tiny_voc / "SegmentationClass" / "2007_000001.png").unlink()
    np.save(tiny_voc / "part.npy", {"2007_000000": np.zeros(20)}, allow_pickle=True)
    with pytest.raises(EpsError, match="'2007_000001': no labels"):
        voc.read_voc(tiny_voc, {"train": "train.txt"}, labels_file="part.npy")
    with pytest.raises(EpsError, match="saliency folder not found"):
        voc.read_voc(tiny_voc, {"train": "train.txt"}, saliency_dir="SALnope")
    write_index_png(tiny_voc / "SegmentationClass" / "2007_000000.png", np.full((3, 3), 21, np.uint8))
    with pytest.raises(EpsError, match="mask value 21"):
        voc.read_voc(tiny_voc, {"train": "train.txt"})


def test_psa_integer_ids(tiny_voc):
    np.save(tiny_voc / "psa.npy", {2007000000: np.eye(20)[3], 2007000001: np.eye(20)[4],
                                   2007000002: np.zeros(20)}, allow_pickle=True)
    rows, _ = voc.read_voc(tiny_voc, {"train": "train.txt"}, labels_file="psa.npy", mask_dir="SegmentationClass")
    assert [r["labels"] for r in rows] == [[3], [4], []]


# ---------------------------------------------------------------------------- index

def test_index_round_trip(tiny_voc, tmp_path):
    rows, classes = voc.read_voc(tiny_voc, {"train": "train.txt", "val": "val.txt"}, saliency_dir="SALImages")
    out = tmp_path / "idx" / "index.csv"
    (out.parent / "ids").mkdir(parents=True)
    (out.parent / "ids" / "stale.txt").write_text("old\n")
    index.write_index(rows, classes, out, dataset="tiny", contexts=["water"])
    df = index.read_index(out)
    assert list(df.columns) == index.COLUMNS
    assert [got.to_dict() for _, got in df.iterrows()] == rows
    assert index.read_classes(out) == {"classes": voc.VOC_CLASSES, "contexts": ["water"], "dataset": "tiny"}
    assert sorted(p.name for p in (out.parent / "ids").iterdir()) == ["train.txt", "val.txt"]
    assert (out.parent / "ids" / "val.txt").read_text() == "2007_000002\n2007_000003\n"
    onehot = index.labels_of(df, 20)
    assert onehot.shape == (4, 20) and onehot.sum() == 4 and onehot[1, 14] == 1
    val = index.split_rows(df, "val")
    assert list(val["id"]) == ["2007_000002", "2007_000003"] and list(val.index) == [0, 1]
    with pytest.raises(EpsError, match="unknown split 'test' .*available: train, val"):
        index.split_rows(df, "test")
    assert not list(out.parent.rglob("*.tmp"))


def test_write_index_refuses_bad_rows(tmp_path):
    row = index.make_row("a", tmp_path / "a.jpg", labels=[0], splits=["train"])
    with pytest.raises(EpsError, match="duplicate id"):
        index.write_index([row, dict(row)], ["x"], tmp_path / "index.csv", dataset="d")
    with pytest.raises(EpsError, match="label 1 outside"):
        index.write_index([{**row, "labels": [1]}], ["x"], tmp_path / "index.csv", dataset="d")
    assert not (tmp_path / "index.csv").exists()


@pytest.mark.parametrize("n, count", [(0, 1), (1, 3), (7, 3), (10, 4), (63, 16), (100, 7), (5, 5)])
def test_shard_rows_cover_once(n, count):
    df = pd.DataFrame({"id": [f"i{k}" for k in range(n)]})
    shards = [index.shard_rows(df, i, count) for i in range(1, count + 1)]
    got = [x for s in shards for x in s["id"]]
    assert got == list(df["id"])
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert index.shard_rows(list(df["id"]), 1, count) == list(shards[0]["id"])


def test_parse_scatteritem():
    assert index.parse_scatteritem("2-of-4") == (2, 4)
    assert index.parse_scatteritem("shard-1-of-1") == (1, 1)
    for bad in ("0-of-4", "5-of-4", "2of4", "a-of-b"):
        with pytest.raises(EpsError):
            index.parse_scatteritem(bad)
    with pytest.raises(EpsError):
        index.shard_rows([1, 2], 3, 2)


def test_build_index_config_errors(tiny_voc, tmp_path):
    cfg = {"type": "voc", "root": str(tiny_voc), "splits": {"train": "train.txt"}}
    with pytest.raises(EpsError, match=r"^dataset\.saliency: unknown key"):
        build.build_index({**cfg, "saliency": "SALImages"}, tmp_path / "index.csv")
    with pytest.raises(EpsError, match=r"^dataset\.type"):
        build.build_index({**cfg, "type": "kitti"}, tmp_path / "index.csv")
    with pytest.raises(EpsError, match="dataset root not found"):
        build.build_index({**cfg, "root": str(tmp_path / "nope")}, tmp_path / "index.csv")
    df = build.build_index(cfg, tmp_path / "ds" / "index.csv")
    assert index.read_classes(tmp_path / "ds" / "index.csv")["dataset"] == "ds"
    assert len(df) == 3


def test_build_index_synthetic(tiny_voc, tmp_path):
    shutil.copytree(tiny_voc / "SegmentationClass", tiny_voc / "ContextClass")
    (tiny_voc / "meta.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(20)],
                                                    "contexts": ["sky", "water"]}))
    df = build.build_index({"type": "synthetic", "root": str(tiny_voc), "name": "syn"}, tmp_path / "index.csv")
    assert index.read_classes(tmp_path / "index.csv") == {
        "classes": [f"c{i}" for i in range(20)], "contexts": ["sky", "water"], "dataset": "syn"}
    assert list(df["splits"]) == [["train"], ["train"], ["train", "val"], ["val"]]
    assert all(df["context"]) and all(df["saliency"]) and all(df["mask"])


# ---------------------------------------------------------------------------- COCO

def _tiny_coco(root):
    """Three images, categories with ids 1, 3, 90 (-> classes 0, 1, 2), one image unlabelled."""
    rng = np.random.default_rng(0)
    images = []
    for k in (9, 25, 30):
        name = f"COCO_val2014_{k:012d}.jpg"
        write_rgb(root / "val2014" / name, rng.integers(0, 255, (8, 10, 3)))
        images.append({"id": k, "file_name": name, "height": 8, "width": 10})
    box = {"bbox": [0, 0, 2, 2], "area": 4, "segmentation": [[0, 0, 2, 0, 2, 2]]}
    anns = [{"id": 1, "image_id": 9, "category_id": 90, "iscrowd": 0, **box},
            {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 0, **box},
            {"id": 3, "image_id": 25, "category_id": 3, "iscrowd": 1, **box}]
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_instances(tmp_path):
    _tiny_coco(tmp_path)
    rows, classes = coco.read_coco(tmp_path, {"val": "val2014"})
    assert classes == ["person", "car", "toothbrush"]
    assert [(r["id"], r["labels"]) for r in rows] == [
        ("COCO_val2014_000000000009", [0, 2]), ("COCO_val2014_000000000025", [1])]
    rows, _ = coco.read_coco(tmp_path, {"val": {"images": "val2014"}}, drop_unlabeled=False)
    assert len(rows) == 3 and rows[2]["labels"] == []
    df = build.build_index({"type": "coco", "root": str(tmp_path), "splits": {"val": "val2014"}},
                           tmp_path / "out" / "index.csv")
    assert list(df["labels"]) == [[0, 2], [1]]


def test_coco_label_pngs(tmp_path):
    _tiny_coco(tmp_path)
    write_index_png(tmp_path / "masks" / "COCO_val2014_000000000009.png",
                    np.array([[0, 1], [80, 255]], np.uint8))
    (tmp_path / "val.txt").write_text("COCO_val2014_000000000009\n")
    rows, classes = coco.read_coco(tmp_path, {"val": {"images": "val2014", "masks": "masks", "list": "val.txt"}})
    assert classes == coco.COCO_CLASSES and len(classes) == 80
    assert rows[0]["labels"] == [0, 79] and rows[0]["mask"]
    with pytest.raises(EpsError, match="no labels"):
        coco.read_coco(tmp_path, {"val": {"images": "val2014", "masks": "masks"}})
    with pytest.raises(EpsError, match=r"splits\.val\.mask: unknown key"):
        coco.read_coco(tmp_path, {"val": {"mask": "masks"}})
    (tmp_path / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(EpsError, match="instances_val2014.json: not a COCO instances file"):
        coco.read_coco(tmp_path, {"val": "val2014"})


# ---------------------------------------------------------------------------- folder

def _tiny_folder(root, csv_text):
    for name in ("a", "b", "c"):
        write_rgb(root / "images" / f"{name}.png", np.zeros((4, 4, 3), np.uint8))
    (root / "labels.csv").write_text(csv_text)


def test_folder(tmp_path):
    _tiny_folder(tmp_path, "id,labels,splits\na,dog cat,train\n\nb,potted plant;cat,train val\nc,,val\n")
    rows, classes = folder.read_folder(tmp_path, "labels.csv")
    assert classes == ["cat", "dog", "potted plant"]
    assert [(r["id"], r["labels"], r["splits"]) for r in rows] == [
        ("a", [0, 1], ["train"]), ("b", [0, 2], ["train", "val"]), ("c", [], ["val"])]
    (tmp_path / "img.csv").write_text("image,labels\nb.png,dog\n")
    rows, classes = folder.read_folder(tmp_path, "img.csv", classes=["cat", "dog"], split="test")
    assert (rows[0]["id"], rows[0]["labels"], rows[0]["splits"], classes) == ("b", [1], ["test"], ["cat", "dog"])


def test_folder_errors(tmp_path):
    _tiny_folder(tmp_path, "id,labels\na,dog\nb,cat;bird\n")
    with pytest.raises(EpsError, match=r"labels\.csv: line 3: unknown class 'bird'") as exc:
        folder.read_folder(tmp_path, "labels.csv", classes=["cat", "dog"])
    assert str(exc.value).startswith(str(tmp_path / "labels.csv"))
    (tmp_path / "l2.csv").write_text("id,labels\na,dog\nx/../a,dog\n")
    with pytest.raises(EpsError, match="line 3: id .* path separator"):
        folder.read_folder(tmp_path, "l2.csv")
    (tmp_path / "l3.csv").write_text("id,labels\nzz,dog\n")
    with pytest.raises(EpsError, match="line 2: no image for 'zz'"):
        folder.read_folder(tmp_path, "l3.csv")
    (tmp_path / "l4.csv").write_text("name,labels\na,dog\n")
    with pytest.raises(EpsError, match="expected columns"):
        folder.read_folder(tmp_path, "l4.csv")
    with pytest.raises(EpsError, match=r"^dataset\.label_csv: unknown key"):
        build.build_index({"type": "folder", "root": str(tmp_path), "label_csv": "labels.csv"},
                          tmp_path / "index.csv")


def test_synthetic_world_index(tmp_path):
    """The real generator's layout indexes, and its label file agrees with its masks."""
    from eps.data.synthetic import generate

    generate(tmp_path / "data", num_train=6, num_val=3, size=48)
    df = build.build_index({"type": "synthetic", "root": str(tmp_path / "data")}, tmp_path / "index.csv")
    meta = index.read_classes(tmp_path / "index.csv")
    assert len(df) == 9 and meta["contexts"] and all(df["context"])
    from_masks, _ = voc.read_voc(tmp_path / "data", {"train": "train.txt", "val": "val.txt"},
                                 classes=meta["classes"])
    assert list(df["labels"]) == [r["labels"] for r in from_masks]
