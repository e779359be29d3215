"""Multi-scale + flip CAM inference of the official code (the CAM shards and the pseudo-mask
rule that reads them: `eps.shards`).

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

from eps.config import autocast_dtype, choose_device, set_threads
from eps.data.imagenet import MEAN, STD
from eps.data.index import labels_of, parse_scatteritem, read_classes, read_index, shard_rows, split_rows
from eps.data.io import atomic_h5, image_size, read_image
from eps.errors import EpsError
from eps.models.classifier import load_classifier
from eps.progress import progress
from eps.shards import upsample_sum, write_cams


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
    """uint8 (or 0..255 float) RGB (N, 3, H, W) -> float32 with ImageNet statistics (eps.data.imagenet.normalize)."""
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


def multiscale_cams(model, images: torch.Tensor, scales, flip: bool, background: bool, autocast=None,
                    channels=None) -> torch.Tensor:
    """Sum of class maps over scales (and flips) at input size: (N, K, H, W) float32 (`multiscale_parts`)."""
    parts = multiscale_parts(model, images, scales, flip, background, autocast, channels)
    return upsample_sum(parts, images.shape[-2:])


def prepare_model(model, device, autocast=None):
    """The classifier as inference runs it: on `device`, eval mode, channels-last weights.

    With `autocast` bfloat16 on a CPU the weights are stored in bfloat16 too, so autocast
    does not cast every weight again on every forward.
    """
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    if autocast == torch.bfloat16 and torch.device(device).type == "cpu":
        model = model.to(torch.bfloat16)
    return model


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
    model = prepare_model(model, device, autocast)

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
