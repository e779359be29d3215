"""The HDF5 shards the stages pass on, and the steps that only turn one into another.

CAM shards (`write_cams` / `read_cams`: each image's per-scale maps at CAM resolution, summed
and normalised on reading), mask shards made from them by the official threshold rule
(`pseudo_masks`), their PNG export (`export_pngs`), and the saliency maps of the saliency
stage read by image id (`SaliencyStore`). Apart from CAM inference and training so that the
stages that only read shards (pseudo-masks, CRF, exports) neither load nor hash the networks'
code; torch is imported only where CAM parts are upsampled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eps.data.io import atomic_h5, open_h5, write_index_png
from eps.errors import EpsError


def upsample_sum(parts, size):
    """The official multi-scale sum: each scale's maps (torch (N, K, h, w)) upsampled (bilinear)
    to `size`, added in order: a torch tensor (N, K, *size)."""
    import torch
    import torch.nn.functional as F

    first = parts[0]
    if first.shape[1] == 0:
        return torch.zeros((first.shape[0], 0) + tuple(size), device=first.device)
    total = None
    for cam in parts:
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
        total = cam if total is None else total.add_(cam)
    return total


def normalised_maps(summed: np.ndarray, present: np.ndarray, background: bool):
    """Max-normalise the maps of the present classes (none for an unlabelled image) and the background map."""
    fg = summed[present]
    fg = fg / (fg.max(axis=(1, 2), keepdims=True) + 1e-5)
    if background:
        bg = summed[-1:] / max(summed[-1].max(), 1e-5)
        fg = np.concatenate([fg, bg], 0)
    return fg


def maps_from_parts(parts, size, background: bool) -> np.ndarray:
    """Full-size max-normalised maps (float32 (K, H, W)) from one image's per-scale parts."""
    import torch

    summed = upsample_sum([torch.from_numpy(np.ascontiguousarray(p))[None] for p in parts], size)[0].numpy()
    count = summed.shape[0] - int(background)
    return normalised_maps(summed, np.arange(count), background)


def write_cams(f, image_id: str, parts, present: np.ndarray, background: bool, size) -> None:
    """One image's maps into an open `eps.cams` shard: its per-scale maps side by side, float32.

    Dataset `f[image_id]` is (K, sum of h_s * w_s): scale s's (K, h_s, w_s) maps at CAM
    resolution, flattened, one scale after the other; attributes classes, background, size
    (H, W) and shapes (h_s, w_s per scale). `read_cams` gives the full-size normalised maps.
    The upsampled sum is a function of these maps, so keeping them instead of it is lossless
    and about 1/8 of the pixels at output stride 8. Byte shuffle + gzip 1.
    """
    parts = [np.asarray(p, np.float32) for p in parts]
    flat = np.concatenate([p.reshape(p.shape[0], p.shape[1] * p.shape[2]) for p in parts], axis=1)
    packed = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if flat.size else {}
    ds = f.create_dataset(image_id, data=flat, **packed)
    ds.attrs["classes"] = np.asarray(present).astype(np.int16)
    ds.attrs["background"] = bool(background)
    ds.attrs["size"] = np.asarray(size, np.int32)
    ds.attrs["shapes"] = np.asarray([p.shape[1:] for p in parts], np.int32).reshape(-1, 2)


def read_cams(shard, image_id: str):
    """`(maps, classes, background)` of one image of an open `eps.cams` shard (`write_cams`).

    maps: float32 (K, H, W) max-normalised, the present classes' (and the background's, last).
    """
    ds = shard[image_id]
    if "shapes" not in ds.attrs:
        raise EpsError(f"{shard.filename}: {image_id!r} is not a CAM entry of this eps version "
                       f"(rerun infer_cams)")
    where = f"{shard.filename}: CAM entry {image_id!r}"
    missing = [k for k in ("background", "size", "classes") if k not in ds.attrs]
    if missing:
        raise EpsError(f"{where}: attribute {missing[0]!r} missing (rerun infer_cams)")
    try:
        flat = ds[()]
    except OSError as exc:  # a damaged chunk: h5py cannot decompress it
        raise EpsError(f"{where}: data cannot be read, the file is damaged ({' '.join(str(exc).split())[:120]})") from None
    shapes = np.asarray(ds.attrs["shapes"]).reshape(-1, 2)
    classes = np.asarray(ds.attrs["classes"], np.int64).reshape(-1)
    background = bool(ds.attrs["background"])
    size = tuple(int(v) for v in np.asarray(ds.attrs["size"]).reshape(-1))
    rows = len(classes) + (1 if background else 0)
    if (flat.ndim != 2 or len(size) != 2 or flat.shape[1] != int((shapes[:, 0] * shapes[:, 1]).sum())
            or flat.shape[0] != rows):
        raise EpsError(f"{where}: attributes do not match its data {flat.shape} (shapes {shapes.tolist()}, "
                       f"{len(classes)} classes, size {list(size)}); rerun infer_cams")
    parts, start = [], 0
    for h, w in shapes:
        parts.append(flat[:, start:start + h * w].reshape(-1, h, w))
        start += h * w
    maps = maps_from_parts(parts, size, background)
    return maps, classes, background


def mask_from_maps(maps: np.ndarray, classes: np.ndarray, background: bool, bg_threshold: float) -> np.ndarray:
    """The official rule: background score = threshold, argmax over [threshold, class maps]."""
    fg = maps[:-1] if background else maps
    h, w = maps.shape[1:]
    scores = np.concatenate([np.full((1, h, w), bg_threshold, np.float32), fg.astype(np.float32)], 0)
    values = np.concatenate([[0], np.asarray(classes, np.int64) + 1]).astype(np.uint8)
    return values[np.argmax(scores, axis=0)]


def pseudo_masks(cams_shard, out, dataset: str, params: dict) -> Path:
    """Turn one CAM shard into a mask shard (uint8, 0 = background, 1..C = classes)."""
    with open_h5(cams_shard, "eps.cams", dataset) as src, atomic_h5(out, "eps.masks", dataset) as dst:
        for image_id in src.keys():
            maps, classes, background = read_cams(src, image_id)
            mask = mask_from_maps(maps, classes, background, params["bg_threshold"])
            dst.create_dataset(image_id, data=mask, compression="gzip", compression_opts=1)
    return Path(out)


def _is_png(name: str) -> bool:
    return name.endswith(".png")


def export_pngs(mask_shards, out_dir, dataset: str) -> Path:
    """Write every mask of the shards as a VOC-palette PNG `{id}.png` in `out_dir`.

    An existing `out_dir` is replaced only if an earlier export wrote it (eps.data.io.OWNER_FILE)
    and it holds nothing but PNGs; anything else is refused before any work.
    """
    import shutil

    from eps.data.io import check_replaceable, commit_output_dir, new_output_dir

    out_dir = Path(out_dir)
    check_replaceable(out_dir, "export-masks", _is_png)
    tmp = new_output_dir(out_dir)
    try:
        for shard in mask_shards:
            with open_h5(shard, "eps.masks", dataset) as f:
                for image_id in f.keys():
                    write_index_png(tmp / f"{image_id}.png", f[image_id][()])
        commit_output_dir(tmp, out_dir, "export-masks", _is_png)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class SaliencyStore:
    """Saliency maps by image id, read from the saliency stage's HDF5 shards (opened lazily per process)."""

    def __init__(self, shard_paths, dataset: str):
        self.dataset = dataset
        self.paths = [str(p) for p in shard_paths]
        self.where: dict[str, int] = {}
        for i, path in enumerate(self.paths):
            with open_h5(path, "eps.saliency", dataset) as f:
                for key in f.keys():
                    self.where[key] = i
        self._files: dict[int, object] = {}

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.where

    def get(self, image_id: str) -> np.ndarray:
        i = self.where[image_id]
        if i not in self._files:
            self._files[i] = open_h5(self.paths[i], "eps.saliency", self.dataset)
        return self._files[i][image_id][()]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
