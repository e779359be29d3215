"""Saliency quality and speed on ECSSD: a saliency method against the centre-Gaussian prior.

Data: ``../shared/data/ecssd_dev`` (``images/NNNN.jpg``, ``ground_truth_mask/NNNN.png``,
0/255). Images 0001-0250 are the tuning split, 0251-0500 the report split (the default):
a method's parameters are chosen on the first and its figures quoted on the second.

- method (``--method``, default ``classical``): the predictor of
  ``eps.saliency.get_predictor(method, weights, device)``, one image at a time.
- centre prior: ``eps.saliency.classical.centre_prior``, the reference row.

Figures (``eps.saliency.metrics``): MAE, adaptive-threshold F (beta^2 = 0.3), max F over
256 thresholds of the image-averaged F curve, S-measure (alpha = 0.5), and the wall time
of the prediction alone (image decoding and scoring are outside it), median per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the checkout first on sys.path)

SPLITS = {"tune": range(1, 251), "report": range(251, 501)}
# (MAE at most, F_adaptive at least, images/s at least) per method; None: no target
TARGETS = {"classical": (0.25, 0.60, 5.0), "usps": (0.15, 0.75, None)}


def pick(image_dir: Path, gt_dir: Path, split: str, limit: int) -> list[tuple[str, Path, Path]]:
    """(id, image, mask) of the split's images, in id order; a missing mask is an error."""
    from eps.errors import file_error

    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if split != "all":
        wanted = SPLITS[split]
        images = [p for p in images if p.stem.isdigit() and int(p.stem) in wanted]
    if limit:
        images = images[:limit]
    for path in images:
        if not (gt_dir / f"{path.stem}.png").is_file():
            raise file_error(gt_dir / f"{path.stem}.png", f"no ground truth for image {path.name}")
    return [(p.stem, p, gt_dir / f"{p.stem}.png") for p in images]


def run(predict, samples) -> tuple[dict, list[float]]:
    """Scores and per-image prediction times of one predictor (rgb -> uint8 map)."""
    from eps.saliency.metrics import evaluate_maps

    predict(samples[0][0])  # untimed warm-up (imports, allocator)
    preds, times = [], []
    for rgb, _ in samples:
        t0 = time.perf_counter()
        out = predict(rgb)
        times.append(time.perf_counter() - t0)
        preds.append(np.asarray(out, np.float32) / 255.0)
    return evaluate_maps(zip(preds, (gt for _, gt in samples))), times


def centre_predictor(rgb: np.ndarray) -> np.ndarray:
    from eps.saliency.classical import centre_prior

    return np.rint(centre_prior(*rgb.shape[:2]) * 255).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="classical", help="a saliency method of eps.saliency")
    p.add_argument("--weights", type=Path, default=None, help="weights file, for trained methods")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=Path, default=None, help="image folder (default ../shared/data/ecssd_dev/images)")
    p.add_argument("--gt", type=Path, default=None,
                   help="ground-truth mask folder (default ../shared/data/ecssd_dev/ground_truth_mask)")
    p.add_argument("--split", choices=["tune", "report", "all"], default="report",
                   help="ids 0001-0250 (tune), 0251-0500 (report) or every image")
    p.add_argument("--limit", type=int, default=0, help="only the first N images of the split")
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (0: their defaults)")
    p.add_argument("--quick", action="store_true", help="the first 20 images of the split")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 20
    if args.threads:
        import cv2

        cv2.setNumThreads(args.threads)
        _common.set_threads(args.threads)
    _common.header("saliency_ecssd", args.device, argv)
    shared = _common.shared_dir()
    ecssd = shared / "data" / "ecssd_dev" if shared is not None else None
    image_dir = args.images or (ecssd / "images" if ecssd else None)
    gt_dir = args.gt or (ecssd / "ground_truth_mask" if ecssd else None)
    if image_dir is None or gt_dir is None or not image_dir.is_dir() or not gt_dir.is_dir():
        print(f"SKIP: no ECSSD images/masks ({image_dir or '../shared/data/ecssd_dev'}): this benchmark "
              "needs ../shared beside the checkout (or --images and --gt)")
        _common.summary("saliency_ecssd: skipped (no ../shared/data/ecssd_dev)")
        return 0

    from eps.data.io import read_image, read_saliency

    picked = pick(image_dir, gt_dir, args.split, args.limit)
    if not picked:
        print(f"SKIP: no images of split {args.split!r} in {image_dir}")
        _common.summary(f"saliency_ecssd: skipped (no {args.split} images)")
        return 0
    samples = [(read_image(img), read_saliency(gt) > 0) for _, img, gt in picked]
    sizes = np.array([rgb.shape[:2] for rgb, _ in samples])
    print(f"{len(samples)} images, split {args.split} ({picked[0][0]}-{picked[-1][0]}), "
          f"mean size {sizes[:, 1].mean():.0f}x{sizes[:, 0].mean():.0f} px, from {image_dir}")

    from eps.saliency import get_predictor

    predict = get_predictor(args.method, weights=args.weights, device=args.device)
    rows = {args.method: run(predict, samples),
            "centre prior": run(centre_predictor, samples)}
    print(f"{'method':<14} {'MAE':>7} {'F_adapt':>8} {'F_max':>7} {'S':>7} {'ms/image':>9} {'images/s':>9}")
    for name, (scores, times) in rows.items():
        ms = 1000 * _common.median(times)
        print(f"{name:<14} {scores['mae']:7.4f} {scores['f_adaptive']:8.4f} {scores['f_max']:7.4f} "
              f"{scores['s_measure']:7.4f} {ms:9.1f} {1000 / ms:9.1f}")
    scores, times = rows[args.method]
    rate = 1 / _common.median(times)
    centre = rows["centre prior"][0]
    summary = (f"saliency_ecssd: {args.method} on {len(samples)} {args.split} images: MAE {scores['mae']:.3f}, "
               f"F_adapt {scores['f_adaptive']:.3f}, F_max {scores['f_max']:.3f}, S {scores['s_measure']:.3f}, "
               f"{rate:.1f} images/s (centre prior {centre['mae']:.3f} / {centre['f_adaptive']:.3f})")
    if args.method in TARGETS:
        mae, f, speed = TARGETS[args.method]
        met = scores["mae"] <= mae and scores["f_adaptive"] >= f and (speed is None or rate >= speed)
        wanted = f"MAE <= {mae}, F >= {f}" + (f", >= {speed:g} images/s" if speed else "")
        summary += f"; target {wanted}: {'met' if met else 'NOT met'}"
    _common.summary(summary)
    return 0


if __name__ == "__main__":
    from eps.errors import EpsError

    try:
        sys.exit(main())
    except EpsError as exc:  # a bad --weights, --images or --gt: one line, as the CLI prints it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
