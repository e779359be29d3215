"""Saliency stage: uint8 saliency maps (H x W, image size) per image, from one of six methods.

- `classical`: training-free priors (boundary connectivity, colour contrast, centre); CPU.
- `usps`: unsupervised, a small network self-trained on the dataset's own images from fused
  priors (DeepUSPS-style); trained by `eps train-saliency --method usps`.
- `pfan`, `dss`: the published VGG16 detectors, from the authors' weights or trained on a
  saliency dataset (`eps train-saliency`).
- `csnet`: CSNet (ECCV 2020), the authors' released checkpoint (a .pth.tar with its .bin
  layer configuration); a 141K-parameter supervised detector, fast on CPU.
- `precomputed`: a folder of PNGs, as the official EPS release distributes them.

Every method but `precomputed` is a predictor `rgb uint8 H x W x 3 -> uint8 H x W`
(`get_predictor`), used alike by the workflow (HDF5 shards) and by folders of images. A
predictor may also have `predict.batch(images) -> maps` (several images per forward pass);
`predict_batches` uses it when present.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from eps.errors import EpsError

METHODS = ("classical", "usps", "pfan", "dss", "csnet", "precomputed")
BATCH = 8  # images read and predicted together when a predictor has `.batch`
TRAINABLE = ("usps", "pfan", "dss")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def check_rgb(rgb, method: str) -> np.ndarray:
    """The input every predictor takes: an H x W x 3 uint8 RGB array (a one-line error otherwise)."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        what = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise EpsError(f"{method} saliency: expected an H x W x 3 uint8 RGB image, got a {what}")
    return rgb


def to_uint8(prob) -> np.ndarray:
    """A saliency probability map in [0, 1] as the stage stores it: uint8, rounded."""
    return np.clip(np.round(np.asarray(prob) * 255.0), 0, 255).astype(np.uint8)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise EpsError(f"saliency.method: unknown method {method!r}; available: {list(METHODS)}")


def get_predictor(method: str, weights=None, device="cpu"):
    """The callable `rgb -> uint8 map` of a method (each module's `load_predictor`)."""
    check_method(method)
    if method == "precomputed":
        raise EpsError("saliency.method: 'precomputed' reads maps from files; it has no predictor")
    module = importlib.import_module(f"eps.saliency.{method}")
    return module.load_predictor(weights, device=str(device))


def predict_batches(predict, items, read, label):
    """Yield (item, map) for `items`, reading each with `read`; `BATCH` at a time through
    `predict.batch` when the predictor has one. An EpsError of the predictor is re-raised
    naming `label(item)` (a failing batch is retried image by image to find which)."""
    def one(item, rgb):
        try:
            return predict(rgb)
        except EpsError as exc:
            text, name = str(exc), str(label(item))
            raise EpsError(text if text.startswith(name) else f"{name}: {text}") from None

    batch = getattr(predict, "batch", None)
    items = list(items)
    step = BATCH if batch is not None else 1
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        images = [read(item) for item in chunk]
        if batch is None:
            yield chunk[0], one(chunk[0], images[0])
            continue
        try:
            maps = batch(images)
        except EpsError:
            maps = [one(item, rgb) for item, rgb in zip(chunk, images)]
        yield from zip(chunk, maps)


def _device(device: str):
    from eps.config import choose_device, set_threads

    set_threads()
    return choose_device(device)


def extract_shard(index_csv, method: str, scatteritem: str, out, strict: bool = False,
                  weights=None, device: str = "auto", progress: bool = True) -> Path:
    """Write the saliency maps of one shard of all indexed images to `out` (HDF5)."""
    from eps.progress import progress as progress_bar

    from eps.data.index import parse_scatteritem, read_classes, read_index, shard_rows
    from eps.data.io import atomic_h5, read_image

    check_method(method)
    index = read_index(index_csv)
    dataset = read_classes(index_csv)["dataset"]
    rows = shard_rows(index, *parse_scatteritem(scatteritem))
    if method == "precomputed":
        from eps.saliency.precomputed import load_map

        maps = ((item, load_map(*item, strict)) for item in zip(rows["id"], rows["image"], rows["saliency"]))
    else:
        predict = get_predictor(method, weights, _device(device))
        maps = predict_batches(predict, zip(rows["id"], rows["image"]), lambda item: read_image(item[1]),
                               lambda item: item[1])

    with atomic_h5(out, "eps.saliency", dataset) as f:
        f.attrs["method"] = method
        for item, sal in progress_bar(maps, total=len(rows), desc=f"saliency {method}",
                                      disable=not progress, mininterval=5):
            f.create_dataset(item[0], data=sal, compression="gzip", compression_opts=1)
    return Path(out)


def list_images(folder) -> list[Path]:
    """The images of a folder (sorted), or a one-line error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EpsError(f"{folder}: not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise EpsError(f"{folder}: no images (*.jpg, *.png, *.bmp)")
    return images


def predict_folder(method: str, images_dir, out_dir, weights=None, device: str = "auto",
                   progress: bool = True) -> int:
    """One uint8 PNG per image of `images_dir` in `out_dir` (same stem); returns the count.

    All maps are written into a temporary folder that replaces `out_dir` when every image is
    done, so a bad image leaves no maps behind. An existing `out_dir` is replaced only if an
    earlier `eps saliency --images` wrote it (eps.data.io.OWNER_FILE) and it holds only PNGs.
    Two images with one stem (`a.jpg`, `a.png`) would share one map: refused.
    """
    import shutil

    from eps.data.io import check_replaceable, commit_output_dir, new_output_dir, read_image, write_gray_png
    from eps.progress import progress as progress_bar

    images = list_images(images_dir)
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise EpsError(f"{path}: has the stem of {stems[path.stem].name}; both would be written as "
                           f"{path.stem}.png (rename one)")
        stems[path.stem] = path
    out_dir = Path(out_dir)
    check_replaceable(out_dir, "saliency", _is_png)
    predict = get_predictor(method, weights, _device(device))
    tmp = new_output_dir(out_dir)
    try:
        maps = predict_batches(predict, images, read_image, lambda path: path)
        for path, sal in progress_bar(maps, total=len(images), desc=f"saliency {method}",
                                      disable=not progress, mininterval=5):
            write_gray_png(tmp / f"{path.stem}.png", np.asarray(sal, np.uint8))
        commit_output_dir(tmp, out_dir, "saliency", _is_png)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(images)


def _is_png(name: str) -> bool:
    return name.endswith(".png")
