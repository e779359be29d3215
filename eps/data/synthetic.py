"""The synthetic co-occurrence world: the project's default, CPU-sized dataset.

It reproduces the problem EPS addresses ("Railroad is not a Train"): every foreground
class comes with a context "stuff" region (the rail under the train, the water under the
boat, ...) that appears in most images of that class, so a classifier trained with image
labels alone spreads its CAM onto the context; and every object carries a small, very
discriminative mark (the train's red-white front panel, the bird's orange beak, ...), so
the CAM peaks on the mark and misses the object's extent. An imitation saliency map gives
the object extent with the typical errors of an off-the-shelf detector (soft edges, one
class it systematically misses, spurious blobs, noise).

The dataset is written in VOC layout (see `generate`), deterministically: the same
parameters and seed give byte-identical files. Image `i` of a split depends only on
`(seed, split, i)` and the parameters, not on how many images are generated.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from eps.data.io import check_replaceable, commit_output_dir, new_output_dir, write_gray_png, write_index_png, write_rgb
from eps.errors import EpsError

FORMAT = "eps.synthetic"
VERSION = 1

# name, body colour (RGB), mark colour, context name, context kind (geometry)
CLASSES = ("train", "boat", "bird", "cow", "plane")
CONTEXTS = ("rail", "water", "branch", "grass", "sky")
_BODY_RGB = {
    "train": (70, 95, 170),  # blue
    "boat": (205, 178, 140),  # tan
    "bird": (62, 58, 96),  # dark slate
    "cow": (150, 118, 92),  # brown, with dark spots
    "plane": (188, 192, 198),  # light grey
}
_MARK_RGB = {
    "train": (235, 20, 20),  # red, striped with white
    "boat": (240, 0, 240),  # magenta flag
    "bird": (255, 140, 0),  # orange beak
    "cow": (250, 225, 0),  # yellow, checkered with black
    "plane": (0, 230, 240),  # cyan tail fin
}
# height / width of each class's bounding box
_ASPECT = {"train": 0.42, "boat": 0.8, "bird": 0.62, "cow": 0.7, "plane": 0.78}


@dataclass(frozen=True)
class SynthConfig:
    """Generation parameters of the synthetic world (all recorded in meta.json)."""

    num_train: int = 400
    num_val: int = 100
    size: int = 96
    seed: int = 0
    num_classes: int = 5
    cooccurrence: float = 0.9
    context_without: float = 0.05
    max_objects: int = 3
    max_classes_per_image: int = 2
    min_scale: float = 0.2
    max_scale: float = 0.48
    min_visible: int = 16
    clutter: tuple = (3, 8)
    missed_class: object = -1
    missed_has_context: bool = False
    stuff_to_border: bool = True
    sal_miss_rate: float = 0.7
    sal_miss_rate_alone: object = None
    sal_blur: float = 0.02
    sal_level: tuple = (0.75, 1.0)
    sal_missed_level: tuple = (0.0, 0.12)
    sal_drop_prob: float = 0.05
    sal_context: float = 0.1
    sal_spurious_prob: float = 0.3
    sal_noise: float = 0.03
    jpeg_quality: int = 95


# --------------------------------------------------------------------------- validation


def _check_config(cfg: SynthConfig) -> SynthConfig:
    def bad(key, problem):
        return EpsError(f"{key}: {problem}")

    for key in ("num_train", "num_val", "size", "seed", "num_classes", "max_objects",
                "max_classes_per_image", "min_visible", "jpeg_quality"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise bad(key, f"must be an integer, got {value!r}")
    if cfg.num_train < 0 or cfg.num_val < 0 or cfg.num_train + cfg.num_val == 0:
        raise bad("num_train", "num_train and num_val must be >= 0 and not both 0")
    if cfg.size < 32:
        raise bad("size", f"must be at least 32 pixels, got {cfg.size}")
    if cfg.seed < 0:
        raise bad("seed", f"must be >= 0, got {cfg.seed}")
    if not 1 <= cfg.num_classes <= len(CLASSES):
        raise bad("num_classes", f"must be in 1..{len(CLASSES)}, got {cfg.num_classes}")
    if cfg.max_objects < 1:
        raise bad("max_objects", f"must be >= 1, got {cfg.max_objects}")
    if cfg.max_classes_per_image < 1:
        raise bad("max_classes_per_image", f"must be >= 1, got {cfg.max_classes_per_image}")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise bad("jpeg_quality", f"must be in 1..100, got {cfg.jpeg_quality}")
    for key in ("cooccurrence", "context_without", "sal_drop_prob", "sal_miss_rate", "sal_spurious_prob",
                "sal_context", "sal_noise", "sal_blur", "sal_miss_rate_alone"):
        value = getattr(cfg, key)
        if key == "sal_miss_rate_alone" and value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise bad(key, f"must be a number in [0, 1], got {value!r}")
    if not 0.05 <= cfg.min_scale <= cfg.max_scale <= 0.9:
        raise bad("min_scale", f"need 0.05 <= min_scale <= max_scale <= 0.9, "
                  f"got {cfg.min_scale} and {cfg.max_scale}")
    pairs = {"clutter": (0, 1000), "sal_level": (0, 1), "sal_missed_level": (0, 1)}
    cast = {}
    for key, (lo, hi) in pairs.items():
        value = getattr(cfg, key)
        try:
            a, b = (float(v) for v in value)
        except (TypeError, ValueError):
            raise bad(key, f"must be a pair [low, high], got {value!r}") from None
        if not lo <= a <= b <= hi:
            raise bad(key, f"need {lo} <= low <= high <= {hi}, got {value!r}")
        cast[key] = (int(a), int(b)) if key == "clutter" else (a, b)
    names = CLASSES[: cfg.num_classes]
    missed = cfg.missed_class
    if missed is None or (isinstance(missed, str) and missed.lower() in ("", "none")):
        missed = None
    elif isinstance(missed, str):
        if missed not in names:
            raise bad("missed_class", f"unknown class {missed!r} (classes: {', '.join(names)})")
    elif isinstance(missed, (int, np.integer)) and not isinstance(missed, bool):
        if not -cfg.num_classes <= missed < cfg.num_classes:
            raise bad("missed_class", f"class index {missed} out of range for "
                      f"{cfg.num_classes} classes")
        missed = names[missed]
    else:
        raise bad("missed_class", f"must be a class name, a class index or null, got {missed!r}")
    return dataclasses.replace(cfg, missed_class=missed, **cast)


# --------------------------------------------------------------------------- drawing


def _poly(shape, pts) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    pts = np.round(np.asarray(pts, np.float64) * 8).astype(np.int32)
    cv2.fillPoly(m, [pts], 1, cv2.LINE_8, 3)
    return m.astype(bool)


def _ellipse(shape, cx, cy, ax, ay, angle=0.0) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, (int(round(cx * 8)), int(round(cy * 8))),
                (max(1, int(round(ax * 8))), max(1, int(round(ay * 8)))),
                float(angle), 0, 360, 1, -1, cv2.LINE_8, 3)
    return m.astype(bool)


def _rect(shape, x0, y0, x1, y1) -> np.ndarray:
    return _poly(shape, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _wobbly_rect(shape, rng, x0, y0, x1, y1, amp, edges="tblr", steps=8) -> np.ndarray:
    """A rectangle whose listed edges (t, b, l, r) wobble by up to `amp` pixels."""
    def edge(p, q, normal, wob):
        t = np.linspace(0.0, 1.0, steps + 1)[:-1]
        off = rng.uniform(-amp, amp, size=t.shape) if wob else np.zeros_like(t)
        off[0] = 0.0
        return [(p[0] + (q[0] - p[0]) * s + normal[0] * o, p[1] + (q[1] - p[1]) * s + normal[1] * o)
                for s, o in zip(t, off)]
    pts = (edge((x0, y0), (x1, y0), (0, 1), "t" in edges)
           + edge((x1, y0), (x1, y1), (1, 0), "r" in edges)
           + edge((x1, y1), (x0, y1), (0, 1), "b" in edges)
           + edge((x0, y1), (x0, y0), (1, 0), "l" in edges))
    return _poly(shape, pts)


def _low_freq(rng, size, cells, channels=3) -> np.ndarray:
    """Smooth noise in about [-1, 1] of shape (size, size, channels)."""
    grid = rng.normal(0.0, 1.0, size=(cells, cells, channels)).astype(np.float32)
    out = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255.0


def _dull_colour(rng) -> np.ndarray:
    """A low-saturation colour: the background, the clutter (never a class mark colour)."""
    return _hsv(rng.uniform(0, 1), rng.uniform(0.03, 0.3), rng.uniform(0.28, 0.78))


def _background(rng, size, cfg) -> np.ndarray:
    img = np.empty((size, size, 3), np.float32)
    img[:] = _dull_colour(rng)
    cells = int(rng.integers(3, 7))
    img += 26.0 * _low_freq(rng, size, cells, 1) + 8.0 * _low_freq(rng, size, cells, 3)
    shape = (size, size)
    lo, hi = cfg.clutter
    for _ in range(int(rng.integers(lo, hi + 1))):
        kind = int(rng.integers(0, 4))
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.04, 0.22) * size
        if kind == 0:
            m = _ellipse(shape, cx, cy, r, r * rng.uniform(0.4, 1.0), rng.uniform(0, 180))
        elif kind == 1:
            m = _rect(shape, cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r * rng.uniform(0.3, 1))
        elif kind == 2:
            ang = rng.uniform(0, 2 * np.pi, 3)
            m = _poly(shape, np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1))
        else:
            m = np.zeros(shape, np.uint8)
            x2, y2 = rng.uniform(0, size, 2)
            cv2.line(m, (int(cx), int(cy)), (int(x2), int(y2)), 1, int(rng.integers(1, 4)))
            m = m.astype(bool)
        colour = _dull_colour(rng)
        img[m] = colour + rng.normal(0, 6, size=(int(m.sum()), 3)).astype(np.float32)
    img += rng.normal(0, 7, size=img.shape).astype(np.float32)
    return img


# ----------------------------------------------------------------- objects (body + mark)


def _object_masks(name, shape, box, flip):
    """Body and mark masks of one object in box (x0, y0, w, h); flip mirrors left-right."""
    x0, y0, w, h = box

    def X(u):  # u in [0, 1] across the box, mirrored when flipped
        return x0 + (1.0 - u if flip else u) * w

    def Y(v):
        return y0 + v * h

    if name == "train":  # long rectangle, red-white striped front panel
        body = _rect(shape, X(0.0), Y(0.08), X(1.0), Y(1.0)) if not flip else \
            _rect(shape, X(1.0), Y(0.08), X(0.0), Y(1.0))
        body |= _poly(shape, [(X(0.6), Y(0.0)), (X(0.8), Y(0.0)), (X(0.8), Y(0.1)), (X(0.6), Y(0.1))])
        mark = _poly(shape, [(X(0.8), Y(0.15)), (X(1.0), Y(0.15)), (X(1.0), Y(0.85)), (X(0.8), Y(0.85))])
    elif name == "boat":  # trapezoid hull + triangular sail, magenta flag on the mast
        body = _poly(shape, [(X(0.0), Y(0.62)), (X(1.0), Y(0.62)), (X(0.82), Y(1.0)), (X(0.18), Y(1.0))])
        body |= _poly(shape, [(X(0.5), Y(0.12)), (X(0.5), Y(0.6)), (X(0.88), Y(0.6))])
        body |= _poly(shape, [(X(0.44), Y(0.12)), (X(0.5), Y(0.12)), (X(0.5), Y(0.62)), (X(0.44), Y(0.62))])
        mark = _poly(shape, [(X(0.2), Y(0.0)), (X(0.47), Y(0.0)), (X(0.47), Y(0.2)), (X(0.2), Y(0.2))])
    elif name == "bird":  # ellipse body + round head + tail, orange beak
        body = _ellipse(shape, X(0.42), Y(0.6), 0.3 * w, 0.27 * h, -15 if not flip else 15)
        body |= _ellipse(shape, X(0.72), Y(0.3), 0.14 * w, 0.2 * h)
        body |= _poly(shape, [(X(0.16), Y(0.55)), (X(0.0), Y(0.42)), (X(0.0), Y(0.8))])
        mark = _poly(shape, [(X(0.83), Y(0.17)), (X(1.0), Y(0.3)), (X(0.83), Y(0.45))])
    elif name == "cow":  # body + legs + head, yellow-black checkered head patch
        body = _rect(shape, X(0.02), Y(0.18), X(0.75), Y(0.68)) if not flip else \
            _rect(shape, X(0.75), Y(0.18), X(0.02), Y(0.68))
        for u in (0.05, 0.2, 0.55, 0.68):
            lo, hi = sorted((X(u), X(u + 0.08)))
            body |= _rect(shape, lo, Y(0.6), hi, Y(1.0))
        lo, hi = sorted((X(0.7), X(0.8)))
        body |= _rect(shape, lo, Y(0.12), hi, Y(0.45))
        lo, hi = sorted((X(0.78), X(1.0)))
        mark = _rect(shape, lo, Y(0.0), hi, Y(0.36))
    elif name == "plane":  # fuselage + swept wings + nose, cyan tail fin
        body = _poly(shape, [(X(0.08), Y(0.44)), (X(0.86), Y(0.44)), (X(1.0), Y(0.52)),
                             (X(0.86), Y(0.6)), (X(0.08), Y(0.6))])
        body |= _poly(shape, [(X(0.58), Y(0.5)), (X(0.38), Y(1.0)), (X(0.28), Y(1.0)), (X(0.4), Y(0.5))])
        body |= _poly(shape, [(X(0.58), Y(0.5)), (X(0.42), Y(0.1)), (X(0.32), Y(0.1)), (X(0.4), Y(0.5))])
        mark = _poly(shape, [(X(0.0), Y(0.1)), (X(0.1), Y(0.1)), (X(0.2), Y(0.46)), (X(0.04), Y(0.5))])
    else:  # pragma: no cover - guarded by num_classes
        raise ValueError(name)
    return body & ~mark, mark


def _paint_object(img, rng, name, body, mark, box, size):
    x0, y0, w, h = box
    base = np.array(_BODY_RGB[name], np.float32) + rng.uniform(-22, 22, 3).astype(np.float32)
    shade = 14.0 * _low_freq(rng, size, 5, 1)
    tex = base + shade + rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
    if name == "cow":  # dark spots on the body
        for _ in range(int(rng.integers(2, 5))):
            spot = _ellipse(body.shape, x0 + rng.uniform(0.1, 0.7) * w, y0 + rng.uniform(0.25, 0.6) * h,
                            rng.uniform(0.06, 0.13) * w, rng.uniform(0.08, 0.15) * h)
            tex[spot] = tex[spot] * 0.4
    elif name == "train":  # a row of dark windows
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        period = max(3.0, 0.14 * w)
        win = ((xx - x0) % period < period * 0.55) & (yy > y0 + 0.25 * h) & (yy < y0 + 0.5 * h)
        tex[win] = tex[win] * 0.55
    img[body] = tex[body]

    colour = np.array(_MARK_RGB[name], np.float32)
    mtex = np.broadcast_to(colour, img.shape).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    cell = max(2, int(round(0.06 * w)))
    if name == "train":  # white diagonal stripes
        stripes = ((xx + yy) // cell) % 2 == 1
        mtex[stripes] = (245, 245, 245)
    elif name == "cow":  # black checker
        checker = ((xx // cell) + (yy // cell)) % 2 == 1
        mtex[checker] = (15, 15, 15)
    mtex += rng.normal(0, 5, size=mtex.shape).astype(np.float32)
    img[mark] = mtex[mark]


# ----------------------------------------------------------------- context stuff regions


def _context_region(rng, kind, shape, box, to_border=False):
    """Mask of the context stuff of kind `kind` for an object (real or phantom) at box.

    `to_border`: ground-like stuff runs out of the frame, as in photographs (the rail, the
    water, the grass and the branch across the whole width, water and grass down to the bottom
    edge), so a bottom-up saliency detector sees it as background.
    """
    x0, y0, w, h = box
    x1, y1 = x0 + w, y0 + h
    size = shape[1]
    if to_border and kind in ("rail", "water", "grass"):
        bottom = {"rail": y1 + rng.uniform(0.6, 0.95) * h}.get(kind, size + 1)
        top = {"rail": y1 - 0.08 * h, "water": y0 + 0.72 * h, "grass": y1 - 0.25 * h}[kind]
        if kind == "rail":
            return _rect(shape, -1, top, size + 1, bottom)
        amp, steps = (0.05 * h, 8) if kind == "water" else (0.08 * h, 12)
        return _wobbly_rect(shape, rng, -1, top, size + 1, bottom, amp=amp, edges="t", steps=steps)
    if kind == "rail":  # straight band under the train
        a, b = rng.uniform(0.25, 0.7), rng.uniform(0.6, 0.95)
        return _rect(shape, x0 - a * w, y1 - 0.08 * h, x1 + a * w, y1 + b * h)
    if kind == "water":  # wavy-topped band the hull sits in
        a, b = rng.uniform(0.3, 0.8), rng.uniform(0.25, 0.5)
        return _wobbly_rect(shape, rng, x0 - a * w, y0 + 0.72 * h, x1 + a * w, y1 + b * h,
                            amp=0.05 * h, edges="tlr")
    if kind == "grass":  # jagged-topped region the legs stand in
        a, b = rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.6)
        return _wobbly_rect(shape, rng, x0 - a * w, y1 - 0.25 * h, x1 + a * w, y1 + b * h,
                            amp=0.08 * h, edges="tblr", steps=12)
    if kind == "branch":  # thick slanted bar under the bird, plus a twig
        a = rng.uniform(0.3, 0.7)
        t = rng.uniform(0.14, 0.24) * h
        slope = rng.uniform(-0.25, 0.25) * h
        ya, yb = y1 - 0.1 * h - slope, y1 - 0.1 * h + slope
        left, right = x0 - a * w, x1 + a * w
        if to_border:  # across the whole frame, on the same line
            slope_px = (yb - ya) / (right - left)
            ya, yb = ya - slope_px * (left + 1), yb + slope_px * (size + 1 - right)
            left, right = -1.0, size + 1.0
        m = _poly(shape, [(left, ya), (right, yb), (right, yb + t), (left, ya + t)])
        tx = x0 + rng.uniform(-0.3, 0.2) * w
        m |= _poly(shape, [(tx, y1), (tx - 0.3 * w, y1 + 0.5 * h), (tx - 0.3 * w + 0.4 * t, y1 + 0.5 * h),
                           (tx + 0.4 * t, y1)])
        return m
    if kind == "sky":  # a region of sky behind the plane
        a, b = rng.uniform(0.15, 0.45), rng.uniform(0.15, 0.45)
        return _wobbly_rect(shape, rng, x0 - a * w, y0 - b * h, x1 + a * w, y1 + b * h,
                            amp=0.08 * min(w, h), edges="tblr")
    raise ValueError(kind)  # pragma: no cover


def _paint_context(img, rng, kind, m, box, size):
    x0, y0, w, h = box
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = rng.normal(0, 1, size=(size, size, 3)).astype(np.float32)
    if kind == "rail":
        tex = np.array((125, 115, 105), np.float32) + 18 * noise
        period = max(3.0, 0.12 * w)
        sleepers = (xx - x0) % period < period * 0.4
        tex[sleepers] = (100, 85, 70) + 6 * noise[sleepers]
        ytop = y0 + 0.92 * h
        band = max(1.0, 0.05 * w)
        for frac in (0.3, 0.7):
            ry = ytop + frac * max(3.0, 0.7 * h)
            rails = np.abs(yy - ry) < band / 2 + 0.5
            tex[rails] = (165, 162, 160) + 6 * noise[rails]
    elif kind == "water":
        tex = np.array((35, 85, 165), np.float32) + 8 * noise
        waves = np.sin(yy * 1.3 + 0.8 * np.sin(xx * 0.35 + rng.uniform(0, 6))) > 0.7
        tex[waves] = (90, 140, 210) + 8 * noise[waves]
    elif kind == "grass":
        tex = np.array((55, 135, 45), np.float32) + 10 * noise
        tex[..., 1] += 25 * noise[..., 1]
    elif kind == "branch":
        tex = np.array((95, 65, 35), np.float32) + 7 * noise
        bark = (np.sin(xx * 1.7 + yy * 0.4) > 0.6)
        tex[bark] *= 0.8
    elif kind == "sky":
        grad = ((yy / size) * 35.0)[..., None]
        tex = np.array((145, 190, 238), np.float32) + grad + 4 * noise
    else:  # pragma: no cover
        raise ValueError(kind)
    img[m] = tex[m]


# ----------------------------------------------------------------------- one image


def _overlap(a, b) -> float:
    """Intersection over the smaller area of boxes (x0, y0, x1, y1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / max(small, 1e-6)


def _extent(kind, box):
    """A rough bounding box of object + context (for placement)."""
    x0, y0, w, h = box
    if kind == "sky":
        return (x0 - 0.3 * w, y0 - 0.3 * h, x0 + 1.3 * w, y0 + 1.3 * h)
    if kind == "rail":
        return (x0 - 0.2 * w, y0, x0 + 1.2 * w, y0 + 1.6 * h)
    return (x0 - 0.2 * w, y0, x0 + 1.2 * w, y0 + 1.4 * h)


def _place(rng, cfg, names, placed):
    """Sample a box for class `names` avoiding heavy overlap with the boxes placed so far."""
    size = cfg.size
    best, best_score = None, None
    for attempt in range(40):
        shrink = 1.0 - 0.5 * attempt / 40
        scale = rng.uniform(cfg.min_scale, max(cfg.min_scale, cfg.max_scale * shrink))
        w = scale * size
        h = _ASPECT[names[0]] * w
        kind = names[1]
        below = {"sky": 0.0, "rail": 0.5 * h}.get(kind, 0.3 * h)  # room for the stuff under it
        x0 = rng.uniform(0, size - w)
        y0 = rng.uniform(0, max(0.0, size - h - below))
        box = (x0, y0, w, h)
        ext = _extent(kind, box)
        score = max([_overlap(ext, e) for e in placed], default=0.0)
        if best_score is None or score < best_score:
            best, best_score = box, score
        if score < 0.12:
            break
    return best


def _sample_image(rng, cfg, names, contexts, missed):
    """Render one image. Returns (rgb uint8, seg uint8, ctx uint8, sal uint8, labels list)."""
    size, C = cfg.size, len(names)
    shape = (size, size)
    n_cls = int(rng.integers(1, min(cfg.max_classes_per_image, C, cfg.max_objects) + 1))
    present = sorted(int(c) for c in rng.choice(C, size=n_cls, replace=False))
    n_obj = int(rng.integers(n_cls, max(n_cls, cfg.max_objects) + 1))
    obj_cls = present + [int(c) for c in rng.choice(present, size=n_obj - n_cls)]
    with_ctx = {c: bool(rng.random() < cfg.cooccurrence) for c in present}
    if not cfg.missed_has_context:
        with_ctx = {c: w and names[c] != missed for c, w in with_ctx.items()}

    placed, objects = [], []
    for c in obj_cls:
        box = _place(rng, cfg, (names[c], contexts[c]), placed)
        placed.append(_extent(contexts[c], box))
        objects.append((c, box, bool(rng.random() < 0.5)))
    # larger objects first, so small ones are not hidden behind them
    objects.sort(key=lambda o: -o[1][2])

    # context regions: distractors (context without its class) first, then the attached ones;
    # sky (behind everything) before the ground-like kinds
    regions = []
    for k in range(C):
        if k not in present and rng.random() < cfg.context_without:
            w = rng.uniform(cfg.min_scale, cfg.max_scale) * size
            h = _ASPECT[names[k]] * w
            box = (rng.uniform(0, size - w), rng.uniform(0, size - h), w, h)
            regions.append((0, k, box))
    for c, box, _ in objects:
        if with_ctx[c]:
            regions.append((1, c, box))
    regions.sort(key=lambda r: (r[0], contexts[r[1]] != "sky"))

    img = _background(rng, size, cfg)
    ctx = np.zeros(shape, np.uint8)
    for _, k, box in regions:
        m = _context_region(rng, contexts[k], shape, box, cfg.stuff_to_border)
        _paint_context(img, rng, contexts[k], m, box, size)
        ctx[m] = k + 1

    inst = np.full(shape, -1, np.int16)
    for i, (c, box, flip) in enumerate(objects):
        body, mark = _object_masks(names[c], shape, box, flip)
        _paint_object(img, rng, names[c], body, mark, box, size)
        inst[body | mark] = i

    seg = np.zeros(shape, np.uint8)
    for i, (c, _, _) in enumerate(objects):
        seg[inst == i] = c + 1
    labels = []
    for c in range(C):
        n = int((seg == c + 1).sum())
        if n >= cfg.min_visible:
            labels.append(c)
        elif n:
            seg[seg == c + 1] = 255  # too few visible pixels to count as present: void
    ctx[inst >= 0] = 0

    # imitation saliency: what an off-the-shelf detector would output
    sal = np.zeros(shape, np.float32)
    ctx_level = rng.uniform(0, cfg.sal_context)
    sal[ctx > 0] = ctx_level
    miss_rate = cfg.sal_miss_rate
    if cfg.sal_miss_rate_alone is not None and len(labels) == 1:
        miss_rate = cfg.sal_miss_rate_alone
    for i, (c, _, _) in enumerate(objects):
        if names[c] == missed and rng.random() < miss_rate:
            level = rng.uniform(*cfg.sal_missed_level)
        elif rng.random() < cfg.sal_drop_prob:
            level = rng.uniform(0.2, 0.5)
        else:
            level = rng.uniform(*cfg.sal_level)
        sal[inst == i] = level
    sigma = max(0.5, cfg.sal_blur * size)
    sal = cv2.GaussianBlur(sal, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    if rng.random() < cfg.sal_spurious_prob:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(0.04, 0.12) * size
            amp = rng.uniform(0.3, 0.7)
            blob = amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            sal = np.maximum(sal, blob.astype(np.float32))
    sal += rng.normal(0, cfg.sal_noise, size=shape).astype(np.float32)
    sal = np.round(np.clip(sal, 0, 1) * 255).astype(np.uint8)

    rgb = np.round(np.clip(img, 0, 255)).astype(np.uint8)
    return rgb, seg, ctx, sal, labels


# ------------------------------------------------------------------------- generation


def _image_rng(seed: int, split: str, i: int) -> np.random.Generator:
    code = {"train": 1, "val": 2}[split]
    return np.random.default_rng([seed, code, i])


def _ids(split: str, n: int) -> list[str]:
    width = max(5, len(str(max(n - 1, 0))))
    return [f"syn_{split}_{i:0{width}d}" for i in range(n)]


def generate(out_dir, config: SynthConfig | None = None, *, overwrite: bool = False, **params) -> dict:
    """Generate the synthetic co-occurrence world into `out_dir` (VOC layout); return meta.

    Parameters (keywords, or fields of a `SynthConfig` passed as `config`; keywords win):

    - num_train=400, num_val=100: images per split.
    - size=96: image side in pixels (square images, >= 32).
    - seed=0: everything is derived from it; same seed -> byte-identical files.
    - num_classes=5: C, the first C of train, boat, bird, cow, plane.
    - cooccurrence=0.9: probability that a class present in an image comes with its context
      (train-rail, boat-water, bird-branch, cow-grass, plane-sky).
    - context_without=0.05: probability, per absent class, that its context appears anyway.
    - max_objects=3, max_classes_per_image=2: 1..max_objects objects of
      1..max_classes_per_image classes per image.
    - min_scale=0.2, max_scale=0.48: object width as a fraction of `size`.
    - min_visible=16: a class counts as present (image label) only with at least this many
      visible pixels; smaller visible fragments are marked void (255) in the mask.
    - clutter=(3, 8): range of the number of dull background shapes.
    - missed_class=-1: the class the imitation saliency detector systematically misses
      (name, 0-based index, negative index, or None for no such class); -1 = the last class.
    - missed_has_context=False: whether the missed class keeps its context region. Off by
      default, so the co-occurrence confusion of the configured pairs measures co-occurrence,
      and saliency misses are measured separately (the missed class's own IoU).
    - stuff_to_border=True: ground-like context (rail, water, grass, branch) runs across the
      whole frame as in photographs, so a real bottom-up detector (`classical`) treats it as
      background; False gives the short context regions of earlier versions.
    - sal_blur=0.02: Gaussian sigma of the saliency soft edges, as a fraction of `size`.
    - sal_level=(0.75, 1.0): saliency level range on objects.
    - sal_missed_level=(0.0, 0.12): saliency level range on objects of the missed class.
    - sal_miss_rate=0.7: fraction of the missed class's objects the detector misses (real
      detectors miss a hard class most of the time, not always).
    - sal_miss_rate_alone=None: the missed class's miss rate in images without another class
      (None = `sal_miss_rate`). A detector that highlights the dominant object misses the
      hard class mostly when something more salient is in the picture.
    - sal_drop_prob=0.05: probability that another object is partly missed (level 0.2-0.5).
    - sal_context=0.1: upper bound of the (low) saliency level on context stuff.
    - sal_spurious_prob=0.3: probability of 1-2 spurious saliency blobs in an image.
    - sal_noise=0.03: standard deviation of the saliency noise (0..1 scale).
    - jpeg_quality=95.
    - overwrite=False: replace an existing `out_dir` that an earlier `generate` wrote (else an
      existing one is an error); a folder eps did not write is never replaced.

    Layout written under `out_dir` (ids `syn_train_00042`, `syn_val_00007`):

    - `JPEGImages/{id}.jpg`: RGB.
    - `SegmentationClass/{id}.png`: VOC-palette index PNG, 0 background, 1..C classes,
      255 void (only for tiny visible fragments).
    - `ContextClass/{id}.png`: index PNG, 0 none, k = context kind k (1-based, `contexts[k-1]`),
      only where no object covers it.
    - `SALImages/{id}.png`: uint8 gray imitation saliency map.
    - `ImageSets/Segmentation/train.txt`, `val.txt`: the ids of each split.
    - `cls_labels.npy`: dict id -> float32 multi-hot of length C (`np.load(...,
      allow_pickle=True).item()`), equal to the classes present in the mask.
    - `meta.json`: format, version, classes, contexts (1-based in ContextClass), pairs
      [[context, class], ...], missed_class, params, split sizes and realised statistics.

    Everything is written into a temporary directory beside `out_dir`, renamed when
    complete: a failure leaves no `out_dir` (and no temporary directory) behind.
    """
    base = config if config is not None else SynthConfig()
    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise EpsError(f"{unknown[0]}: unknown synthetic-dataset parameter "
                       f"(known: {', '.join(sorted(fields))})")
    cfg = _check_config(dataclasses.replace(base, **params))

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise EpsError(f"{out_dir}: already exists (remove it, or pass overwrite=True)")
    # overwrite replaces only a world eps synth wrote itself (eps.data.io.OWNER_FILE), never a
    # folder of the user's; a temporary folder left by a killed run is removed when it is old.
    _adopt_earlier_world(out_dir)
    check_replaceable(out_dir, "synth", _is_world_entry)
    _remove_stale_tmp(out_dir)
    tmp = new_output_dir(out_dir)
    try:
        meta = _write_dataset(tmp, cfg)
        commit_output_dir(tmp, out_dir, "synth", _is_world_entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


WORLD_ENTRIES = {"JPEGImages", "SegmentationClass", "ContextClass", "SALImages", "ImageSets",
                 "cls_labels.npy", "meta.json"}


def _is_world_entry(name: str) -> bool:
    return name in WORLD_ENTRIES


def _adopt_earlier_world(out_dir: Path) -> None:
    """A world of an eps version before the owner marker: its meta.json says what wrote it."""
    from eps.data.io import OWNER_FILE

    meta = out_dir / "meta.json"
    if out_dir.is_dir() and not (out_dir / OWNER_FILE).exists() and meta.is_file():
        try:
            written_by_synth = json.loads(meta.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            written_by_synth = False
        if written_by_synth:
            (out_dir / OWNER_FILE).write_text("synth\n")


def _remove_stale_tmp(out_dir: Path, age_s: float = 3600.0) -> None:
    """Remove `.NAME.tmp-*` folders of killed runs (older than `age_s`, so a concurrent run keeps its own)."""
    import time

    if not out_dir.parent.is_dir():
        return
    for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            if old.is_dir() and time.time() - old.stat().st_mtime > age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _write_dataset(root: Path, cfg: SynthConfig) -> dict:
    C = cfg.num_classes
    names = list(CLASSES[:C])
    contexts = list(CONTEXTS[:C])
    for sub in ("JPEGImages", "SegmentationClass", "ContextClass", "SALImages", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    cls_labels = {}
    stats = {}
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        ids = _ids(split, n)
        with_cls = np.zeros(C, np.int64)
        with_both = np.zeros(C, np.int64)
        ctx_alone = np.zeros(C, np.int64)
        for i, image_id in enumerate(ids):
            rng = _image_rng(cfg.seed, split, i)
            while True:  # an image must carry at least one label (almost always the first try)
                rgb, seg, ctx, sal, labels = _sample_image(rng, cfg, names, contexts, cfg.missed_class)
                if labels:
                    break
            write_rgb(root / "JPEGImages" / f"{image_id}.jpg", rgb, quality=cfg.jpeg_quality)
            write_index_png(root / "SegmentationClass" / f"{image_id}.png", seg)
            write_index_png(root / "ContextClass" / f"{image_id}.png", ctx)
            write_gray_png(root / "SALImages" / f"{image_id}.png", sal)
            onehot = np.zeros(C, np.float32)
            onehot[labels] = 1.0
            cls_labels[image_id] = onehot
            has_ctx = np.array([(ctx == k + 1).any() for k in range(C)])
            with_cls += onehot.astype(bool)
            with_both += onehot.astype(bool) & has_ctx
            ctx_alone += ~onehot.astype(bool) & has_ctx
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{x}\n" for x in ids))
        stats[split] = {
            "images": n,
            "images_with_class": {names[c]: int(with_cls[c]) for c in range(C)},
            "cooccurrence": {names[c]: (round(float(with_both[c] / with_cls[c]), 4)
                                        if with_cls[c] else None) for c in range(C)},
            "context_without_class": {contexts[c]: (round(float(ctx_alone[c] / (n - with_cls[c])), 4)
                                                    if n - with_cls[c] else None) for c in range(C)},
        }

    np.save(root / "cls_labels.npy", cls_labels, allow_pickle=True)
    params = dataclasses.asdict(cfg)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "classes": names,
        "contexts": contexts,
        "pairs": [[contexts[c], names[c]] for c in range(C)
                  if cfg.missed_has_context or names[c] != cfg.missed_class],
        "missed_class": cfg.missed_class,
        "params": params,
        "splits": {"train": cfg.num_train, "val": cfg.num_val},
        "stats": stats,
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
