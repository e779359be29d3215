"""ImageNet mean and std: the input normalisation of every ImageNet-style network of eps
(the classifiers, the segmenters, the saliency detectors), in one place."""

from __future__ import annotations

import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(MEAN, np.float32)
_STD = np.asarray(STD, np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (3, H, W) with ImageNet statistics, as the official code."""
    return ((image.astype(np.float32) / 255.0 - _MEAN) / _STD).transpose(2, 0, 1)
