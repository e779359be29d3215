"""Segmentation metrics: confusion histograms, mIoU, per-class IoU/precision/recall, and the
co-occurrence confusion of the EPS paper (Table 2).

Conventions follow the official EPS evaluation (`evaluate_png.py`), pinned by
`../shared/golden/miou_reference.npz`:

- a pixel counts only if its ground truth AND its prediction are below `num_classes`,
  so void (255) in either mask is ignored;
- IoU = TP / (TP + FP + FN); a class absent from both ground truth and prediction
  gets 0/0 = nan, and mIoU is the nanmean, so absent classes do not pull it down;
- precision and recall are nan where their denominator is zero.

Unlike the official script, which crops (or zero-pads) a prediction to the ground-truth
size, a prediction of a different size is an error here: it hides a broken stage.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np

from eps.data.io import atomic_path, read_index_png
from eps.errors import EpsError, fail


def confusion(gt, pred, num_classes: int) -> np.ndarray:
    """(n, n) int64 histogram, rows ground truth, columns prediction, in one bincount.

    Pixels whose ground truth or prediction is >= num_classes (void 255) are ignored,
    as in the official evaluation.
    """
    n = int(num_classes)
    gt = np.asarray(gt).ravel()
    pred = np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.size} vs {pred.size}")
    # void pixels go to one extra bin that is dropped: cheaper than compressing the arrays
    void = (gt >= n) | (pred >= n)
    if gt.dtype.kind == "i" or pred.dtype.kind == "i":
        void |= (gt < 0) | (pred < 0)
    codes = gt.astype(np.intp) * n + pred
    codes[void] = n * n
    return np.bincount(codes, minlength=n * n + 1)[: n * n].reshape(n, n).astype(np.int64, copy=False)


def _divide(num, den) -> np.ndarray:
    """num / den with nan (no warning) where den is 0: the official 0/0 behaviour."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def iou_from_confusion(hist) -> np.ndarray:
    """Per-class IoU = TP / (gt + pred - TP); nan for a class in neither gt nor prediction."""
    hist = np.asarray(hist, np.float64)
    tp = np.diag(hist)
    return _divide(tp, hist.sum(axis=1) + hist.sum(axis=0) - tp)


def miou(hist) -> float:
    """Mean IoU over the classes that occur (nanmean), a fraction in 0..1."""
    iou = iou_from_confusion(hist)
    return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else math.nan


def precision_from_confusion(hist) -> np.ndarray:
    """Per-class precision TP / predicted; nan for a class never predicted."""
    hist = np.asarray(hist, np.float64)
    return _divide(np.diag(hist), hist.sum(axis=0))


def recall_from_confusion(hist) -> np.ndarray:
    """Per-class recall TP / ground truth; nan for a class absent from the ground truth."""
    hist = np.asarray(hist, np.float64)
    return _divide(np.diag(hist), hist.sum(axis=1))


# ---------------------------------------------------------------------------------------
# Evaluating a folder of predicted masks


def _class_names(class_names, num_classes: int) -> list[str]:
    """Names for mask values 0..n-1; foreground-only lists (classes.json) get 'background' first."""
    if class_names is None:
        return ["background"] + [f"class{i}" for i in range(1, num_classes)]
    names = [str(x) for x in class_names]
    if len(names) == num_classes - 1:
        names = ["background"] + names
    if len(names) != num_classes:
        raise EpsError(
            f"class_names: {len(names)} names given for {num_classes} mask values "
            f"(expected {num_classes} or {num_classes - 1} without background)"
        )
    return names


def _resolve_pairs(pairs, class_names: list[str], context_names) -> list[tuple[int, int, str]]:
    """Turn pairs of (context, class), each an index or a name, into (k, c, label).

    k is the 1-based context value in the context PNGs; c the class value in the masks.
    """
    contexts = [str(x) for x in context_names] if context_names is not None else None
    resolved = []
    for pair in pairs:
        try:
            ctx, cls = pair
        except (TypeError, ValueError):
            raise EpsError(f"pairs: {pair!r} is not a (context, class) pair") from None
        if isinstance(ctx, str):
            if contexts is None or ctx not in contexts:
                raise EpsError(f"pairs: unknown context {ctx!r}")
            k = contexts.index(ctx) + 1
        else:
            k = int(ctx)
            if k < 1 or (contexts is not None and k > len(contexts)):
                raise EpsError(f"pairs: context index {k} out of range (1-based)")
        if isinstance(cls, str):
            if cls not in class_names:
                raise EpsError(f"pairs: unknown class {cls!r}")
            c = class_names.index(cls)
        else:
            c = int(cls)
            if not 0 <= c < len(class_names):
                raise EpsError(f"pairs: class value {c} out of range 0..{len(class_names) - 1}")
        ctx_name = contexts[k - 1] if contexts is not None else f"context{k}"
        resolved.append((k, c, f"{ctx_name}->{class_names[c]}"))
    return resolved


def _read_same_size(path: Path, shape, what: str) -> np.ndarray:
    """Read an index PNG that must match the ground-truth size."""
    mask = read_index_png(path)
    if mask.shape != shape:
        raise fail(
            path,
            f"{what} size {mask.shape[1]}x{mask.shape[0]} differs from the ground truth "
            f"{shape[1]}x{shape[0]} (WxH)",
        )
    return mask


def _accumulate(job) -> tuple[np.ndarray, np.ndarray]:
    """Histogram and per-pair false-positive counts over a chunk of ids (a Pool task)."""
    pred_dir, gt_dir, ids, n, context_dir, pairs = job
    hist = np.zeros((n, n), np.int64)
    fp = np.zeros(len(pairs), np.int64)
    for image_id in ids:
        gt = read_index_png(Path(gt_dir) / f"{image_id}.png")
        pred = _read_same_size(Path(pred_dir) / f"{image_id}.png", gt.shape, "prediction")
        hist += confusion(gt, pred, n)
        if pairs:
            ctx = _read_same_size(Path(context_dir) / f"{image_id}.png", gt.shape, "context")
            valid = (gt < n) & (pred < n)
            for j, (k, c, _) in enumerate(pairs):
                fp[j] += np.count_nonzero(valid & (ctx == k) & (pred == c) & (gt != c))
    return hist, fp


def _chunks(ids: list[str], count: int) -> list[list[str]]:
    return [list(chunk) for chunk in np.array_split(np.asarray(ids, dtype=object), count) if len(chunk)]


def _nan_to_none(x: float):
    """JSON has no NaN: absent values become null."""
    x = float(x)
    return None if math.isnan(x) else x


def evaluate_masks(
    pred_dir,
    gt_dir,
    ids,
    num_classes: int,
    *,
    context_dir=None,
    pairs=(),
    class_names=None,
    context_names=None,
    workers: int = 1,
) -> dict:
    """Evaluate `{id}.png` predictions against `{id}.png` ground truth over `ids`.

    One confusion histogram is accumulated over all images (the dataset-level mIoU of
    the official code, not a mean of per-image scores). `pairs` are (context, class)
    with context the 1-based value in `context_dir/{id}.png` and class the mask value
    (or names from `context_names` / `class_names`); each gives the co-occurrence
    confusion m = FP_{k,c} / TP_c of the paper's Table 2, with FP_{k,c} the non-void
    pixels of context k predicted as c whose ground truth is not c.

    Returns a JSON-ready dict: `miou` (0..1), `per_class`, `num_images`, `num_classes`,
    `confusion` (one entry per pair) and `hist`; nan values are None.
    """
    n = int(num_classes)
    if n < 1:
        raise EpsError(f"num_classes: must be positive, got {n}")
    ids = [str(i) for i in ids]
    names = _class_names(class_names, n)
    resolved = _resolve_pairs(pairs, names, context_names)
    if resolved and context_dir is None:
        raise EpsError("context_dir: co-occurrence pairs need context masks")
    workers = max(1, int(workers))

    hist = np.zeros((n, n), np.int64)
    fp = np.zeros(len(resolved), np.int64)
    jobs = [(pred_dir, gt_dir, chunk, n, context_dir, resolved) for chunk in _chunks(ids, workers * 4)]
    if workers == 1 or len(jobs) <= 1:
        for h, f in map(_accumulate, jobs):
            hist += h
            fp += f
    else:
        # fork where available: no re-import of the caller's __main__ (an unguarded script
        # would recurse under spawn) and instant start; workers only run numpy and PIL
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for h, f in pool.imap_unordered(_accumulate, jobs):
                hist += h
                fp += f

    iou = iou_from_confusion(hist)
    precision = precision_from_confusion(hist)
    recall = recall_from_confusion(hist)
    tp = np.diag(hist)
    result = {
        "miou": _nan_to_none(miou(hist)),
        "num_images": len(ids),
        "num_classes": n,
        "per_class": [
            {
                "class": names[c],
                "iou": _nan_to_none(iou[c]),
                "precision": _nan_to_none(precision[c]),
                "recall": _nan_to_none(recall[c]),
            }
            for c in range(n)
        ],
        "confusion": [
            {
                "pair": label,
                "context": k,
                "class": c,
                "fp": int(fp[j]),
                "tp": int(tp[c]),
                "m": _nan_to_none(_divide(fp[j], tp[c])),
                "class_iou": _nan_to_none(iou[c]),
            }
            for j, (k, c, label) in enumerate(resolved)
        ],
        "hist": hist.tolist(),
    }
    return result


def _fmt(x) -> str:
    return "nan" if x is None else repr(float(x))


def write_metrics(result: dict, out_dir) -> None:
    """Write `metrics.json` and `per_class.csv` into out_dir; both appear or neither does."""
    out_dir = Path(out_dir)
    text_json = json.dumps(result, indent=2, allow_nan=False) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "iou", "precision", "recall"])
    for row in result["per_class"]:
        writer.writerow([row["class"], _fmt(row["iou"]), _fmt(row["precision"]), _fmt(row["recall"])])
    with atomic_path(out_dir / "metrics.json") as tmp_json, atomic_path(out_dir / "per_class.csv") as tmp_csv:
        tmp_json.write_text(text_json)
        tmp_csv.write_text(buf.getvalue())
