"""PASCAL VOC layout reader (also used for the synthetic world, which is written in VOC layout).

Labels come from an image-level label file (the official `cls_labels.npy`) when given,
because that is what EPS trains on; otherwise they are derived from the masks. The two
differ on real VOC: for 817 SBD (train_aug-only) ids the label file, built from the
detection annotations, lists classes absent from the SBD masks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from eps.data.rows import id_problem, make_row, resolve
from eps.data.io import read_index_png
from eps.errors import EpsError, file_error

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")


def mask_labels(path, num_classes: int) -> list[int]:
    """0-based classes present in an index mask (values 1..C; 0 and 255 ignored)."""
    values = np.unique(read_index_png(path))
    bad = values[(values > num_classes) & (values != 255)]
    if bad.size:
        raise file_error(path, f"mask value {int(bad[0])} is neither 0..{num_classes} nor 255")
    return [int(v) - 1 for v in values if 1 <= v <= num_classes]


def read_list(path: Path, image_dir: str = "JPEGImages") -> list[str]:
    """Ids of a split list: one id per line, or DeepLab style `/JPEGImages/<id>.jpg ...`."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise file_error(path, "split list not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise file_error(path, f"cannot read split list ({exc})") from None
    deeplab = re.compile(rf"/?{re.escape(image_dir)}/([^/]+)\.\w+")
    ids, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        token = line.split()[0]
        m = deeplab.fullmatch(token)
        id_ = m.group(1) if m else token
        problem = id_problem(id_)
        if problem:
            raise file_error(path, f"line {n}: {problem}")
        if id_ in seen:
            raise file_error(path, f"line {n}: duplicate id {id_!r}")
        seen.add(id_)
        ids.append(id_)
    if not ids:
        raise file_error(path, "split list is empty")
    return ids


def read_label_file(path: Path, num_classes: int) -> dict[str, list[int]]:
    """cls_labels.npy: dict id -> C-dim multi-hot (string ids, or PSA's integer ids 2007000032)."""
    try:
        obj = np.load(path, allow_pickle=True)
        table = obj.item() if obj.dtype == object and obj.shape == () else None
    except FileNotFoundError:
        raise file_error(path, "label file not found") from None
    except Exception as exc:
        raise file_error(path, f"cannot load label file ({type(exc).__name__}: {exc})") from None
    if not isinstance(table, dict):
        raise file_error(path, "expected a pickled dict id -> multi-hot vector")
    out = {}
    for key, vec in table.items():
        if isinstance(key, (int, np.integer)):
            key = f"{int(key) // 10**6:04d}_{int(key) % 10**6:06d}"
        vec = np.asarray(vec).reshape(-1)
        if vec.size != num_classes:
            raise file_error(path, f"id {key!r}: label vector has length {vec.size}, expected {num_classes}")
        if vec.dtype.kind not in "biuf":
            raise file_error(path, f"id {key!r}: label vector holds {vec.dtype.name} values, expected numbers 0 / 1")
        if not np.isfinite(vec.astype(np.float64)).all():
            raise file_error(path, f"id {key!r}: label vector holds NaN or infinite values")
        out[str(key)] = np.flatnonzero(vec > 0.5).tolist()
    return out


def _optional_dir(root: Path, value, what: str) -> Path | None:
    folder = resolve(root, value)
    if folder is not None and not folder.is_dir():
        raise file_error(folder, f"{what} folder not found")
    return folder


def png_for(folder: Path | None, id_: str):
    """`folder/<id>.png` if it exists, else "" (masks and maps may cover only some ids)."""
    return folder / f"{id_}.png" if folder and (folder / f"{id_}.png").is_file() else ""


def context_for(folder: Path | None, id_: str):
    """A context mask: `folder/<id>.png`, or PASCAL-Context's `folder/<id>.mat` (LabelMap), else ""."""
    if folder and (folder / f"{id_}.mat").is_file() and not (folder / f"{id_}.png").is_file():
        return folder / f"{id_}.mat"
    return png_for(folder, id_)


def read_voc(root, splits: dict, *, mask_dir=None, saliency_dir=None, context_dir=None,
             labels_file=None, image_dir="JPEGImages", image_ext=".jpg", classes=None,
             num_classes=None) -> tuple[list[dict], list[str]]:
    """Index rows of a VOC-layout dataset and its class names.

    `splits` maps split name -> list file (relative to root/ImageSets/Segmentation or absolute).
    An id listed in several splits gets one row carrying all of them.
    """
    root = Path(root)
    if classes is None:
        classes = VOC_CLASSES if num_classes in (None, 20) else [f"class{i}" for i in range(num_classes)]
    classes = list(classes)
    if num_classes is not None and num_classes != len(classes):
        raise EpsError(f"num_classes: {num_classes} does not match the {len(classes)} class names")
    num_classes = len(classes)
    if not isinstance(splits, dict) or not splits:
        raise EpsError("splits: expected a mapping split name -> list file")

    images = resolve(root, image_dir)
    if not images.is_dir():
        raise file_error(images, "image folder not found")
    if mask_dir is None:
        masks = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
    else:
        masks = _optional_dir(root, mask_dir, "mask")
    saliency = _optional_dir(root, saliency_dir, "saliency")
    context = _optional_dir(root, context_dir, "context")
    label_path = resolve(root, labels_file)
    table = read_label_file(label_path, num_classes) if label_path else {}

    rows: dict[str, dict] = {}
    for split, list_file in splits.items():
        list_path = resolve(root / "ImageSets" / "Segmentation", list_file)
        for id_ in read_list(list_path, image_dir):
            if id_ in rows:
                rows[id_]["splits"].append(split)
                continue
            exts = [image_ext] + [e for e in (".jpg", ".png") if e != image_ext]
            image = next((images / f"{id_}{e}" for e in exts if (images / f"{id_}{e}").is_file()), None)
            if image is None:
                raise file_error(list_path, f"id {id_!r}: image {images / (id_ + image_ext)} not found")

            mask = png_for(masks, id_)
            if id_ in table:
                labels = table[id_]
            elif mask:
                labels = mask_labels(mask, num_classes)
            else:
                why = [f"not in {label_path}"] if label_path else []
                why.append(f"no mask in {masks}" if masks else "no mask folder")
                raise file_error(list_path, f"id {id_!r}: no labels ({', '.join(why)})")
            rows[id_] = make_row(id_, image, mask, png_for(saliency, id_), context_for(context, id_),
                                 labels, [split])

    for folder, column in ((saliency, "saliency"), (context, "context")):
        if folder and not any(r[column] for r in rows.values()):
            expected = "<id>.png or PASCAL-Context <id>.mat" if column == "context" else "<id>.png"
            raise file_error(folder, f"no {column} file for any listed id (expected {expected})")
    return list(rows.values()), classes
