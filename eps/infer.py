"""Multi-scale + flip CAM inference and the pseudo-mask rule of the official code.

CAM baseline: class maps of the labelled classes, rectified (ReLU, as the official
`resnet38_cls.forward_cam`) and summed over scales and flips.
EPS: softmax over the C+1 channels first, then the same sum. Both are max-normalised per
class; a pixel takes the class with the highest normalised map, or background where no map
exceeds the fixed background threshold (0.20 in the official code).

Images of the same size are batched together (with their flips) at every scale.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from eps.config import choose_device, set_threads
from eps.data.index import labels_of, parse_scatteritem, read_classes, read_index, shard_rows, split_rows
from eps.data.io import atomic_h5, open_h5, read_image, write_index_png
from eps.errors import EpsError
from eps.train import load_classifier, normalize


@torch.no_grad()
def multiscale_cams(model, images: torch.Tensor, scales, flip: bool, background: bool, amp: bool = False):
    """Sum of class maps over scales (and flips) at input size: (N, K, H, W) float32.

    `images` is a normalised batch (N, 3, H, W) of equal-size images.
    """
    n, _, h, w = images.shape
    total = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        with torch.autocast(device_type=x.device.type, enabled=amp):
            cam = model.forward_cam(x)
        cam = cam.float()
        # official: softmax for EPS; ReLU in the CAM baseline's forward_cam (a negative sum
        # would otherwise flip sign under max-normalisation)
        cam = F.softmax(cam, dim=1) if background else F.relu(cam)
        cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
        if flip:
            cam = cam[:n] + cam[n:].flip(-1)
        total = cam if total is None else total + cam
    return total


def normalised_maps(summed: np.ndarray, present: np.ndarray, background: bool):
    """Max-normalise the maps of the present classes (none for an unlabelled image) and the background map."""
    fg = summed[present]
    fg = fg / (fg.max(axis=(1, 2), keepdims=True) + 1e-5)
    if background:
        bg = summed[-1:] / max(summed[-1].max(), 1e-5)
        fg = np.concatenate([fg, bg], 0)
    return fg


def infer_cams(index_csv, classifier, out, split: str, scatteritem: str, params: dict) -> Path:
    """Write one shard of multi-scale CAMs (float16, present classes [+ background]) to `out`."""
    set_threads()
    index = read_index(index_csv)
    info = read_classes(index_csv)
    rows = shard_rows(split_rows(index, split), *parse_scatteritem(scatteritem))
    labels = labels_of(rows, len(info["classes"]))
    device = choose_device(params["device"])
    model, meta = load_classifier(classifier, device)
    if meta["num_classes"] != len(info["classes"]):
        raise EpsError(f"{classifier}: trained for {meta['num_classes']} classes, dataset has {len(info['classes'])}")
    background = bool(meta["background"])
    amp = bool(params["amp"]) and device.type == "cuda"

    images = {i: read_image(p) for i, p in zip(rows["id"], rows["image"])}
    by_size = defaultdict(list)
    for k, image_id in enumerate(rows["id"]):
        by_size[images[image_id].shape[:2]].append(k)
    ids = list(rows["id"])
    out = Path(out)
    with atomic_h5(out, "eps.cams", info["dataset"]) as f:
        bar = tqdm(total=len(ids), desc=f"cams {out.name}", mininterval=2)
        for _, members in sorted(by_size.items()):
            for b in range(0, len(members), int(params["batch_size"])):
                chunk = members[b:b + int(params["batch_size"])]
                batch = torch.from_numpy(np.stack([normalize(images[ids[k]]) for k in chunk])).to(device)
                summed = multiscale_cams(model, batch, params["scales"], params["flip"], background, amp)
                summed = summed.cpu().numpy()
                for j, k in enumerate(chunk):
                    present = np.flatnonzero(labels[k])
                    maps = normalised_maps(summed[j], present, background)
                    ds = f.create_dataset(ids[k], data=maps.astype(np.float16), compression="gzip", compression_opts=1)
                    ds.attrs["classes"] = present.astype(np.int16)
                    ds.attrs["background"] = background
                bar.update(len(chunk))
        bar.close()
    return out


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
            ds = src[image_id]
            mask = mask_from_maps(ds[()], ds.attrs["classes"], bool(ds.attrs["background"]), params["bg_threshold"])
            dst.create_dataset(image_id, data=mask, compression="gzip", compression_opts=1)
    return Path(out)


def export_pngs(mask_shards, out_dir, dataset: str) -> Path:
    """Write every mask of the shards as a VOC-palette PNG `{id}.png` in `out_dir`."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for shard in mask_shards:
            with open_h5(shard, "eps.masks", dataset) as f:
                for image_id in f.keys():
                    write_index_png(tmp / f"{image_id}.png", f[image_id][()])
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
