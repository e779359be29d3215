"""A plain folder of images plus a CSV of image-level labels: the way to bring your own data.

CSV columns: `id` (image file `<id>.jpg|.jpeg|.png` in the image folder) or `image` (a file
name in the image folder; the id is its stem), `labels` (class NAMES separated by `;`, or by
whitespace when there is no `;`, so names with spaces need `;`), and optionally `splits`
(space-separated split names; default: the `split` argument).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from eps.data.rows import id_problem, make_row, resolve
from eps.data.voc import png_for
from eps.errors import file_error

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _names(field: str) -> list[str]:
    parts = field.split(";") if ";" in field else field.split()
    return [p.strip() for p in parts if p.strip()]


def read_folder(root, labels_csv, *, image_dir="images", mask_dir=None, saliency_dir=None,
                classes=None, split="train") -> tuple[list[dict], list[str]]:
    """Index rows of an image folder labelled by a CSV, and the class names.

    `classes` fixes the class order (unknown names in the CSV are errors); without it the
    classes are every name in the CSV, sorted. Masks (optional) are `<id>.png` index maps
    with 0 = background and k = k-th class (1-based), 255 = void.
    """
    root = Path(root)
    csv_path = resolve(root, labels_csv)
    if not csv_path.is_file():
        raise file_error(csv_path, "label CSV not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                         skip_blank_lines=False)  # keeps row i on line i + 2
    except Exception as exc:
        raise file_error(csv_path, f"cannot read CSV ({type(exc).__name__}: {exc})") from None
    df.columns = [c.strip() for c in df.columns]
    key = "id" if "id" in df.columns else "image" if "image" in df.columns else None
    if key is None or "labels" not in df.columns:
        raise file_error(csv_path, f"expected columns 'id' or 'image', and 'labels'; found {list(df.columns)}")

    images = resolve(root, image_dir)
    if not images.is_dir():
        raise file_error(images, "image folder not found")
    folders = {}
    for name, value in (("mask", mask_dir), ("saliency", saliency_dir)):
        folders[name] = resolve(root, value)
        if folders[name] is not None and not folders[name].is_dir():
            raise file_error(folders[name], f"{name} folder not found")

    names_per_row = [_names(f) for f in df["labels"]]
    if classes is None:
        classes = sorted({n for names in names_per_row for n in names})
    classes = [str(c) for c in classes]
    index_of = {c: i for i, c in enumerate(classes)}

    rows, seen = [], set()
    for i, (entry, names) in enumerate(zip(df[key], names_per_row)):
        line = i + 2  # 1-based, after the header
        entry = entry.strip()
        if not entry and not names:
            continue  # blank line
        if key == "id":
            id_ = entry
            image = next((images / f"{id_}{e}" for e in IMAGE_EXTS if (images / f"{id_}{e}").is_file()), None)
        else:
            id_ = Path(entry).stem
            image = images / entry if (images / entry).is_file() else None
        problem = id_problem(id_) or (".." in Path(entry).parts and f"image {entry!r} contains '..'")
        if problem:
            raise file_error(csv_path, f"line {line}: {problem}")
        if id_ in seen:
            raise file_error(csv_path, f"line {line}: duplicate id {id_!r}")
        seen.add(id_)
        if image is None:
            raise file_error(csv_path, f"line {line}: no image for {entry!r} in {images}")
        unknown = [n for n in names if n not in index_of]
        if unknown:
            raise file_error(csv_path, f"line {line}: unknown class {unknown[0]!r} (known: {', '.join(classes)})")
        splits = df["splits"].iloc[i].split() if "splits" in df.columns else []
        rows.append(make_row(id_, image, png_for(folders["mask"], id_),
                             png_for(folders["saliency"], id_), "",
                             [index_of[n] for n in names], splits or [split]))
    if not rows:
        raise file_error(csv_path, "no images listed")
    return rows, classes
