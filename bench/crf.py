"""Dense CRF over many images: parallel throughput (N worker processes) against one process.

Inputs: real VOC photos (``../shared/data/voc12_sample``, at their own size; seeded
synthetic scenes when absent) and CAM-like maps of their labelled classes made from the
official masks (blurred, noisy, max-normalised), stored as an ``eps.cams`` HDF5 shard.

- eps: ``eps.crf.refine_cam_shard`` (the ``crf`` stage: reads the shard and the images,
  refines in ``workers`` processes, writes a mask shard), PSA preset with the
  ``(1 - max) ** 4`` background of PSA / the official EPS ``infer.py --crf``, with
  1 and N workers.
- official (a re-creation of the official per-image loop: ``_crf_with_alpha`` and psa's
  ``imutils.crf_inference`` inline in the inference loop, one process): image by image,
  ``DenseCRF2D``, Gaussian (sxy 3, compat 3) and bilateral (sxy 80, srgb 13, compat 10)
  kernels, 10 iterations, argmax.

When ``eps.crf`` is not importable the eps lines use the same per-image call through a
process pool. Figures: images/s per path (median of interleaved repeats), the parallel
speed-up, and the agreement of the masks (they must be identical).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from PIL import Image  # noqa: E402

ALPHA = 4
PARAMS = {"enabled": True, "preset": "psa", "bi_w": None, "bi_xy": None, "bi_rgb": None, "pos_w": None,
          "pos_xy": None, "iterations": None, "background": "power", "bg_threshold": 0.20, "alpha": float(ALPHA)}


def crf_inference(img, probs, t=10, scale_factor=1, labels=21):
    """psa ``tool/imutils.crf_inference``."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, labels)
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3 / scale_factor, compat=3)
    d.addPairwiseBilateral(sxy=80 / scale_factor, srgb=13, rgbim=np.copy(img), compat=10)
    q = d.inference(t)
    return np.array(q).reshape((labels, h, w))


def official_one(job):
    """``_crf_with_alpha`` for one image, then the argmax to a mask of class values."""
    path, maps, classes = job
    img = np.asarray(Image.open(path).convert("RGB"))
    cam_dict = {int(c): maps[i].astype(np.float32) for i, c in enumerate(classes)}
    v = np.array(list(cam_dict.values()))
    bg_score = np.power(1 - np.max(v, axis=0, keepdims=True), ALPHA)
    bgcam_score = np.concatenate((bg_score, v), axis=0)
    crf_score = crf_inference(img, bgcam_score, labels=bgcam_score.shape[0])
    values = np.array([0] + [c + 1 for c in cam_dict], np.uint8)
    return values[np.argmax(crf_score, axis=0)]


def make_inputs(work: Path, count: int, max_side: int, seed: int):
    """(id, image path, float16 maps, classes) per image: VOC photos and maps from their masks."""
    import cv2

    rng = np.random.default_rng(seed)
    shared = _common.shared_dir()
    voc = shared / "data" / "voc12_sample" if shared is not None else None
    ids = []
    if voc is not None and (voc / "ImageSets" / "Segmentation" / "all.txt").is_file():
        ids = (voc / "ImageSets" / "Segmentation" / "all.txt").read_text().split()
    (work / "images").mkdir(parents=True)
    out = []
    for k in range(count):
        if k < len(ids):
            image = np.asarray(Image.open(voc / "JPEGImages" / f"{ids[k]}.jpg").convert("RGB"))
            mask = np.asarray(Image.open(voc / "SegmentationClassAug" / f"{ids[k]}.png"))
            image_id = ids[k]
        else:
            h, w = int(rng.integers(max_side // 2, max_side + 1)), max_side
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = cv2.GaussianBlur(image, (0, 0), 3)
            mask = np.zeros((h, w), np.uint8)
            cv2.circle(mask, (w // 2, h // 2), min(h, w) // 3, int(rng.integers(1, 21)), -1)
            image_id = f"synthetic_{k:03d}"
        scale = max_side / max(image.shape[:2])
        if scale < 1:
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
        classes = np.array(sorted({int(c) - 1 for c in np.unique(mask) if 0 < c < 255}) or [0], np.int64)
        maps = []
        for c in classes:
            m = cv2.GaussianBlur((mask == c + 1).astype(np.float32), (0, 0), 8)
            m = np.clip(m + rng.normal(0, 0.05, m.shape).astype(np.float32), 0, None)
            maps.append(m / (m.max() + 1e-5))
        path = work / "images" / f"{image_id}.png"
        Image.fromarray(image).save(path)
        out.append((image_id, path, np.stack(maps).astype(np.float16), classes))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--max-side", type=int, default=320, help="images larger than this are downscaled")
    p.add_argument("--workers", type=int, default=_common.cores())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 images of at most 96 px, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.max_side, args.repeats = 4, 96, 1
    _common.header("crf", "cpu", argv)
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        print("SKIP: pydensecrf is not installed")
        _common.summary("crf: skipped (no pydensecrf)")
        return 0
    try:
        from eps.crf import refine_cam_shard
    except ImportError:
        refine_cam_shard = None

    work = Path(tempfile.mkdtemp(prefix="eps-bench-crf-"))
    try:
        items = make_inputs(work, args.images, args.max_side, args.seed)
        jobs = [(path, maps, classes) for _, path, maps, classes in items]
        results = {}

        def official():
            results["official"] = [official_one(j) for j in jobs]

        if refine_cam_shard is not None:
            from eps.data.index import make_row, write_index
            from eps.data.io import atomic_h5, open_h5
            from eps.shards import read_cams, write_cams

            index = work / "index.csv"
            write_index([make_row(i, path, labels=classes, splits=["train"]) for i, path, _, classes in items],
                        [f"class{c}" for c in range(20)], index, dataset="bench")
            shard = work / "cams.h5"
            with atomic_h5(shard, "eps.cams", "bench") as f:
                for image_id, _, maps, classes in items:
                    # one full-size "scale" (upsampling to its own size is the identity)
                    write_cams(f, image_id, [maps], classes, False, maps.shape[1:])
            # both paths refine the maps as the shard gives them back (read_cams re-normalises)
            with open_h5(shard, "eps.cams", "bench") as f:
                jobs = [(path, read_cams(f, i)[0], classes) for i, path, _, classes in items]

            def eps_run(workers):
                def run():
                    out = work / f"masks-{workers}.h5"
                    refine_cam_shard(shard, index, out, "bench", PARAMS, workers=workers)
                    with open_h5(out, "eps.masks", "bench") as f:
                        results[f"eps{workers}"] = [f[i][()] for i, _, _, _ in items]
                return run
            how = "eps.crf.refine_cam_shard"
        else:
            def eps_run(workers):
                def run():
                    ctx = multiprocessing.get_context("fork")
                    if workers == 1:
                        results[f"eps{workers}"] = [official_one(j) for j in jobs]
                    else:
                        with ctx.Pool(workers) as pool:
                            results[f"eps{workers}"] = pool.map(official_one, jobs, chunksize=1)
                return run
            how = "pydensecrf through a process pool (eps.crf not importable)"

        funcs = {"official loop": official, "eps, 1 worker": eps_run(1)}
        if args.workers > 1:
            funcs[f"eps, {args.workers} workers"] = eps_run(args.workers)
        times = _common.interleaved(funcs, args.repeats, warmup=False)
        sizes = sorted({Image.open(pth).size for _, pth, _, _ in items})
        print(f"{len(items)} images ({len(sizes)} sizes, WxH from {sizes[0]} to {sizes[-1]}), PSA kernels, "
              f"10 iterations, background (1 - max)^{ALPHA}; eps path: {how}")
        t_one = _common.median(times["eps, 1 worker"])
        for name, ts in times.items():
            print(f"{name:<17} {len(items) / _common.median(ts):7.2f} images/s ({_common.fmt_times(ts)})")
        equal = all(all(np.array_equal(a, b) for a, b in zip(results["official"], results[k]))
                    for k in results if k != "official")
        print(f"masks identical across paths: {equal}")
        t_off = _common.median(times["official loop"])
        if args.workers > 1:
            t_n = _common.median(times[f"eps, {args.workers} workers"])
            text = (f"{args.workers} workers {t_one / t_n:.2f}x one process "
                    f"({len(items) / t_n:.2f} vs {len(items) / t_one:.2f} img/s), {t_off / t_n:.2f}x the official loop")
        else:
            text = f"1 worker {len(items) / t_one:.2f} img/s, {t_off / t_one:.2f}x the official loop"
        _common.summary(f"crf: {len(items)} images, {text}; masks identical: {equal}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
