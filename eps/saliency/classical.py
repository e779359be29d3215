"""Classical saliency: training-free priors from one image, fused into a saliency map.

The priors follow the salient-object literature: the background is connected to the image
border (minimum barrier distance, Zhang et al. 2015), differs in colour from the border
strips, objects are rare colours (global contrast) and tend to sit near the centre. Work
is done on a copy ~128 px on its long side, and only the final maps are upsampled, so one
400x300 image takes ~20 ms on one core.
"""

from __future__ import annotations

import cv2
import numpy as np

from eps.errors import EpsError

PRIORS = ("boundary", "border_colour", "contrast", "centre")
CENTRE_SIGMA = 0.25  # the centre prior alone: sigma as a fraction of each side

# The fused map's parameters, tuned on ECSSD images 0001-0250 (bench/saliency_ecssd.py).
DEFAULTS = {
    "side": 128,  # long side of the working copy, px
    "blur": 1.0,  # Gaussian blur (px) before the barrier distance, against texture
    "rounds": 2,  # sweep rounds of the barrier distance
    "strip": 0.1,  # border strip width, a fraction of the side
    "border_colour": 1.0,  # weight of border_colour against boundary
    "centre_sigma": 0.45,  # the centre weighting of the fused map (wider than the prior)
    "smooth": 0.02,  # opening + closing radius, a fraction of the long side
    "colour_mix": 0.4,  # share of the colour-model refinement
    "gain": 20.0,  # slope of the final contrast-enhancing sigmoid (0: none)
}


def _check(rgb) -> np.ndarray:
    from eps.saliency import check_rgb

    check_rgb(rgb, "classical")
    if min(rgb.shape[:2]) < 2:
        raise EpsError(f"classical saliency: an image of {rgb.shape[1]}x{rgb.shape[0]} px is too small")
    return np.ascontiguousarray(rgb)


def _params(overrides: dict) -> dict:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise EpsError(f"classical saliency: unknown parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **overrides}


def _lab_small(rgb: np.ndarray, side: int) -> np.ndarray:
    """The image at ~`side` px on its long side (never enlarged), as float32 Lab, 0..255 each."""
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1:
        rgb = cv2.resize(rgb, (max(2, round(w * scale)), max(2, round(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Stretched to [0, 1] (a constant map becomes 0)."""
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)


def _upsample(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.clip(cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR), 0, 1)


def _colour_codes(lab: np.ndarray, bins: int = 12) -> np.ndarray:
    """Each pixel's colour quantised to one of bins^3 Lab cells."""
    q = np.clip((lab * (bins / 256.0)).astype(np.int64), 0, bins - 1)
    return (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]


# ------------------------------------------------------------------------------ priors

def _sweep(image, dist, high, low, axis: int, reverse: bool) -> None:
    """One directional pass of the barrier-distance update, a whole row (column) at a time."""
    n = image.shape[axis]
    for i in range(n - 2, -1, -1) if reverse else range(1, n):
        prev = i + 1 if reverse else i - 1
        at = (slice(None), i) if axis == 1 else (i,)
        src = (slice(None), prev) if axis == 1 else (prev,)
        pixel = image[at]
        new_high = np.maximum(high[src], pixel)
        new_low = np.minimum(low[src], pixel)
        candidate = new_high - new_low
        better = candidate < dist[at]
        dist[at] = np.where(better, candidate, dist[at])
        high[at] = np.where(better, new_high, high[at])
        low[at] = np.where(better, new_low, low[at])


def barrier_distance(image: np.ndarray, rounds: int = 2) -> np.ndarray:
    """Minimum barrier distance of every pixel to the image border, per channel (H x W x C).

    The barrier of a path is max - min of the values along it: a pixel cut off from the
    border by a strong edge on every path is far. Approximated as in Zhang et al.'s fast
    raster scan, with down/up/right/left sweeps that update a whole row or column at once.
    """
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    dist = np.full(image.shape, np.inf, np.float32)
    for edge in ((0,), (-1,), (slice(None), 0), (slice(None), -1)):
        dist[edge] = 0
    high, low = image.copy(), image.copy()
    for _ in range(rounds):
        for axis in (0, 1):
            for reverse in (False, True):
                _sweep(image, dist, high, low, axis, reverse)
    return dist


def _boundary(lab: np.ndarray, blur: float, rounds: int) -> np.ndarray:
    smooth = cv2.GaussianBlur(lab, (0, 0), blur) if blur > 0 else lab
    return _normalise(barrier_distance(smooth, rounds).sum(axis=2))


def _border_colour(lab: np.ndarray, strip: float) -> np.ndarray:
    """Mahalanobis colour distance to each border strip, summed without the largest (the
    object may touch one side), after Zhang et al.'s boundary contrast map."""
    h, w = lab.shape[:2]
    ry, rx = max(1, round(h * strip)), max(1, round(w * strip))
    pixels = lab.reshape(-1, 3).astype(np.float64)
    maps = []
    for side in (lab[:ry], lab[-ry:], lab[:, :rx], lab[:, -rx:]):
        colours = side.reshape(-1, 3).astype(np.float64)
        inverse = np.linalg.inv(np.cov(colours, rowvar=False) + np.eye(3))  # + I: flat strips
        diff = pixels - colours.mean(axis=0)
        d = np.sqrt(np.einsum("ij,jk,ik->i", diff, inverse, diff))
        maps.append(d / max(d.max(), 1e-9))
    maps = np.stack(maps)
    return _normalise((maps.sum(axis=0) - maps.max(axis=0)).reshape(h, w))


def _colour_contrast(lab: np.ndarray) -> np.ndarray:
    """Global colour contrast (Cheng et al.'s histogram contrast): each colour's distance to
    all the image's colours, weighted by how often they occur."""
    codes = _colour_codes(lab).ravel()
    used, index, counts = np.unique(codes, return_inverse=True, return_counts=True)
    means = np.zeros((used.size, 3))
    np.add.at(means, index, lab.reshape(-1, 3))
    means /= counts[:, None]
    dists = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))
    contrast = dists @ (counts / counts.sum())
    return _normalise(contrast[index].reshape(lab.shape[:2]))


def centre_prior(h: int, w: int, sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """A Gaussian on the image centre (float32, 1 at the centre), sigma a fraction of each side."""
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
    return np.exp(-(ys[:, None] ** 2 + xs[None] ** 2) / (2 * sigma * sigma)).astype(np.float32)


def priors(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """The handcrafted prior maps at image size, float32 in [0, 1], high = salient:

    - boundary: minimum barrier distance to the image border (the background touches it),
    - border_colour: colour distance to the border strips,
    - contrast: global colour rarity,
    - centre: a Gaussian on the image centre (sigma `CENTRE_SIGMA` of each side).
    """
    rgb = _check(rgb)
    p = DEFAULTS
    h, w = rgb.shape[:2]
    lab = _lab_small(rgb, p["side"])
    small = {
        "boundary": _boundary(lab, p["blur"], p["rounds"]),
        "border_colour": _border_colour(lab, p["strip"]),
        "contrast": _colour_contrast(lab),
    }
    maps = {name: _upsample(m, h, w) for name, m in small.items()}
    maps["centre"] = centre_prior(h, w)
    return maps


# ------------------------------------------------------------------------------ fusion

def _colour_model(lab: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """P(object | colour) from Lab histograms of the object and background, weighted by the
    map: it spreads the map to the object's parts of the same colour and trims the rest."""
    codes = _colour_codes(lab).ravel()
    weight = fused.ravel().astype(np.float64)
    cells = int(codes.max()) + 1
    fg = np.bincount(codes, weight, cells) / max(weight.sum(), 1e-9)
    bg = np.bincount(codes, 1 - weight, cells) / max((1 - weight).sum(), 1e-9)
    posterior = fg / np.maximum(fg + bg, 1e-12)
    return posterior[codes].reshape(fused.shape).astype(np.float32)


def saliency(rgb: np.ndarray, **params) -> np.ndarray:
    """The fused saliency map, uint8 0..255 at the image size; `params` override `DEFAULTS`.

    boundary + border_colour, weighted to the centre, smoothed (opening, closing), mixed
    with a colour model of itself and sharpened by a sigmoid (as in Zhang et al.'s MB+).
    """
    rgb = _check(rgb)
    p = _params(params)
    h, w = rgb.shape[:2]
    lab = _lab_small(rgb, p["side"])
    fused = _boundary(lab, p["blur"], p["rounds"]) + p["border_colour"] * _border_colour(lab, p["strip"])
    if p["centre_sigma"] > 0:
        fused = fused * centre_prior(*fused.shape, p["centre_sigma"])
    fused = _normalise(fused)
    radius = round(p["smooth"] * max(fused.shape))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        fused = cv2.morphologyEx(cv2.morphologyEx(fused, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    if p["colour_mix"] > 0:
        fused = _normalise((1 - p["colour_mix"]) * fused + p["colour_mix"] * _colour_model(lab, fused))
    if p["gain"] > 0:
        fused = _normalise(1 / (1 + np.exp(-p["gain"] * (fused - 0.5))))
    return np.rint(_upsample(fused, h, w) * 255).astype(np.uint8)


def load_predictor(weights=None, device: str = "cpu"):
    """The tuned `saliency` as a callable rgb -> uint8 map; no weights, CPU whatever `device`."""
    if weights is not None:
        raise EpsError(f"{weights}: classical needs no weights")
    return saliency
