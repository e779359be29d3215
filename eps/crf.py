"""Dense CRF refinement (pydensecrf) of pseudo-masks and segmenter predictions.

``dense_crf(image, probs, params)`` is exactly the call the field uses (DeepLab's
``DenseCRF``, PSA's ``crf_inference``): unary = -log(clip(probs, 1e-5, 1)) (pydensecrf's
``unary_from_softmax``), a Gaussian kernel (``pos_xy``, ``pos_w``), then a bilateral kernel
(``bi_xy``, ``bi_rgb``, ``bi_w``), ``iterations`` mean-field steps. Presets:

- ``deeplab``: bi_w 4, bi_xy 67, bi_rgb 3, pos_w 3, pos_xy 1, 10 iterations (DeepLab VOC).
- ``psa``: pos sxy 3 compat 3, bi sxy 80 srgb 13 compat 10, 10 iterations (PSA / AffinityNet).

Any of the five kernel parameters and ``iterations`` may be given explicitly; they override
the preset.

Pseudo-masks (``refine_cam_shard``) need per-pixel class scores: the CAM shard holds
max-normalised maps of the labelled classes; the score stack is ``[background, class maps]``
with the background either the constant ``bg_threshold`` (``background: threshold``, the
official EPS pseudo-mask rule: without pairwise terms the CRF labels equal the pseudo-mask)
or ``(1 - max_c map_c) ** alpha`` (``background: power``, PSA's ``infer_cls.py``; PSA uses
alpha 4 and 32). As in PSA the stack goes to the unary unnormalised (a per-pixel constant
does not change mean-field inference). The CAM's own EPS background channel is not used,
as in the official pseudo-mask rule. An image without labelled classes is all background.

Images of a shard are refined in parallel (``workers`` processes); results are written in
shard order by one writer, so the output does not depend on the worker count.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np

from eps.data.index import read_index
from eps.data.io import atomic_h5, open_h5, read_image
from eps.errors import EpsError
from eps.progress import progress
from eps.shards import read_cams

PRESETS = {
    "deeplab": {"bi_w": 4.0, "bi_xy": 67.0, "bi_rgb": 3.0, "pos_w": 3.0, "pos_xy": 1.0, "iterations": 10},
    "psa": {"bi_w": 10.0, "bi_xy": 80.0, "bi_rgb": 13.0, "pos_w": 3.0, "pos_xy": 3.0, "iterations": 10},
}
KERNEL_KEYS = ("bi_w", "bi_xy", "bi_rgb", "pos_w", "pos_xy", "iterations")

CRF_DEFAULTS = {
    "enabled": True,  # workflow switch (rule `crf`); the command ignores it
    "preset": "deeplab",  # deeplab | psa
    # explicit kernel parameters; null = the preset's value
    "bi_w": None, "bi_xy": None, "bi_rgb": None, "pos_w": None, "pos_xy": None, "iterations": None,
    # unary of pseudo-masks from CAMs
    "background": "threshold",  # threshold (constant bg_threshold) | power ((1 - max) ** alpha)
    "bg_threshold": 0.20,
    "alpha": 4.0,
    # run the CRF on the image and scores resized by this factor (kernel widths in pixels
    # scaled with them), then resize its marginals back: 0.5 is 4x cheaper on large photos
    "scale": 1.0,
}


def kernel_params(params: dict) -> dict:
    """The preset's six values with explicit (non-null) ones on top; checked."""
    preset = params.get("preset", "deeplab")
    if preset not in PRESETS:
        raise EpsError(f"crf.preset: unknown value {preset!r} (allowed: {', '.join(PRESETS)})")
    out = dict(PRESETS[preset])
    for key in KERNEL_KEYS:
        if params.get(key) is not None:
            out[key] = params[key]
    for key in KERNEL_KEYS:
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] < 0:
            raise EpsError(f"crf.{key}: expected a non-negative number, got {out[key]!r}")
    for key in ("bi_xy", "bi_rgb", "pos_xy"):
        if out[key] <= 0:
            raise EpsError(f"crf.{key}: must be positive (a kernel width), got {out[key]!r}")
    out["iterations"] = int(out["iterations"])
    return out


def dense_crf(image: np.ndarray, probs: np.ndarray, params: dict) -> np.ndarray:
    """Mean-field dense CRF: image uint8 (H, W, 3), probs (C, H, W) -> Q float32 (C, H, W).

    ``params``: a crf block (preset and/or explicit values) or the output of ``kernel_params``.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k = kernel_params(params)
    probs = np.asarray(probs, np.float32)
    c, h, w = probs.shape
    if image.shape[:2] != (h, w) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} does not match probabilities {probs.shape}")
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=k["pos_xy"], compat=k["pos_w"])
    d.addPairwiseBilateral(sxy=k["bi_xy"], srgb=k["bi_rgb"], rgbim=np.require(image, np.uint8, ["C", "W"]),
                           compat=k["bi_w"])
    q = d.inference(k["iterations"])
    return np.asarray(q, np.float32).reshape(c, h, w)


def cam_scores(maps: np.ndarray, background_channel: bool, params: dict) -> np.ndarray:
    """(1 + K, H, W) float32 scores [background, labelled class maps] from a CAM shard entry."""
    fg = np.asarray(maps[:-1] if background_channel else maps, np.float32)
    h, w = maps.shape[1:]
    mode = params.get("background", "threshold")
    if mode == "threshold":
        bg = np.full((1, h, w), float(params["bg_threshold"]), np.float32)
    elif mode == "power":
        peak = fg.max(axis=0, keepdims=True) if len(fg) else np.zeros((1, h, w), np.float32)
        bg = np.power(np.clip(1.0 - peak, 0.0, 1.0), float(params["alpha"])).astype(np.float32)
    else:
        raise EpsError(f"crf.background: unknown value {mode!r} (threshold, power)")
    return np.concatenate([bg, fg], 0)


def refine_cams(image: np.ndarray, maps: np.ndarray, classes, background_channel: bool, params: dict) -> np.ndarray:
    """CRF-refined pseudo-mask (uint8, 0 = background, 1..C) of one CAM shard entry."""
    classes = np.asarray(classes, np.int64)
    h, w = maps.shape[1:]
    if len(classes) == 0:
        return np.zeros((h, w), np.uint8)
    scores = cam_scores(maps, background_channel, params)
    q = _dense_crf_scaled(image, scores, params, float(params.get("scale", 1.0)))
    values = np.concatenate([[0], classes + 1]).astype(np.uint8)
    return values[np.argmax(q, axis=0)]


def check_scale(params: dict) -> float:
    """crf.scale, checked: a number in (0, 1]."""
    scale = params.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
        raise EpsError(f"crf.scale: expected a number in (0, 1], got {scale!r}")
    return float(scale)


def refine_probs(image: np.ndarray, probs: np.ndarray, params: dict) -> np.ndarray:
    """CRF-refined mask (uint8 class indices) of a segmenter's softmax (C, H, W).

    The CRF runs over background and the classes that win at least one pixel before it, not
    all C: pydensecrf's cost grows with the number of labels (21 labels cost ~2 s per VOC
    photo, three ~0.3 s) and a class that wins nowhere is not made to win by smoothing.
    Dropping labels shifts no kept label's unary (-log p). `crf.scale` applies as for CAMs.
    """
    probs = np.asarray(probs, np.float32)
    keep = np.union1d([0], np.unique(np.argmax(probs, axis=0))).astype(np.int64)
    scores = probs[keep]
    q = _dense_crf_scaled(image, scores, params, check_scale(params))
    return keep.astype(np.uint8)[np.argmax(q, axis=0)]


def _dense_crf_scaled(image: np.ndarray, scores: np.ndarray, params: dict, scale: float) -> np.ndarray:
    """dense_crf on the image and scores resized by `scale`; marginals resized back (bilinear).
    At scale 1 that is dense_crf itself."""
    if scale == 1.0:
        return dense_crf(image, scores, params)
    import cv2

    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    small_scores = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_AREA) for m in scores])
    k = kernel_params(params)
    k["bi_xy"], k["pos_xy"] = k["bi_xy"] * scale, k["pos_xy"] * scale
    q = dense_crf(small, small_scores, k)
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in q])


def _refine_job(job):
    image_id, image_path, maps, classes, background, params = job
    image = read_image(image_path)
    if image.shape[:2] != maps.shape[1:]:
        raise EpsError(f"{image_path}: image size {image.shape[1]}x{image.shape[0]} differs from its CAM "
                       f"{maps.shape[2]}x{maps.shape[1]} (WxH)")
    return image_id, refine_cams(image, maps, classes, background, params)


def parallel_map(func, jobs, workers: int):
    """``map(func, jobs)`` in order, in `workers` forked processes when more than one."""
    workers = max(1, int(workers))
    if workers == 1:
        yield from map(func, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers) as pool:
        yield from pool.imap(func, jobs, chunksize=1)


def refine_cam_shard(cams_shard, index_csv, out, dataset: str, params: dict, workers: int = 1) -> Path:
    """CRF pseudo-masks of one CAM shard -> a mask shard (format ``eps.masks``) at `out`."""
    kernel_params(params)  # fail early on a bad preset / value
    check_scale(params)
    if params.get("background", "threshold") not in ("threshold", "power"):
        raise EpsError(f"crf.background: unknown value {params['background']!r} (threshold, power)")
    threshold = params.get("bg_threshold", CRF_DEFAULTS["bg_threshold"])
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise EpsError(f"crf.bg_threshold: expected a number in [0, 1] (pseudo_masks.bg_threshold), got {threshold!r}")
    index = read_index(index_csv)
    paths = dict(zip(index["id"], index["image"]))
    out = Path(out)
    with open_h5(cams_shard, "eps.cams", dataset) as src:
        ids = list(src.keys())
        unknown = [i for i in ids if i not in paths]
        if unknown:
            raise EpsError(f"{cams_shard}: {len(unknown)} image id(s) not in {index_csv}, e.g. {unknown[0]!r}")

        def jobs():
            for image_id in ids:
                maps, classes, background = read_cams(src, image_id)
                yield image_id, paths[image_id], maps, classes, background, params

        with atomic_h5(out, "eps.masks", dataset) as dst:
            for image_id, mask in progress(parallel_map(_refine_job, jobs(), workers), total=len(ids),
                                       desc=f"crf {out.name}", mininterval=2):
                dst.create_dataset(image_id, data=mask, compression="gzip", compression_opts=1)
    return out
