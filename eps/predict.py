"""Prediction with a trained segmenter (`eps predict`): the softmax averaged over ``scales``
and horizontal flips at image size, argmax -> an ``eps.masks`` shard; optionally refined by
the dense CRF of ``eps.crf`` (a second shard), and written as index PNGs in the layout of the
PASCAL VOC evaluation server (``results/VOC2012/Segmentation/comp6_test_cls/{id}.png``).
Apart from training (``eps.segment``, ``eps.training``): the two stages rerun for different code.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eps.config import choose_device, set_threads
from eps.data.imagenet import normalize
from eps.data.index import parse_scatteritem, read_classes, read_index, shard_rows, split_rows
from eps.data.io import atomic_h5, image_size, read_image, read_index_png, write_index_png
from eps.errors import EpsError
from eps.models.deeplab import load_segmenter
from eps.progress import progress

SERVER_SUBDIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"

PREDICT_DEFAULTS = {
    "split": "val",  # workflow: the split predicted and evaluated
    "test_split": None,  # workflow: a split without labels written in the VOC server layout
    "scales": [0.75, 1.0, 1.25],
    "flip": True,
    "crf": False,  # also write CRF-refined predictions (the crf block's kernel)
    "batch_size": 8,
    "device": "auto",
    "amp": False,
}


@torch.no_grad()
def multiscale_probs(model, images: torch.Tensor, scales, flip: bool, amp: bool = False) -> torch.Tensor:
    """Softmax averaged over scales (and flips) at input size: (N, K, H, W) float32."""
    n, _, h, w = images.shape
    total = None
    count = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        with torch.autocast(device_type=x.device.type, enabled=amp):
            logits = model(x)
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        prob = F.softmax(logits, dim=1)
        if flip:
            prob = prob[:n] + prob[n:].flip(-1)
        total = prob if total is None else total + prob
        count += 2 if flip else 1
    return total / count


def _crf_job(job):
    from eps.crf import refine_probs

    image, probs, crf_params = job
    return refine_probs(image, probs, crf_params)


def server_dir(root) -> Path:
    """Where the VOC evaluation server expects the test predictions under `root`."""
    return Path(root) / SERVER_SUBDIR


def predict(index_csv, model_path, out, split: str, scatteritem: str, params: dict, *,
            crf_params: dict | None = None, crf_out=None, server_layout=None, workers: int = 1) -> Path:
    """Predict one shard of a split: an ``eps.masks`` shard at `out` (argmax of the averaged softmax).

    With `crf_params` and `crf_out`, also a shard of CRF-refined masks. With `server_layout`,
    the final masks (CRF-refined if requested) are also written as index PNGs under
    ``server_layout/results/VOC2012/Segmentation/comp6_test_cls/{id}.png``. Prints the shard's
    mIoU where the index has ground truth.
    """
    from eps.crf import check_scale, kernel_params, parallel_map
    from eps.metrics import confusion, miou

    set_threads()
    if (crf_params is None) != (crf_out is None):
        raise EpsError("predict: --crf and --crf-out go together")
    if crf_params is not None:
        kernel_params(crf_params)
        check_scale(crf_params)
    index = read_index(index_csv)
    info = read_classes(index_csv)
    rows = shard_rows(split_rows(index, split), *parse_scatteritem(scatteritem))
    device = choose_device(params["device"])
    model, meta = load_segmenter(model_path, device)
    if meta["num_classes"] != len(info["classes"]) + 1:
        raise EpsError(f"{model_path}: trained for {meta['num_classes']} classes with background, "
                       f"the dataset has {len(info['classes']) + 1}")
    amp = bool(params["amp"]) and device.type == "cuda"
    n = meta["num_classes"]
    ids = list(rows["id"])
    files = dict(zip(rows["id"], rows["image"]))  # read a batch at a time: memory flat in the shard's size
    gts = dict(zip(rows["id"], rows["mask"]))
    by_size = defaultdict(list)
    for k, image_id in enumerate(ids):
        by_size[image_size(files[image_id])].append(k)

    hist = np.zeros((n, n), np.int64)
    hist_crf = np.zeros((n, n), np.int64)
    has_gt = 0
    results: dict[str, tuple] = {}
    out = Path(out)
    step = int(params["batch_size"])
    bar = progress(total=len(ids), desc=f"predict {out.name}", mininterval=2)
    for _, members in sorted(by_size.items()):
        for b in range(0, len(members), step):
            chunk = [ids[k] for k in members[b:b + step]]
            images = {i: read_image(files[i]) for i in chunk}
            batch = torch.from_numpy(np.stack([normalize(images[i]) for i in chunk])).to(device)
            probs = multiscale_probs(model, batch, params["scales"], params["flip"], amp).cpu().numpy()
            masks = probs.argmax(axis=1).astype(np.uint8)
            refined = [None] * len(chunk)
            if crf_params is not None:
                jobs = [(images[i], probs[j], crf_params) for j, i in enumerate(chunk)]
                refined = list(parallel_map(_crf_job, jobs, min(workers, len(jobs))))
            for j, i in enumerate(chunk):
                results[i] = (masks[j], refined[j])
                if gts[i]:
                    gt = read_index_png(gts[i])
                    if gt.shape != masks[j].shape:
                        raise EpsError(f"{gts[i]}: ground truth size differs from its image")
                    has_gt += 1
                    hist += confusion(gt, masks[j], n)
                    if refined[j] is not None:
                        hist_crf += confusion(gt, refined[j], n)
            bar.update(len(chunk))
    bar.close()
    with atomic_h5(out, "eps.masks", info["dataset"]) as f:
        for i in ids:
            f.create_dataset(i, data=results[i][0], compression="gzip", compression_opts=1)
    if crf_out is not None:
        with atomic_h5(crf_out, "eps.masks", info["dataset"]) as f:
            for i in ids:
                f.create_dataset(i, data=results[i][1], compression="gzip", compression_opts=1)
    if server_layout is not None:
        target = server_dir(server_layout)
        for i in ids:
            final = results[i][1] if results[i][1] is not None else results[i][0]
            write_index_png(target / f"{i}.png", final)
    if has_gt:
        line = f"{out.name}: mIoU {100 * miou(hist):.2f} over {has_gt} images with ground truth"
        if crf_params is not None:
            line += f"; with CRF {100 * miou(hist_crf):.2f}"
        print(line, flush=True)
    return out
