"""COCO 2014 reader: 80 classes, labels from an instances JSON or from label PNGs.

Each split is a block (paths relative to the dataset root), or just the image folder's name:

- `images`: image folder (default `{split}2014`)
- `annotations`: instances JSON; labels are the categories of all of an image's
  annotations (crowd ones included), category ids mapped to 0..79 in sorted-id order
- `masks`: folder of `<id>.png` label maps, 0 = background, k = k-th category (1-based,
  sorted-id order), 255 = void, as the EPS paper's COCO masks; labels come from them when
  no `annotations` is given
- `list`: optional id list restricting and ordering the split

Without `annotations` and `masks`, `annotations/instances_{split}2014.json` is used.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from eps.data.rows import check_keys, make_row, resolve
from eps.data.voc import mask_labels, png_for, read_list
from eps.errors import EpsError, file_error

# Names of the 80 COCO categories in increasing category-id order (index = 0-based class).
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
]

SPLIT_KEYS = {"images", "annotations", "masks", "list"}


def load_instances(path: Path) -> tuple[list[str], dict[str, tuple[str, list[int]]]]:
    """Category names (sorted-id order) and {id: (file_name, labels)} from an instances JSON."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise file_error(path, "annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(path))
        cat_ids = sorted(coco.getCatIds())
        names = [coco.loadCats(c)[0]["name"] for c in cat_ids]
        index_of = {c: i for i, c in enumerate(cat_ids)}
        images = {}
        for img in sorted(coco.loadImgs(coco.getImgIds()), key=lambda im: im["file_name"]):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=None))
            labels = sorted({index_of[a["category_id"]] for a in anns})
            images[Path(img["file_name"]).stem] = (img["file_name"], labels)
    except EpsError:
        raise
    except Exception as exc:
        raise file_error(path, f"not a COCO instances file ({type(exc).__name__}: {exc})") from None
    if not cat_ids:
        raise file_error(path, "no categories")
    return names, images


def read_coco(root, splits: dict, *, saliency_dir=None, drop_unlabeled=True,
              classes=None) -> tuple[list[dict], list[str]]:
    """Index rows of a COCO-2014-style dataset and its class names.

    Without a `list`, images with no label are dropped when `drop_unlabeled` (the
    usual WSSS training set: 82,081 of the 82,783 train2014 images).
    """
    root = Path(root)
    if not isinstance(splits, dict) or not splits:
        raise EpsError("splits: expected a mapping split name -> {images, annotations, masks, list}")
    saliency = resolve(root, saliency_dir)
    if saliency is not None and not saliency.is_dir():
        raise file_error(saliency, "saliency folder not found")
    names: list[str] | None = None
    rows: dict[str, dict] = {}
    for split, spec in splits.items():
        spec = {"images": spec} if isinstance(spec, str) else dict(spec or {})
        check_keys(spec, SPLIT_KEYS, f"splits.{split}")
        images = resolve(root, spec.get("images", f"{split}2014"))
        if not images.is_dir():
            raise file_error(images, "image folder not found")
        masks = resolve(root, spec.get("masks"))
        if masks is not None and not masks.is_dir():
            raise file_error(masks, "mask folder not found")
        ann_path = resolve(root, spec.get("annotations"))
        if ann_path is None and masks is None:
            ann_path = root / "annotations" / f"instances_{images.name}.json"

        table = None
        if ann_path is not None:
            got, table = load_instances(ann_path)
            if names is not None and got != names:
                raise file_error(ann_path, "categories differ from those of the previous split")
            names = got
        num_classes = len(names) if names else len(classes or COCO_CLASSES)

        list_path = resolve(root, spec.get("list"))
        if list_path is not None:
            ids = read_list(list_path, images.name)
        elif table is not None:
            ids = list(table)
        else:
            ids = sorted(p.stem for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        source = list_path or ann_path or images

        for id_ in ids:
            if id_ in rows:
                rows[id_]["splits"].append(split)
                continue
            mask = png_for(masks, id_)
            if table is not None:
                if id_ not in table:
                    raise file_error(source, f"id {id_!r} is not in {ann_path}")
                file_name, labels = table[id_]
                image = images / file_name
            else:
                if not mask:
                    raise file_error(source, f"id {id_!r}: no labels (no mask {masks / (id_ + '.png')})")
                labels = mask_labels(mask, num_classes)
                image = next((images / f"{id_}{e}" for e in (".jpg", ".png")
                              if (images / f"{id_}{e}").is_file()), images / f"{id_}.jpg")
            if not image.is_file():
                raise file_error(source, f"id {id_!r}: image {image} not found")
            if not labels and drop_unlabeled and list_path is None:
                continue
            rows[id_] = make_row(id_, image, mask, png_for(saliency, id_), "", labels, [split])

    if classes is None:
        classes = names or COCO_CLASSES
    elif names is not None and len(classes) != len(names):
        raise EpsError(f"classes: {len(classes)} names given, the annotations have {len(names)} categories")
    if not rows:
        raise EpsError("splits: no images found")
    return list(rows.values()), list(classes)
