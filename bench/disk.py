"""Disk: bytes per image of the CAM intermediates, eps's HDF5 shard against the official .npy files.

Inputs: the real VOC photos of ``../shared/data/voc12_sample`` at their own size with their
real image-level labels (seeded synthetic scenes and labels when absent). Maps: multi-scale
+ flip CAMs from ``eps.infer.iter_cam_parts`` with a seeded random small backbone (output
stride 8, as ResNet-38), for the EPS classifier (labelled classes + the background map) and
the CAM baseline (labelled classes).

- eps: one ``eps.cams`` shard written as the ``infer_cams`` stage writes it
  (``eps.shards.write_cams``: each scale's maps of the labelled classes at CAM resolution,
  float32, byte shuffle + gzip 1; the EPS background map is left out, as the official code
  leaves it out); bytes = file size / images.
- official (``infer.py --cam_npy``): per image ``np.save(f"{id}.npy", cam_dict)``, a
  pickled dict class -> float32 map at image size; bytes = sum of file sizes / images.

Also shown: the shard with the EPS background map (``infer.keep_background``), and eps's
earlier format (the full-size normalised sum as float16, shuffle + gzip 1), to say where the
bytes go.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

NUM_CLASSES = 20


def load_inputs(count: int, seed: int, max_side: int):
    """[(id, uint8 image, 20-dim labels)]: VOC photos and labels, or synthetic ones."""
    rng = np.random.default_rng(seed)
    shared = _common.shared_dir()
    out = []
    if shared is not None:
        voc = shared / "data" / "voc12_sample"
        npy = shared / "data" / "voc12_masks" / "metadata" / "cls_labels.npy"
        labels = np.load(npy, allow_pickle=True).item() if npy.is_file() else {}
        listing = voc / "ImageSets" / "Segmentation" / "all.txt"
        ids = listing.read_text().split() if listing.is_file() else []
        for image_id in ids[:count]:
            image = Image.open(voc / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
            if max(image.size) > max_side:
                s = max_side / max(image.size)
                image = image.resize((round(image.size[0] * s), round(image.size[1] * s)), Image.BICUBIC)
            label = np.asarray(labels.get(image_id, np.zeros(NUM_CLASSES)), np.float32)
            out.append((image_id, np.asarray(image), label))
    while len(out) < count:
        k = len(out)
        h, w = (min(375, max_side), min(500, max_side)) if k % 3 else (min(500, max_side), min(375, max_side))
        image = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
        label = np.zeros(NUM_CLASSES, np.float32)
        label[rng.choice(NUM_CLASSES, size=int(rng.integers(1, 3)), replace=False)] = 1
        out.append((f"synthetic_{k:03d}", image, label))
    return out


def write_shard(path: Path, entries, drop_background=False) -> int:
    """Write `entries` (id, parts, present, background, size) as an eps.cams shard; return its size."""
    from eps.data.io import atomic_h5
    from eps.shards import write_cams

    with atomic_h5(path, "eps.cams", "bench") as f:
        for image_id, parts, present, background, size in entries:
            if drop_background and background:
                parts, background = [p[:-1] for p in parts], False
            write_cams(f, image_id, parts, present, background, size)
    return path.stat().st_size


def write_full_size_float16(path: Path, entries) -> int:
    """eps's earlier CAM format: the full-size normalised maps (no background), float16, shuffle + gzip 1."""
    from eps.data.io import atomic_h5

    with atomic_h5(path, "eps.cams", "bench") as f:
        for image_id, maps, present, _ in entries:
            f.create_dataset(image_id, data=maps[:len(present)].astype(np.float16), compression="gzip",
                             compression_opts=1, shuffle=True)
    return path.stat().st_size


def official_npy(folder: Path, entries) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for image_id, maps, present, _ in entries:
        cam_dict = {int(c): maps[i].astype(np.float32) for i, c in enumerate(present)}
        path = folder / f"{image_id}.npy"
        np.save(path, cam_dict)
        total += path.stat().st_size
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=63)
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="6 images of at most 128 px")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.max_side = 6, 128
    _common.header("disk", "cpu", argv)
    from eps.infer import iter_cam_parts, prepare_model
    from eps.shards import maps_from_parts
    from eps.models import build_classifier

    inputs = load_inputs(args.images, args.seed, args.max_side)
    images = [im for _, im, _ in inputs]
    labels = np.stack([lab for _, _, lab in inputs])
    params = {"scales": [0.5, 1.0, 1.5, 2.0], "flip": True, "batch_size": 8}
    pixels = sum(im.shape[0] * im.shape[1] for im in images)
    n_labels = labels.sum(1)
    print(f"{len(inputs)} images, mean size {pixels / len(inputs):.0f} pixels, labelled classes per image: "
          f"mean {n_labels.mean():.2f} (min {n_labels.min():.0f}, max {n_labels.max():.0f})")
    work = Path(tempfile.mkdtemp(prefix="eps-bench-disk-"))
    rows = []
    try:
        for loss in ("eps", "cam"):
            background = loss == "eps"
            torch.manual_seed(args.seed)
            model = prepare_model(build_classifier("small", NUM_CLASSES, background=background), "cpu")
            stored = [(inputs[k][0], parts, present, background, images[k].shape[:2])
                      for k, parts, present in iter_cam_parts(model, images, labels, params, background, "cpu")]
            # the full-size maps the official code saves (and eps's pseudo-mask stage computes)
            entries = [(i, maps_from_parts(parts, size, b), present, b) for i, parts, present, b, size in stored]
            n = len(entries)
            official = official_npy(work / loss / "npy", entries) / n
            # as infer_cams writes it: the EPS background map left out (infer.keep_background: false)
            eps = write_shard(work / loss / "cams.h5", stored, drop_background=True) / n
            print(f"[{loss}] official .npy: {official / 1024:8.1f} KiB/image")
            print(f"[{loss}] eps shard:     {eps / 1024:8.1f} KiB/image = {100 * eps / official:.1f}% of the official "
                  f"(labelled classes, per-scale maps at CAM resolution, float32, shuffle + gzip 1)")
            if background:
                kept = write_shard(work / loss / "kept.h5", stored) / n
                print(f"[{loss}]   with the background map (infer.keep_background: true): "
                      f"{kept / 1024:.1f} KiB/image = {100 * kept / official:.1f}%")
            before = write_full_size_float16(work / loss / "full16.h5", entries) / n
            print(f"[{loss}]   eps's earlier format (full-size sum, float16, shuffle + gzip 1): "
                  f"{before / 1024:.1f} KiB/image = {100 * before / official:.1f}%")
            rows.append((loss, eps / official, eps, official))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    met = all(r[1] <= 0.25 for r in rows)
    parts = [f"{loss} {100 * ratio:.1f}% ({e / 1024:.0f} vs {o / 1024:.0f} KiB/image)" for loss, ratio, e, o in rows]
    _common.summary(f"disk: eps shard / official npy: {'; '.join(parts)}; target <= 25%: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
