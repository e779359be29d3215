"""Segmentation metrics: confusion histograms, mIoU, per-class IoU/precision/recall, the
co-occurrence confusion of the EPS paper (Table 2) and boundary precision / recall / F1
(Table 1; `boundary_scores`, `evaluate_boundaries`).

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
from eps.errors import EpsError, file_error


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
        from eps.data.voc import VOC_CLASSES

        if num_classes == len(VOC_CLASSES) + 1:  # 21 values: PASCAL VOC's classes
            return ["background"] + list(VOC_CLASSES)
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


def mask_file(source, image_id: str) -> Path:
    """`{id}.png` of a folder, or the path a mapping gives for the id (an index's mask column)."""
    if isinstance(source, dict):
        return Path(source[image_id])
    return Path(source) / f"{image_id}.png"


def _read_same_size(path: Path, shape, what: str) -> np.ndarray:
    """Read an index PNG that must match the ground-truth size."""
    mask = read_index_png(path)
    if mask.shape != shape:
        raise file_error(
            path,
            f"{what} size {mask.shape[1]}x{mask.shape[0]} differs from the ground truth "
            f"{shape[1]}x{shape[0]} (WxH)",
        )
    return mask


def _check_labels(path: Path, pred: np.ndarray, n: int) -> None:
    """A prediction holds classes 0..n-1 and void 255 only: anything else (a grey map given
    as a mask, masks of a dataset with more classes) is a bad input, not void."""
    if pred.size and int(pred.max()) >= n:
        bad = np.unique(pred[(pred >= n) & (pred != 255)])
        if len(bad):
            raise file_error(path, f"prediction value {int(bad[0])} is not a class (0..{n - 1}) or void (255)")


def _accumulate(job) -> tuple[np.ndarray, np.ndarray]:
    """Histogram and per-pair false-positive counts over a chunk of ids (a Pool task)."""
    pred_dir, gt_dir, ids, n, context_dir, pairs = job
    hist = np.zeros((n, n), np.int64)
    fp = np.zeros(len(pairs), np.int64)
    for image_id in ids:
        gt = read_index_png(mask_file(gt_dir, image_id))
        pred_path = Path(pred_dir) / f"{image_id}.png"
        pred = _read_same_size(pred_path, gt.shape, "prediction")
        _check_labels(pred_path, pred, n)
        hist += confusion(gt, pred, n)
        if pairs:
            ctx = read_context(context_dir, image_id, gt.shape)
            valid = (gt < n) & (pred < n)
            for j, (k, c, _) in enumerate(pairs):
                fp[j] += np.count_nonzero(valid & (ctx == k) & (pred == c) & (gt != c))
    return hist, fp


def _chunks(ids: list[str], count: int) -> list[list[str]]:
    return [list(chunk) for chunk in np.array_split(np.asarray(ids, dtype=object), count) if len(chunk)]


def _part(source, ids):
    """A folder as it is; of a dict {id: path}, the entries of `ids` (what one Pool task needs)."""
    return {i: source[i] for i in ids if i in source} if isinstance(source, dict) else source


def _nan_to_none(x: float):
    """JSON has no NaN or infinity: undefined values (0/0, x/0) become null."""
    x = float(x)
    return x if math.isfinite(x) else None


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
    boundary_tolerance=None,
    boundary_dir=None,
) -> dict:
    """Evaluate `{id}.png` predictions against ground truth over `ids`.

    `gt_dir` (and `context_dir`) is a folder of `{id}.png`, or a dict {id: path} (the
    index's mask and context columns: `eps.data.index.split_ground_truth`).

    One confusion histogram is accumulated over all images (the dataset-level mIoU of
    the official code, not a mean of per-image scores). `pairs` are (context, class)
    with context the 1-based value in `context_dir/{id}.png` and class the mask value
    (or names from `context_names` / `class_names`); each gives the co-occurrence
    confusion m = FP_{k,c} / TP_c of the paper's Table 2, with FP_{k,c} the non-void
    pixels of context k predicted as c whose ground truth is not c.

    Returns a JSON-ready dict: `miou` (0..1), `per_class`, `num_images`, `num_classes`,
    `confusion` (one entry per pair) and `hist`; nan values are None. With
    `boundary_tolerance` (pixels) also `boundary`: precision / recall / F1 of the
    class-agnostic edges (`evaluate_boundaries`; `boundary_dir` = SBD `.mat` boundaries).
    Context masks are `{id}.png` or PASCAL-Context `{id}.mat` (`read_context`).
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
    jobs = [(pred_dir, _part(gt_dir, chunk), chunk, n, _part(context_dir, chunk), resolved)
            for chunk in _chunks(ids, workers * 4)]
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
    if boundary_tolerance is not None:  # a second pass over the PNGs (evaluate_boundaries)
        result["boundary"] = evaluate_boundaries(pred_dir, gt_dir, ids, n, tolerance=boundary_tolerance,
                                                 boundary_dir=boundary_dir, workers=workers)
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


# ---------------------------------------------------------------------------------------
# Context masks: PNG or PASCAL-Context .mat


def read_context(context_dir, image_id: str, shape) -> np.ndarray:
    """The context index mask of `image_id`: `{id}.png` or a PASCAL-Context `{id}.mat`.

    PNG: an index mask (8- or 16-bit, 0 = none, k = context k, 1-based). `.mat`: the
    `LabelMap` field of PASCAL-Context's `trainval/{id}.mat` (values 1..459, the line number
    in its labels.txt; pass those names as the dataset's `contexts`). The mask must have
    the ground truth's size `shape`.
    """
    if isinstance(context_dir, dict):  # the index's context column: the file itself
        given = Path(context_dir[image_id])
        png, mat = (given, None) if given.suffix.lower() != ".mat" else (None, given)
        if not given.is_file():
            raise file_error(given, "context mask not found")
    else:
        folder = Path(context_dir)
        png, mat = folder / f"{image_id}.png", folder / f"{image_id}.mat"
    if png is not None and png.is_file():
        from PIL import Image

        try:
            with Image.open(png) as img:
                wide = img.mode in ("I", "I;16", "I;16B", "I;16L")
                ctx = np.asarray(img, dtype=np.int32) if wide else None
        except Exception as exc:  # PIL raises many types for corrupt files
            raise file_error(png, f"cannot decode context mask ({type(exc).__name__}: {exc})") from None
        if ctx is None:
            ctx = read_index_png(png)
        path = png
    elif mat is not None and mat.is_file():
        ctx = _load_mat_field(mat, ("LabelMap",), "a PASCAL-Context label file")
        path = mat
    else:
        raise file_error(png, "file not found (nor a PASCAL-Context .mat beside it)")
    if ctx.ndim != 2 or ctx.shape != tuple(shape):
        got = "x".join(str(s) for s in ctx.shape[::-1])
        raise file_error(path, f"context size {got} differs from the ground truth {shape[1]}x{shape[0]} (WxH)")
    return ctx


def _load_mat_field(path: Path, fields, what: str):
    """A field of a MATLAB file (scipy.io.loadmat): a top-level variable, or one of a struct."""
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ...
        raise file_error(path, f"not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    for name in fields:
        if name in data:
            return np.asarray(data[name])
    names = sorted(k for k in data if not k.startswith("__"))
    raise file_error(path, f"not {what} (no {' or '.join(fields)} variable; has {names})")


# ---------------------------------------------------------------------------------------
# Boundary accuracy (the paper's Table 1)
#
# Class-agnostic edges of a label map, matched within a pixel tolerance against the
# ground-truth boundaries: precision = predicted edge pixels within `tolerance` (Euclidean)
# of a ground-truth edge / predicted edge pixels, recall = ground-truth edge pixels within
# `tolerance` of a predicted edge / ground-truth edge pixels; both accumulated over all
# images (like the confusion histogram), F1 = 2PR / (P + R).
#
# Void (values >= num_classes, 255) is no label: edges are taken on the map with void
# filled by the nearest labelled pixel, so void creates no boundary of its own (a void
# fragment inside one region gives none, a VOC void band between object and background
# gives one boundary along its middle). A predicted edge inside a void band is where the
# true boundary lies: it counts, matched; one in void that holds no boundary (inside one
# region) is neither counted nor penalised. A prediction equal to the ground truth (void
# filled or not) scores precision = recall = 1.

BOUNDARY_TOLERANCE = 2


def mask_edges(mask) -> np.ndarray:
    """Class-agnostic edges of a label map (bool): pixels with a 4-neighbour of another label.

    This is the paper's Laplacian edge detector (`cv2.Laplacian(mask) != 0`, 4-neighbour
    kernel) taken per class indicator, so that neighbouring labels cannot cancel in the sum
    (labels 1 and 3 around a 2): both sides of every label change are edges; the image
    border is not.
    """
    m = np.asarray(mask)
    edge = np.zeros(m.shape, bool)
    horizontal = m[:, 1:] != m[:, :-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    vertical = m[1:, :] != m[:-1, :]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def fill_void(mask, num_classes: int) -> np.ndarray:
    """The label map with every void pixel (>= num_classes) given its nearest labelled pixel's label."""
    from scipy import ndimage

    m = np.asarray(mask)
    void = m >= num_classes
    if not void.any() or void.all():
        return m
    idx = ndimage.distance_transform_edt(void, return_distances=False, return_indices=True)
    return m[tuple(idx)]


# Up to this tolerance the pixels near an edge are found by shifting the edge map over a disk
# (12 shifts at 2 px: `evaluate-masks` 5x faster than with a distance transform); beyond it,
# by the transform.
SHIFT_TOLERANCE = 8


def _near(edges: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels (bool) within Euclidean distance `tolerance` of an edge pixel of the image."""
    from scipy import ndimage

    if not edges.any():
        return np.zeros(edges.shape, bool)
    if tolerance > SHIFT_TOLERANCE:
        return ndimage.distance_transform_edt(~edges) <= tolerance
    near = edges.copy()
    r = int(math.floor(tolerance))
    h, w = edges.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= tolerance * tolerance and abs(dy) < h and abs(dx) < w:
                near[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                    edges[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return near


def _void_band(gt: np.ndarray, num_classes: int, gt_edges: np.ndarray) -> np.ndarray:
    """Void pixels (bool) of the void regions that hold a ground-truth boundary: VOC's band
    between an object and what surrounds it, as opposed to void inside one region."""
    from scipy import ndimage

    void = gt >= num_classes
    if not void.any():
        return void
    regions, count = ndimage.label(void)
    holding = np.zeros(count + 1, bool)
    holding[np.unique(regions[void & gt_edges])] = True
    holding[0] = False
    return holding[regions]


def boundary_counts(pred, gt, num_classes: int, tolerance: float = BOUNDARY_TOLERANCE,
                    gt_edges=None) -> np.ndarray:
    """[matched predicted, predicted, matched ground truth, ground truth] edge pixels of one image.

    `pred` and `gt` are label maps of one size (void >= num_classes); `gt_edges` (bool)
    replaces the edges of `gt` where the dataset gives its own boundaries (SBD).
    """
    n = int(num_classes)
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"gt and pred differ in size: {gt.shape} vs {pred.shape}")
    pred_edges = mask_edges(fill_void(pred, n))
    if gt_edges is None:
        gt_edges = mask_edges(fill_void(gt, n))
    else:
        gt_edges = np.asarray(gt_edges, bool)
        if gt_edges.shape != gt.shape:
            raise ValueError(f"gt edges and gt differ in size: {gt_edges.shape} vs {gt.shape}")
    band = _void_band(gt, n, gt_edges)
    # predicted edges on labelled pixels, and in a void band (where the true boundary lies:
    # matched by it); edges in void that holds no boundary (inside one region) are not judged
    counted = pred_edges & ((gt < n) | band)
    matched_pred = np.count_nonzero(counted & (band | _near(gt_edges, tolerance)))
    matched_gt = np.count_nonzero(gt_edges & _near(pred_edges, tolerance))
    return np.array([matched_pred, np.count_nonzero(counted), matched_gt, np.count_nonzero(gt_edges)], np.int64)


def boundary_from_counts(counts) -> dict:
    """Precision, recall and F1 (0..1, None where undefined) from summed `boundary_counts`."""
    matched_pred, pred, matched_gt, gt = (int(x) for x in counts)
    precision = matched_pred / pred if pred else math.nan
    recall = matched_gt / gt if gt else math.nan
    if precision == 0 or recall == 0:
        f1 = 0.0  # also when the other is undefined: no edge predicted, or none to find
    elif math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "precision": _nan_to_none(precision), "recall": _nan_to_none(recall), "f1": _nan_to_none(f1),
        "matched_pred": matched_pred, "pred_edges": pred, "matched_gt": matched_gt, "gt_edges": gt,
    }


def boundary_scores(pred, gt, num_classes: int, tolerance: float = BOUNDARY_TOLERANCE, gt_edges=None) -> dict:
    """Boundary precision, recall and F1 of one prediction (or of lists of them, accumulated).

    `pred` and `gt` are label maps, or equal-length sequences of them (then the edge pixel
    counts are summed over all images before dividing, as evaluate_masks does).
    """
    if isinstance(pred, (list, tuple)):
        edges = gt_edges if gt_edges is not None else [None] * len(pred)
        if not (len(pred) == len(gt) == len(edges)):
            raise ValueError("pred, gt (and gt_edges) need the same number of images")
        counts = sum((boundary_counts(p, g, num_classes, tolerance, e) for p, g, e in zip(pred, gt, edges)),
                     np.zeros(4, np.int64))
    else:
        counts = boundary_counts(pred, gt, num_classes, tolerance, gt_edges)
    return {"tolerance": float(tolerance), **boundary_from_counts(counts)}


def read_gt_boundaries(boundary_dir, image_id: str, shape) -> np.ndarray:
    """Dataset boundaries of `image_id` (bool): SBD `cls/{id}.mat` or a PNG `{id}.png` (non-zero = edge).

    SBD: the union over classes of the `GTcls` struct's `Boundaries` (one sparse map per
    class); a file without `Boundaries` falls back to the edges of its `Segmentation`.
    """
    folder = Path(boundary_dir)
    mat, png = folder / f"{image_id}.mat", folder / f"{image_id}.png"
    if mat.is_file():
        edges = _sbd_boundaries(mat)
        path = mat
    elif png.is_file():
        edges = read_index_png(png) != 0
        path = png
    else:
        raise file_error(mat, "file not found (SBD cls/{id}.mat or a boundary PNG {id}.png)")
    if edges.shape != tuple(shape):
        got = "x".join(str(s) for s in edges.shape[::-1])
        raise file_error(path, f"boundary size {got} differs from the ground truth {shape[1]}x{shape[0]} (WxH)")
    return edges


def _sbd_boundaries(path: Path) -> np.ndarray:
    struct = _load_mat_field(path, ("GTcls", "GTinst"), "an SBD annotation")
    try:
        record = struct.reshape(-1)[0]
        names = record.dtype.names or ()
        if "Boundaries" in names:
            cells = np.asarray(record["Boundaries"], dtype=object).reshape(-1)
            edges = None
            for cell in cells:
                cell = cell.toarray() if hasattr(cell, "toarray") else np.asarray(cell)
                edges = cell != 0 if edges is None else edges | (cell != 0)
            if edges is not None:
                return edges
        if "Segmentation" in names:
            return mask_edges(np.asarray(record["Segmentation"]))
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise file_error(path, f"unexpected SBD struct layout ({type(exc).__name__}: {exc})") from None
    raise file_error(path, "SBD struct has neither Boundaries nor Segmentation")


def _boundary_job(job) -> np.ndarray:
    """Summed boundary counts over a chunk of ids (a Pool task)."""
    pred_dir, gt_dir, ids, n, tolerance, boundary_dir = job
    counts = np.zeros(4, np.int64)
    for image_id in ids:
        gt = read_index_png(mask_file(gt_dir, image_id))
        pred = _read_same_size(Path(pred_dir) / f"{image_id}.png", gt.shape, "prediction")
        edges = read_gt_boundaries(boundary_dir, image_id, gt.shape) if boundary_dir else None
        counts += boundary_counts(pred, gt, n, tolerance, edges)
    return counts


def evaluate_boundaries(pred_dir, gt_dir, ids, num_classes: int, *, tolerance: float = BOUNDARY_TOLERANCE,
                        boundary_dir=None, workers: int = 1) -> dict:
    """Boundary precision / recall / F1 of `{id}.png` predictions over `ids` (one pass, `workers` processes).

    Ground-truth boundaries: `boundary_dir` (SBD `.mat` or boundary PNGs) when given, else
    the edges of the ground-truth masks (`gt_dir`: a folder or a dict {id: path}).
    """
    if tolerance < 0:
        raise EpsError(f"boundary_tolerance: must be >= 0, got {tolerance}")
    ids = [str(i) for i in ids]
    workers = max(1, int(workers))
    jobs = [(pred_dir, _part(gt_dir, chunk), chunk, int(num_classes), float(tolerance), boundary_dir)
            for chunk in _chunks(ids, workers * 4)]
    counts = np.zeros(4, np.int64)
    if workers == 1 or len(jobs) <= 1:
        for c in map(_boundary_job, jobs):
            counts += c
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for c in pool.imap_unordered(_boundary_job, jobs):
                counts += c
    source = "boundaries" if boundary_dir else "masks"
    return {"tolerance": float(tolerance), "source": source, **boundary_from_counts(counts)}
