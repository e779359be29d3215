"""Multi-scale + flip CAM inference and the pseudo-mask rule of the official code.

CAM baseline: class maps of the labelled classes, rectified (ReLU, as the official
`resnet38_cls.forward_cam`) and summed over scales and flips.
EPS: softmax over the C+1 channels first, then the same sum. Both are max-normalised per
class; a pixel takes the class with the highest normalised map, or background where no map
exceeds the fixed background threshold (0.20 in the official code).

Images of the same size are batched together (with their flips) at every scale. The stage
resizes the uint8 pixels as the official code does (PIL bicubic, antialiased when shrinking:
`resize_pixels`), then normalises; the network runs in channels-last memory format under
`torch.inference_mode`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from eps.progress import progress

from eps.config import autocast_dtype, choose_device, set_threads
from eps.data.index import labels_of, parse_scatteritem, read_classes, read_index, shard_rows, split_rows
from eps.data.io import atomic_h5, image_size, open_h5, read_image, write_index_png
from eps.errors import EpsError
from eps.train import MEAN, STD, load_classifier


def resize_pixels(pixels: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resize of uint8 RGB pixels (N, 3, H, W), as the official `PIL.Image.resize(BICUBIC)`.

    On CPU this is torch's uint8 antialiased bicubic, PIL's own filter (a = -0.5, support
    widened when shrinking, rounding and clipping to uint8 after each pass): it agrees with
    PIL to at most one grey level. Other devices have no uint8 kernel: the same filter in
    float32, rounded and clipped once (within a few grey levels of PIL). Returns the
    input's dtype (float32 0..255 off CPU).
    """
    size = tuple(int(v) for v in size)
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    if pixels.device.type == "cpu" and pixels.dtype == torch.uint8:
        return F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    out = F.interpolate(pixels.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) RGB (N, 3, H, W) -> float32 with ImageNet statistics (eps.train.normalize)."""
    mean = torch.as_tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.as_tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    # in place on the one new tensor: each fresh large tensor costs page faults on CPU
    return pixels.float().div_(255.0).sub_(mean).div_(std)


# On CPU one forward takes at most this many input pixels (images x height x width): a
# larger batch leaves the caches and runs slower per image (the small backbone: 1.7x slower
# at 8 images of 320x240 with their flips than one at a time), while parts of this size
# still reuse ResNet-38's weights well. None: no limit. GPUs take the whole batch.
CPU_FORWARD_PIXELS = 2 ** 19


def _forward_parts(x: torch.Tensor):
    """`x` split along the batch into parts of at most CPU_FORWARD_PIXELS input pixels (CPU only)."""
    per_image = x.shape[-2] * x.shape[-1]
    if x.device.type != "cpu" or CPU_FORWARD_PIXELS is None or x.shape[0] * per_image <= CPU_FORWARD_PIXELS:
        return [x]
    return list(x.split(max(1, CPU_FORWARD_PIXELS // per_image), 0))


@torch.inference_mode()
def multiscale_parts(model, images: torch.Tensor, scales, flip: bool, background: bool, autocast=None,
                     channels=None) -> list:
    """Class maps at each scale, at CAM resolution: one (N, K, h_s, w_s) float32 tensor per scale.

    Each is the softmax (EPS) or ReLU (CAM baseline) map of the images plus that of their
    flips, flipped back. `upsample_sum` turns them into the official full-size sum.

    `images` is a batch (N, 3, H, W) of equal-size images: uint8 RGB pixels, resized as the
    official code does (`resize_pixels`) and then normalised, or an already normalised float
    batch, resized on the tensor (torch bicubic).

    `channels` (indices into the K maps): only these are kept, in this
    order, and the results have len(channels) maps; the softmax still spans all K.
    `autocast` (a dtype, `eps.config.autocast_dtype`): the forward under autocast to it.
    """
    n, _, h, w = images.shape
    pixels = images.dtype == torch.uint8
    keep = None if channels is None else torch.as_tensor(list(channels), dtype=torch.long, device=images.device)
    if keep is not None and keep.numel() == 0:  # nothing to compute (unlabelled CAM-baseline images)
        return [torch.zeros((n, 0, 1, 1), device=images.device) for _ in scales]
    parts = []
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        if pixels:
            x = normalize_pixels(resize_pixels(images, size))
        else:
            x = images if size == (h, w) else F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        # the images and their flips in one channels-last batch (oneDNN / cuDNN's fast layout:
        # 1.2x on CPU for ResNet-38), written once
        batch = torch.empty((2 * n if flip else n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                            memory_format=torch.channels_last)
        batch[:n] = x
        if flip:
            batch[n:] = x.flip(-1)
        with torch.autocast(device_type=x.device.type, dtype=autocast, enabled=autocast is not None):
            pieces = _forward_parts(batch)
            cam = model.forward_cam(batch) if len(pieces) == 1 else torch.cat([model.forward_cam(q) for q in pieces], 0)
        cam = cam.float().contiguous()  # softmax over channels runs 2x faster on NCHW than channels-last
        # official: softmax for EPS; ReLU in the CAM baseline's forward_cam (a negative sum
        # would otherwise flip sign under max-normalisation)
        cam = F.softmax(cam, dim=1) if background else F.relu(cam)
        if keep is not None:
            cam = cam.index_select(1, keep)
        if flip:
            # the official code upsamples each flip, flips back and adds; bilinear upsampling
            # is linear and commutes with the horizontal flip (its sampling grid is symmetric),
            # so adding at CAM resolution gives the same sum with half the upsampling
            cam = cam[:n] + cam[n:].flip(-1)
        parts.append(cam.contiguous())
    return parts


def upsample_sum(parts, size) -> torch.Tensor:
    """The official multi-scale sum: each scale's maps upsampled (bilinear) to `size`, added in order."""
    first = parts[0]
    if first.shape[1] == 0:
        return torch.zeros((first.shape[0], 0) + tuple(size), device=first.device)
    total = None
    for cam in parts:
        cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
        total = cam if total is None else total.add_(cam)
    return total


def multiscale_cams(model, images: torch.Tensor, scales, flip: bool, background: bool, autocast=None,
                    channels=None) -> torch.Tensor:
    """Sum of class maps over scales (and flips) at input size: (N, K, H, W) float32 (`multiscale_parts`)."""
    parts = multiscale_parts(model, images, scales, flip, background, autocast, channels)
    return upsample_sum(parts, images.shape[-2:])


def normalised_maps(summed: np.ndarray, present: np.ndarray, background: bool):
    """Max-normalise the maps of the present classes (none for an unlabelled image) and the background map."""
    fg = summed[present]
    fg = fg / (fg.max(axis=(1, 2), keepdims=True) + 1e-5)
    if background:
        bg = summed[-1:] / max(summed[-1].max(), 1e-5)
        fg = np.concatenate([fg, bg], 0)
    return fg


def prepare_model(model, device):
    """The classifier as inference runs it: on `device`, eval mode, channels-last weights."""
    return model.to(device).eval().to(memory_format=torch.channels_last)


def iter_cam_parts(model, images, labels, params: dict, background: bool, device, autocast=None,
                   keep_background: bool = True, sizes=None):
    """Yield `(k, parts, present)` for every image `images[k]` (uint8 RGB (H, W, 3), or its file:
    read a batch at a time, so a shard's memory does not grow with its images), in batch order.

    Images of equal size are batched (`params["batch_size"]` at a time, with their flips);
    `parts` are the image's per-scale maps at CAM resolution (`multiscale_parts`, float32
    numpy (K, h_s, w_s)) of the labelled classes `present` (0-based, from the multi-hot
    `labels[k]`) and, with `background` (the model has a background channel) and
    `keep_background`, the background map last. `sizes`: the images' (H, W), when the caller
    has them (else read from the arrays or the file headers).
    """
    keep = background and keep_background
    by_size = defaultdict(list)
    if sizes is None:
        sizes = [image.shape[:2] if isinstance(image, np.ndarray) else image_size(image) for image in images]
    for k, size in enumerate(sizes):
        by_size[tuple(size)].append(k)
    batch_size = int(params["batch_size"])
    for _, members in sorted(by_size.items()):
        for b in range(0, len(members), batch_size):
            chunk = members[b:b + batch_size]
            # (N, H, W, 3) uint8 viewed as (N, 3, H, W): channels-last, no copy
            batch = [images[k] if isinstance(images[k], np.ndarray) else read_image(images[k]) for k in chunk]
            pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            # only the maps the shard keeps: the labelled classes of the batch (and the
            # background map, last)
            wanted = sorted({int(c) for k in chunk for c in np.flatnonzero(labels[k])})
            if keep:
                wanted.append(int(labels.shape[1]))
            parts = [p.cpu().numpy() for p in multiscale_parts(model, pixels.to(device), params["scales"],
                                                                 params["flip"], background, autocast, channels=wanted)]
            where = {c: i for i, c in enumerate(wanted)}
            for j, k in enumerate(chunk):
                present = np.flatnonzero(labels[k])
                local = [where[int(c)] for c in present] + ([len(wanted) - 1] if keep else [])
                yield k, [p[j, local] for p in parts], present


def maps_from_parts(parts, size, background: bool) -> np.ndarray:
    """Full-size max-normalised maps (float32 (K, H, W)) from one image's per-scale parts."""
    summed = upsample_sum([torch.from_numpy(np.ascontiguousarray(p))[None] for p in parts], size)[0].numpy()
    count = summed.shape[0] - int(background)
    return normalised_maps(summed, np.arange(count), background)


def infer_cams(index_csv, classifier, out, split: str, scatteritem: str, params: dict) -> Path:
    """Write one shard of multi-scale CAMs (per-scale maps of the present classes [+ background]) to `out`.

    The EPS background map is left out unless `keep_background`: the pseudo-mask rule and the
    CRF score the background by a threshold (as the official code does), so it is never read.
    """
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
    autocast = autocast_dtype(params["precision"], device, "infer.precision", bool(params["amp"]))
    model = prepare_model(model, device)

    ids = list(rows["id"])
    images = list(rows["image"])  # files: read a batch at a time by iter_cam_parts
    sizes = [image_size(p) for p in images]
    out = Path(out)
    with atomic_h5(out, "eps.cams", info["dataset"]) as f:
        with progress(total=len(ids), desc=f"cams {out.name}", mininterval=2) as bar:
            keep = background and bool(params["keep_background"])
            for k, parts, present in iter_cam_parts(model, images, labels, params, background, device, autocast, keep,
                                                    sizes):
                write_cams(f, ids[k], parts, present, keep, sizes[k])
                bar.update(1)
    return out


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
