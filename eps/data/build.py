"""Building the index from a dataset config block (`eps index`): the one place that calls the
dataset readers (eps.data.voc, coco, folder; synthetic is the VOC layout).

Dataset config blocks (`build_index`), paths relative to `root` unless absolute
(`root` itself relative to the working directory):

- common keys: `type` (voc | coco | folder | synthetic), `name` (dataset name written
  to classes.json; default: the folder holding index.csv), `root`.
- `voc`: `splits` ({split: list file, relative to root/ImageSets/Segmentation/ or absolute}),
  `mask_dir` (default: SegmentationClassAug or SegmentationClass, first that exists),
  `saliency_dir`, `context_dir`, `labels_file` (cls_labels.npy), `image_dir` (JPEGImages),
  `image_ext` (.jpg, falling back to .png), `classes` (default: the 20 VOC classes),
  `num_classes`, `contexts` (names of the context classes).
- `coco`: `splits` ({split: {images, annotations, masks, list}}, see `eps.data.coco`),
  `saliency_dir`, `drop_unlabeled` (default true), `classes`.
- `folder`: `labels_csv`, `image_dir` (default images), `mask_dir`, `saliency_dir`,
  `classes` (default: every name in the CSV, sorted), `split` (default train).
- `synthetic`: the VOC layout written by `eps synth`: `root` holds JPEGImages,
  SegmentationClass, SALImages, ContextClass, cls_labels.npy and meta.json ("classes",
  "contexts"); `splits` defaults to every list in ImageSets/Segmentation.
"""

from __future__ import annotations

import json

from pathlib import Path

import pandas as pd

from eps.data import coco, folder, voc
from eps.data.index import read_index, write_index
from eps.data.rows import check_keys
from eps.errors import EpsError, file_error

_COMMON_KEYS = {"type", "name", "root"}
CONFIG_KEYS = {
    "voc": _COMMON_KEYS | {"splits", "mask_dir", "saliency_dir", "context_dir", "labels_file",
                           "image_dir", "image_ext", "classes", "num_classes", "contexts"},
    "coco": _COMMON_KEYS | {"splits", "saliency_dir", "drop_unlabeled", "classes"},
    "folder": _COMMON_KEYS | {"labels_csv", "image_dir", "mask_dir", "saliency_dir", "classes",
                              "split"},
    "synthetic": _COMMON_KEYS | {"splits"},
}


def build_index(dataset_config: dict, out_csv, *, where: str = "dataset") -> pd.DataFrame:
    """Read the dataset described by `dataset_config` and write its index beside `out_csv`."""
    cfg = dict(dataset_config)
    kind = cfg.get("type")
    if kind not in CONFIG_KEYS:
        raise EpsError(f"{where}.type: expected one of {', '.join(CONFIG_KEYS)}, got {kind!r}")
    check_keys(cfg, CONFIG_KEYS[kind], where)
    if not cfg.get("root"):
        raise EpsError(f"{where}.root: required")
    root = Path(cfg.pop("root")).expanduser()
    if not root.is_dir():
        raise file_error(root, f"dataset root not found ({where}.root)")
    cfg.pop("type")
    name = cfg.pop("name", None) or Path(out_csv).resolve().parent.name
    contexts: list[str] = []

    if kind == "voc":
        contexts = list(cfg.pop("contexts", None) or [])
        if "splits" not in cfg:
            raise EpsError(f"{where}.splits: required for type voc")
        rows, classes = voc.read_voc(root, **cfg)
    elif kind == "synthetic":
        meta_path = root / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
            classes, contexts = list(meta["classes"]), list(meta.get("contexts", []))
        except FileNotFoundError:
            raise file_error(meta_path, "file not found (is this a synthetic world?)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise file_error(meta_path, f"expected JSON with 'classes' and 'contexts' ({exc})") from None
        splits = cfg.get("splits") or {
            p.stem: p.name for p in sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))}
        if not splits:
            raise file_error(root / "ImageSets" / "Segmentation", "no split lists (*.txt)")
        rows, classes = voc.read_voc(
            root, splits, mask_dir="SegmentationClass", saliency_dir="SALImages",
            context_dir="ContextClass", labels_file="cls_labels.npy", classes=classes)
    elif kind == "coco":
        if "splits" not in cfg:
            raise EpsError(f"{where}.splits: required for type coco")
        rows, classes = coco.read_coco(root, **cfg)
    else:
        if "labels_csv" not in cfg:
            raise EpsError(f"{where}.labels_csv: required for type folder")
        rows, classes = folder.read_folder(root, **cfg)

    write_index(rows, classes, out_csv, dataset=name, contexts=contexts)
    return read_index(out_csv)
