"""Training a saliency network (`eps train-saliency`): `usps` on a dataset's images alone,
`pfan` / `dss` on images + masks. Apart from `eps.saliency` so that extracting maps with a
method does not import the training code of every other one.
"""

from __future__ import annotations

from pathlib import Path

from eps.errors import EpsError
from eps.saliency import TRAINABLE, _device, list_images


def train(method: str, out, images=None, masks_dir=None, index_csv=None, split: str = "train",
          params=None, device: str = "auto", progress: bool = True) -> Path:
    """Train a saliency network: `usps` on images alone, `pfan` / `dss` on images + masks.

    Images come from a folder (`images`) or from the index of a workflow run (`index_csv`,
    `split`).
    """
    if method not in TRAINABLE:
        raise EpsError(f"--method: {method!r} cannot be trained; trainable: {list(TRAINABLE)}")
    dev = _device(device)
    if method == "usps":
        from eps.saliency import usps

        if index_csv is not None:
            from eps.data.index import read_index, split_rows

            paths = [str(p) for p in split_rows(read_index(index_csv), split)["image"]]
        else:
            paths = [str(p) for p in list_images(images)]
        return usps.train(paths, out, params, device=str(dev), progress=progress)
    if images is None or masks_dir is None:
        raise EpsError(f"--method {method}: needs --images DIR and --masks DIR (DUTS layout)")
    from eps.saliency import supervised

    return supervised.train(method, images, masks_dir, out, params or {}, device=str(dev), progress=progress)
