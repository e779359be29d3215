"""Saliency stage: one HDF5 shard of uint8 saliency maps (H x W, image size) per job.

Methods: `precomputed` (a folder of PNGs, as the official EPS release distributes them).
"""

from __future__ import annotations

from pathlib import Path

from eps.data.index import parse_scatteritem, read_classes, read_index, shard_rows
from eps.data.io import atomic_h5
from eps.errors import EpsError

METHODS = ("precomputed",)


def extract_shard(index_csv, method: str, scatteritem: str, out, strict: bool = False) -> Path:
    """Write the saliency maps of one shard of all indexed images to `out`."""
    if method not in METHODS:
        raise EpsError(f"saliency.method: unknown method {method!r}; available: {list(METHODS)}")
    from eps.saliency.precomputed import load_map

    index = read_index(index_csv)
    dataset = read_classes(index_csv)["dataset"]
    rows = shard_rows(index, *parse_scatteritem(scatteritem))
    with atomic_h5(out, "eps.saliency", dataset) as f:
        f.attrs["method"] = method
        for image_id, image, sal in zip(rows["id"], rows["image"], rows["saliency"]):
            f.create_dataset(image_id, data=load_map(image_id, image, sal, strict), compression="gzip", compression_opts=1)
    return Path(out)
