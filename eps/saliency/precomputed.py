"""Precomputed saliency: PNG maps made elsewhere (the official release ships them this way)."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
from PIL import Image

from eps.data.io import read_saliency
from eps.errors import EpsError, file_error


def load_map(image_id: str, image_path: str, saliency_path, strict: bool = False) -> np.ndarray:
    """The uint8 saliency map of one image, at the image's size.

    A map of another size is resized (bilinear) with a warning, or rejected in strict mode.
    """
    if not isinstance(saliency_path, str) or not saliency_path:
        raise EpsError(f"{image_path}: no saliency map indexed for image {image_id!r}")
    sal = read_saliency(saliency_path)
    try:
        with Image.open(image_path) as img:  # the header is enough: the size
            width, height = img.size
    except FileNotFoundError:
        raise file_error(image_path, "file not found") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise file_error(image_path, f"cannot decode image ({type(exc).__name__}: {exc})") from None
    if sal.shape != (height, width):
        problem = f"saliency map is {sal.shape[1]}x{sal.shape[0]}, image is {width}x{height}"
        if strict:
            raise EpsError(f"{saliency_path}: {problem}")
        warnings.warn(f"{saliency_path}: {problem}; resized")
        sal = cv2.resize(sal, (width, height), interpolation=cv2.INTER_LINEAR)
    return sal
