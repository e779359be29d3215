"""Mask evaluation over the 10,582 VOC train_aug masks: ``eps.metrics.evaluate_masks``
(what ``eps evaluate-masks`` runs) against the official per-image loop.

Ground truth: ``../shared/data/voc12_masks/SegmentationClassAug`` (ids from
``metadata/train_aug.txt``). Predictions: the ground truth perturbed deterministically by
seed (some classes eroded or dilated, some shifted, some relabelled, void mostly turned to
background, a few random blobs), written once as VOC palette PNGs to a cache folder under
the system temp dir and reused by later runs.

- official (a re-creation of halbielee/EPS ``evaluate_png.py``): per image, open both PNGs
  with PIL, crop the prediction to the ground-truth size, ``np.array(..., dtype=np.int32)``,
  ``IOUMetric.add_batch(pred, gt)`` (which, given one image, makes one ``_fast_hist`` per
  row) accumulated in a float64 histogram, IoU, ``nanmean``; and the same loop with one
  histogram per image (``add_batch([pred], [gt])``), what a re-creation without the per-row
  walk measures.
- eps: ``evaluate_masks(pred, gt, ids, 21, workers=N)`` (N = the usable cores by default),
  and once more with one worker to show what the code gains without parallelism.

Figures: seconds per pass (median of interleaved repeats), images/s, speed-ups, and the
mIoU of both paths (equal to 1e-6; the histograms are compared exactly).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from PIL import Image  # noqa: E402

NUM_CLASSES = 21
CACHE_VERSION = 1


# ------------------------------------------------------------------------------ predictions

def perturb(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong prediction made from a ground-truth mask."""
    import cv2

    pred = gt.copy()
    void = gt == 255
    pred[void] = 0 if rng.random() < 0.9 else 255  # void mostly predicted as background
    classes = [c for c in np.unique(gt) if 0 < c < NUM_CLASSES]
    kernel = np.ones((7, 7), np.uint8)
    for c in classes:
        region = (pred == c).astype(np.uint8)
        action = rng.random()
        if action < 0.3:  # eroded: boundary pixels lost to background
            pred[(region > 0) & (cv2.erode(region, kernel) == 0)] = 0
        elif action < 0.5:  # dilated: spills over its surroundings
            pred[(cv2.dilate(region, kernel) > 0) & (pred == 0)] = c
        elif action < 0.7:  # shifted by a few pixels
            dy, dx = (int(v) for v in rng.integers(-12, 13, 2))
            moved = np.roll(np.roll(region, dy, 0), dx, 1)
            pred[region > 0] = 0
            pred[moved > 0] = c
        elif action < 0.8:  # the wrong label
            pred[region > 0] = int(rng.integers(1, NUM_CLASSES))
    if rng.random() < 0.3:  # a false-positive blob
        h, w = pred.shape
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        r = int(rng.integers(5, max(6, min(h, w) // 6)))
        cv2.circle(pred, (cx, cy), r, int(rng.integers(1, NUM_CLASSES)), -1)
    return pred


def prediction_cache(gt_dir: Path, ids: list[str], seed: int, cache_root: Path) -> Path:
    """Folder of perturbed predictions `{id}.png` for `ids`, written once per (seed, id list)."""
    from eps.data.io import write_index_png

    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]
    key = f"v{CACHE_VERSION}-seed{seed}-n{len(ids)}-{digest}"
    folder = cache_root / f"voc12_pred_{key}"
    if (folder / "COMPLETE").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"writing {len(ids)} perturbed predictions to {folder} (once) ...", flush=True)
    for k, image_id in enumerate(ids):
        gt = np.asarray(Image.open(gt_dir / f"{image_id}.png"))
        rng = np.random.default_rng([seed, k])
        write_index_png(tmp / f"{image_id}.png", perturb(gt, rng))
    (tmp / "COMPLETE").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------ official path

class IOUMetric:
    """The official evaluate_png.py metric: a float64 histogram of per-image fast hists."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.hist = np.zeros((num_classes, num_classes))

    def _fast_hist(self, label_pred, label_true):
        n = self.num_classes
        mask = (label_true >= 0) & (label_true < n) & (label_pred < n)
        return np.bincount(n * label_true[mask].astype(int) + label_pred[mask], minlength=n ** 2).reshape(n, n)

    def add_batch(self, predictions, gts):
        for lp, lt in zip(predictions, gts):
            self.hist += self._fast_hist(lp.flatten(), lt.flatten())

    def evaluate(self):
        iu = np.diag(self.hist) / (self.hist.sum(axis=1) + self.hist.sum(axis=0) - np.diag(self.hist))
        return np.nanmean(iu), iu


def official_evaluate(pred_dir: Path, gt_dir: Path, ids, per_image: bool = False) -> tuple[float, np.ndarray]:
    """The official loop. As released, `add_batch(pred, gt)` receives one image, so its
    `zip(predictions, gts)` walks the image's rows: one histogram per row (about half of
    the loop's time). `per_image` passes the image as a batch of one instead:
    the same histogram, one `bincount` per image."""
    metric = IOUMetric(NUM_CLASSES)
    with np.errstate(divide="ignore", invalid="ignore"):
        for image_id in ids:
            gt = Image.open(os.path.join(gt_dir, image_id + ".png"))
            w, h = gt.size[0], gt.size[1]
            gt = np.array(gt, dtype=np.int32)
            pred = Image.open(os.path.join(pred_dir, image_id + ".png"))
            pred = pred.crop((0, 0, w, h))
            pred = np.array(pred, dtype=np.int32)
            if per_image:
                metric.add_batch([pred], [gt])
            else:
                metric.add_batch(pred, gt)
        miou, _ = metric.evaluate()
    return float(miou), metric.hist


# ------------------------------------------------------------------------------ run

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=0, help="only the first N ids (0 = all 10,582)")
    p.add_argument("--workers", type=int, default=_common.cores(), help="eps worker processes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-single", action="store_true", help="skip the one-worker eps figure")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "eps-bench-cache",
                   help="where the perturbed predictions are cached")
    p.add_argument("--gt-root", type=Path, default=None,
                   help="voc12_masks folder (default ../shared/data/voc12_masks)")
    p.add_argument("--quick", action="store_true", help="first 200 ids, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 200
        args.repeats = 1
    _common.header("evaluate_masks", "cpu", argv)
    root = args.gt_root
    if root is None:
        shared = _common.shared_dir()
        root = shared / "data" / "voc12_masks" if shared is not None else None
    if root is None or not (root / "SegmentationClassAug").is_dir():
        print(f"SKIP: the VOC masks are not here ({root or '../shared/data/voc12_masks'}): "
              "this benchmark needs ../shared beside the checkout (or --gt-root)")
        _common.summary("evaluate_masks: skipped (no ../shared/data/voc12_masks)")
        return 0

    from eps.metrics import evaluate_masks

    gt_dir = root / "SegmentationClassAug"
    ids = (root / "metadata" / "train_aug.txt").read_text().split()
    if args.limit:
        ids = ids[: args.limit]
    pred_dir = prediction_cache(gt_dir, ids, args.seed, args.cache)
    print(f"{len(ids)} masks (train_aug), gt {gt_dir}, predictions {pred_dir}")

    results = {}

    def official():
        results["official"] = official_evaluate(pred_dir, gt_dir, ids)

    def official_per_image():
        results["official1"] = official_evaluate(pred_dir, gt_dir, ids, per_image=True)

    def eps_parallel():
        results["eps"] = evaluate_masks(pred_dir, gt_dir, ids, NUM_CLASSES, workers=args.workers)

    def eps_single():
        results["eps1"] = evaluate_masks(pred_dir, gt_dir, ids, NUM_CLASSES, workers=1)

    funcs = {"official": official, "official, per image": official_per_image,
             f"eps ({args.workers} workers)": eps_parallel}
    if not args.no_single and args.workers != 1:
        funcs["eps (1 worker)"] = eps_single
    # warm-up: one read of every file, so the page cache serves all paths alike
    for d in (gt_dir, pred_dir):
        for image_id in ids:
            (d / f"{image_id}.png").read_bytes()
    times = _common.interleaved(funcs, args.repeats, warmup=False)
    t_off = _common.median(times["official"])
    t_off1 = _common.median(times["official, per image"])
    for name, ts in times.items():
        t = _common.median(ts)
        extra = "" if name == "official" else f", {t_off / t:.2f}x the official loop"
        if name.startswith("eps"):
            extra += f", {t_off1 / t:.2f}x the per-image one"
        print(f"{name:<22} {len(ids) / t:8.1f} images/s ({_common.fmt_times(ts)}){extra}")
    off_miou, off_hist = results["official"]
    eps_miou = results["eps"]["miou"]
    same_hist = (np.array_equal(np.asarray(results["eps"]["hist"], np.float64), off_hist)
                 and np.array_equal(results["official1"][1], off_hist))
    diff = abs(eps_miou - off_miou)
    print(f"mIoU official {off_miou:.10f}, eps {eps_miou:.10f}, |difference| {diff:.2e}; "
          f"histograms identical: {same_hist}")
    if "eps1" in results:
        assert results["eps1"]["hist"] == results["eps"]["hist"]
    t_eps = _common.median(times[f"eps ({args.workers} workers)"])
    speedup = t_off / t_eps
    met = speedup >= 2.5 and diff <= 1e-6 and same_hist
    single = ""
    if "eps (1 worker)" in times:
        single = f", {t_off / _common.median(times['eps (1 worker)']):.2f}x with 1 worker"
    _common.summary(f"evaluate_masks: {len(ids)} masks, eps {speedup:.2f}x the official loop with "
                    f"{args.workers} workers{single}, {t_off1 / t_eps:.2f}x the official loop with one "
                    f"histogram per image; mIoU {eps_miou:.6f} vs {off_miou:.6f} "
                    f"(diff {diff:.1e}); target >= 2.5x and 1e-6: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
