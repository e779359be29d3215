"""Salient-object detection metrics: MAE, adaptive and maximum F-measure, S-measure.

Each function scores one image: `pred` is a float map in [0, 1] and `gt` a boolean mask of
the same shape. They follow the common protocol of the saliency literature (beta^2 = 0.3;
max F over 256 thresholds taken on the curve averaged over images), so the figures compare
with published tables. Maps are scored as stored: unlike some toolkits, a map is not
stretched to [0, 1] per image (eps's maps already span 0..255).

Every function takes an optional `valid` mask: pixels outside it (the VOC void label 255,
`VOID`) are left out of every score, neither salient nor background.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from eps.data.io import atomic_path, read_ids_file, read_saliency
from eps.errors import file_error

THRESHOLDS = 256
VOID = 255  # the VOC label of unannotated object borders
_EPS = np.finfo(np.float64).eps


def _as_pair(pred, gt, valid=None) -> tuple[np.ndarray, np.ndarray]:
    """pred and gt as float / bool arrays; with `valid`, only its pixels (flattened)."""
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if valid is not None:
        valid = _valid_mask(valid, gt.shape)
        return pred[valid], gt[valid]
    return pred, gt


def _valid_mask(valid, shape) -> np.ndarray:
    """`valid` as a bool array of `shape` (None: every pixel)."""
    if valid is None:
        return np.ones(shape, bool)
    valid = np.asarray(valid, bool)
    if valid.shape != shape:
        raise ValueError(f"valid mask {valid.shape} and ground truth {shape} differ in shape")
    return valid


def _f_measure(precision, recall, beta2: float):
    """F_beta, 0 where precision and recall are both 0."""
    precision = np.asarray(precision, np.float64)
    recall = np.asarray(recall, np.float64)
    top = (1 + beta2) * precision * recall
    bottom = beta2 * precision + recall
    return np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)


def mae(pred, gt, valid=None) -> float:
    """Mean absolute error between the map and the binary mask."""
    pred, gt = _as_pair(pred, gt, valid)
    return float(np.abs(pred - gt).mean())


def precision_recall(binary, gt) -> tuple[float, float]:
    """Precision and recall of a binary prediction (0 when their denominator is 0)."""
    binary = np.asarray(binary, bool)
    gt = np.asarray(gt, bool)
    tp = np.count_nonzero(binary & gt)
    predicted, positives = np.count_nonzero(binary), np.count_nonzero(gt)
    return (tp / predicted if predicted else 0.0), (tp / positives if positives else 0.0)


def adaptive_threshold(pred) -> float:
    """Twice the mean saliency, capped at 1 (Achanta et al. 2009)."""
    return min(2.0 * float(np.mean(pred)), 1.0)


def f_adaptive(pred, gt, beta2: float = 0.3, valid=None) -> float:
    """F-measure of the map binarised at `adaptive_threshold` (pred >= threshold)."""
    pred, gt = _as_pair(pred, gt, valid)
    precision, recall = precision_recall(pred >= adaptive_threshold(pred), gt)
    return float(_f_measure(precision, recall, beta2))


def pr_curve(pred, gt, valid=None) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at the 256 thresholds t/255, t = 0..255 (pred quantised to 8 bits)."""
    pred, gt = _as_pair(pred, gt, valid)
    levels = np.clip(np.rint(pred * 255), 0, 255).astype(np.int64)
    # pixels at or above threshold t = suffix sums of the per-level histograms
    fg = np.bincount(levels[gt], minlength=THRESHOLDS)[::-1].cumsum()[::-1]
    every = np.bincount(levels.ravel(), minlength=THRESHOLDS)[::-1].cumsum()[::-1]
    tp = fg.astype(np.float64)
    precision = np.divide(tp, every, out=np.zeros(THRESHOLDS), where=every > 0)
    positives = np.count_nonzero(gt)
    recall = tp / positives if positives else np.zeros(THRESHOLDS)
    return precision, recall


def f_curve(pred, gt, beta2: float = 0.3, valid=None) -> np.ndarray:
    """The F-measure at each of the 256 thresholds of `pr_curve` (one image)."""
    return _f_measure(*pr_curve(pred, gt, valid), beta2)


def max_of_mean_curve(curves: Iterable[np.ndarray]) -> float:
    """Dataset max F: the per-image F curves are averaged first, then maximised."""
    curves = np.asarray(list(curves), np.float64)
    if curves.size == 0:
        return float("nan")
    return float(curves.mean(axis=0).max())


def f_max(pred, gt, beta2: float = 0.3) -> float:
    """Max F of one image (a dataset of one); over many images use `max_of_mean_curve`."""
    return max_of_mean_curve([f_curve(pred, gt, beta2)])


# ------------------------------------------------------------------------------ S-measure

def _object_score(values: np.ndarray) -> float:
    """How uniformly high the map is over one region (Fan et al. 2017, eq. 5)."""
    if values.size == 0:
        return 0.0
    mean = values.mean()
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return float(2 * mean / (mean * mean + 1 + std + _EPS))


def _s_object(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> float:
    share = gt[valid].mean()
    return share * _object_score(pred[gt & valid]) + (1 - share) * _object_score(1 - pred[~gt & valid])


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """The single-window SSIM of one quadrant (Fan et al. 2017, eq. 3)."""
    n = max(pred.size - 1, 1)
    x, y = pred.mean(), gt.mean()
    var_x = ((pred - x) ** 2).sum() / n
    var_y = ((gt - y) ** 2).sum() / n
    cov = ((pred - x) * (gt - y)).sum() / n
    top = 4 * x * y * cov
    bottom = (x * x + y * y) * (var_x + var_y)
    if top != 0:
        return float(top / (bottom + _EPS))
    return 1.0 if bottom == 0 else 0.0


def _s_region(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> float:
    """SSIM of the four quadrants split at the ground truth's centroid, weighted by area
    (valid pixels only)."""
    h, w = gt.shape
    total = np.count_nonzero(valid)
    rows, cols = np.nonzero(gt & valid)  # not empty: the caller handles a gt without object
    # the centroid rounded half up, 1-based as in the reference code: the top-left
    # quadrant includes its row and column
    cy = int(np.floor(rows.mean() + 0.5)) + 1
    cx = int(np.floor(cols.mean() + 0.5)) + 1
    gt = gt.astype(np.float64)
    score = 0.0
    for ys in (slice(0, cy), slice(cy, h)):
        for xs in (slice(0, cx), slice(cx, w)):
            keep = valid[ys, xs]
            part = pred[ys, xs][keep]
            if part.size:
                score += part.size / total * _ssim(part, gt[ys, xs][keep])
    return score


def s_measure(pred, gt, alpha: float = 0.5, valid=None) -> float:
    """Structure measure (Fan et al., ICCV 2017): object- and region-aware similarity.

    A ground truth with no object scores 1 - mean(pred); one that is all object, mean(pred).
    """
    pred, gt = _as_pair(pred, gt)
    valid = _valid_mask(valid, gt.shape)
    if not valid.any():
        return float("nan")
    share = gt[valid].mean()
    if share == 0:
        return float(1 - pred[valid].mean())
    if share == 1:
        return float(pred[valid].mean())
    score = alpha * _s_object(pred, gt, valid) + (1 - alpha) * _s_region(pred, gt, valid)
    return float(max(score, 0.0))


# ------------------------------------------------------------------------------ datasets

def evaluate_maps(pairs: Iterable[tuple], beta2: float = 0.3) -> dict:
    """Mean MAE, adaptive F and S-measure, and max F of the mean F curve, over (pred, gt) or
    (pred, gt, valid) tuples; an image with no valid pixel is left out."""
    scores = {"mae": [], "f_adaptive": [], "s_measure": []}
    curves = []
    for pred, gt, *rest in pairs:
        valid = rest[0] if rest else None
        pred, gt = _as_pair(pred, gt)
        if valid is not None and not np.any(valid):
            continue
        scores["mae"].append(mae(pred, gt, valid))
        scores["f_adaptive"].append(f_adaptive(pred, gt, beta2, valid))
        scores["s_measure"].append(s_measure(pred, gt, valid=valid))
        curves.append(f_curve(pred, gt, beta2, valid))
    result = {name: float(np.mean(values)) if values else float("nan") for name, values in scores.items()}
    result["f_max"] = max_of_mean_curve(curves)
    result["images"] = len(curves)
    return result


def read_gt(path) -> tuple[np.ndarray, np.ndarray | None]:
    """A ground truth as (salient, valid): a saliency mask (grey, non-zero = salient, all
    valid) or a VOC label PNG (palette: non-zero classes salient, void 255 not valid)."""
    from eps.data.io import read_index_png

    with Image.open(path) as img:
        palette = img.mode == "P"
    if palette:
        labels = read_index_png(path)
        return (labels > 0) & (labels != VOID), labels != VOID
    return read_saliency(path) > 0, None


def read_pair(pred_path, gt_path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A prediction PNG in [0, 1] at its ground truth's size (bilinear), the mask and its valid pixels."""
    try:
        gt, valid = read_gt(gt_path)
    except (OSError, ValueError) as exc:
        raise file_error(gt_path, f"unreadable ground truth ({exc})") from None
    pred = read_saliency(pred_path).astype(np.float32) / 255.0
    if pred.shape != gt.shape:
        pred = np.clip(cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR), 0, 1)
    return pred, gt, valid


def evaluate_dirs(pred_dir, gt_dir, beta2: float = 0.3, ids=None) -> dict:
    """Score the PNG maps in `pred_dir` against the masks in `gt_dir`, paired by file stem.

    Every ground truth needs its prediction; predictions without a ground truth are ignored.
    With `ids` (a file, one id a line) only those images are scored: each needs its mask and
    prediction, other masks are ignored. A VOC label PNG as ground truth has its void ignored.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder in (gt_dir, pred_dir):
        if not folder.is_dir():
            raise file_error(folder, "folder not found")
    gt_paths = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".png")
    if not gt_paths:
        raise file_error(gt_dir, "no ground-truth PNG files in this folder")
    if ids is not None:
        by_stem = {p.stem: p for p in gt_paths}
        wanted = read_ids_file(ids)
        for image_id in wanted:
            if image_id not in by_stem:
                raise file_error(gt_dir / f"{image_id}.png", f"no ground truth for id {image_id!r} of {ids}")
        gt_paths = [by_stem[i] for i in wanted]
    pred_paths = {p.stem: p for p in pred_dir.iterdir() if p.suffix.lower() == ".png"}
    for gt_path in gt_paths:
        if gt_path.stem not in pred_paths:
            raise file_error(pred_dir / f"{gt_path.stem}.png", f"no prediction for ground truth {gt_path.name}")
    return evaluate_maps((read_pair(pred_paths[g.stem], g) for g in gt_paths), beta2)


def write_json(result: dict, out) -> Path:
    """Write the scores as JSON (atomic)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return out


def evaluate_shards(shards, gt_dir, beta2: float = 0.3, ids=None, index=None) -> dict:
    """Score the maps of saliency HDF5 shards against the dataset's masks `{gt_dir}/{id}.png`
    (or, with `gt_dir` a dict {id: path}, the masks the index file `index` records).

    Every class label counts as salient, background as not; the void band around objects
    (255) is ignored (it is not annotated either way). Images without a mask (a test split)
    are skipped and counted; none at all is an error. With `ids` (a file, one id a line) only
    those images are scored, and each must be in the shards.
    """
    from eps.data.io import open_h5, read_index_png

    by_id = gt_dir if isinstance(gt_dir, dict) else None
    gt_dir = None if by_id is not None else Path(gt_dir)
    if by_id is None and not gt_dir.is_dir():
        raise file_error(gt_dir, "folder not found")

    skipped = []
    wanted = None if ids is None else set(read_ids_file(ids))
    seen = set()

    def pairs():
        for shard in shards:
            with open_h5(shard, "eps.saliency") as f:
                for image_id in sorted(f):
                    if wanted is not None and image_id not in wanted:
                        continue
                    seen.add(image_id)
                    gt_path = Path(by_id.get(image_id) or "") if by_id is not None else gt_dir / f"{image_id}.png"
                    if not gt_path.is_file():
                        skipped.append(image_id)
                        continue
                    labels = read_index_png(gt_path)
                    pred = f[image_id][()].astype(np.float32) / 255.0
                    if pred.shape != labels.shape:
                        raise file_error(shard, f"map of {image_id!r} is {pred.shape[1]}x{pred.shape[0]}, "
                                          f"its mask {labels.shape[1]}x{labels.shape[0]}")
                    yield pred, (labels > 0) & (labels != VOID), labels != VOID
        if wanted is not None and wanted - seen:
            missing = sorted(wanted - seen)
            raise file_error(ids, f"id {missing[0]!r} is in no saliency shard" +
                       (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))

    result = evaluate_maps(pairs(), beta2)
    if not result["images"]:
        if by_id is not None:
            raise file_error(index or "index", "records no mask for any image of the saliency shards")
        raise file_error(gt_dir, "no mask for any image of the saliency shards")
    result["skipped"] = len(skipped)
    return result
