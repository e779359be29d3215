"""Multi-scale + flip CAM inference: eps's stage path against the official per-image loop.

Both paths get the same image files, the same image-level labels and the same weights
(a seeded random initialisation: speed and agreement do not depend on training), and both
end in pseudo-masks (background threshold 0.20, argmax):

- official (a re-creation of halbielee/EPS ``infer.py``, ``predict_cam`` + ``infer_cam_mp``):
  per image, PIL bicubic resize of the uint8 image per scale, normalisation in numpy, one
  forward per scale and per flip (batch of 1), softmax (EPS) and bilinear upsampling per
  forward, numpy flips, ``np.sum`` over the 8 maps, max-normalisation, a (21, H, W) score
  tensor with the threshold in channel 0, argmax. Nothing is written to disk.
- eps (``eps.infer``: ``prepare_model``, ``iter_cam_parts``; ``eps.shards``: ``write_cams``, ``pseudo_masks``):
  images read with ``read_image``, equal-size images batched with their flips per scale,
  each scale's maps written to an HDF5 shard at CAM resolution (float32, gzip), then the
  pseudo-mask stage reads that shard (upsampling and summing the scales) and writes the
  mask shard. Its disk writes are inside the timing.

Figures: images/s of each path (median of interleaved repeats), the speed-up, and the
agreement of the final pseudo-masks (share of equal pixels over all images).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the checkout first on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

NUM_CLASSES = 20
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ inputs

def make_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[tuple[str, Path, np.ndarray]]:
    """`count` JPEG files in `folder`: real VOC photos from ../shared when present (else a
    seeded synthetic scene), half landscape W x H, half portrait H x W, as VOC mixes them.
    Returns (id, path, 20-dim multi-hot label) per image; every image has at least one label."""
    rng = np.random.default_rng(seed)
    shared = _common.shared_dir()
    sources, labels = [], {}
    if shared is not None:
        voc = shared / "data" / "voc12_sample"
        listing = voc / "ImageSets" / "Segmentation" / "clean.txt"
        if listing.is_file():
            ids = listing.read_text().split()
            ids += [i for i in (voc / "ImageSets" / "Segmentation" / "boxed.txt").read_text().split() if i not in ids]
            sources = [(i, voc / "JPEGImages" / f"{i}.jpg") for i in ids if (voc / "JPEGImages" / f"{i}.jpg").is_file()]
        npy = shared / "data" / "voc12_masks" / "metadata" / "cls_labels.npy"
        if npy.is_file():
            labels = np.load(npy, allow_pickle=True).item()
    out = []
    for k in range(count):
        w, h = size if k % 2 == 0 else size[::-1]
        if k < len(sources):
            image_id, src = sources[k]
            with Image.open(src) as img:
                img = img.convert("RGB").resize((w, h), Image.LANCZOS)
        else:
            image_id = f"synthetic_{k:03d}"
            img = Image.fromarray(synthetic_scene(rng, h, w))
        label = np.asarray(labels.get(image_id, np.zeros(NUM_CLASSES)), np.float32)
        if label.sum() == 0:  # the official loop needs a labelled class (it indexes the first map)
            label = np.zeros(NUM_CLASSES, np.float32)
            label[rng.choice(NUM_CLASSES, size=int(rng.integers(1, 3)), replace=False)] = 1
        path = folder / f"{image_id}.jpg"
        img.save(path, quality=95)
        out.append((image_id, path, label))
    return out


def synthetic_scene(rng, h: int, w: int) -> np.ndarray:
    """A smooth background with a few coloured ellipses (natural-image-like statistics)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([rng.uniform(40, 200) + rng.uniform(-40, 40) * (xx / w) + rng.uniform(-40, 40) * (yy / h)
                    for _ in range(3)], -1)
    for _ in range(3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 8, h / 3), rng.uniform(w / 8, w / 3)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ official path

def official_transform(img: Image.Image) -> np.ndarray:
    """``Compose([np.asarray, Normalize(), HWC_to_CHW])`` of the official code (psa resnet38d)."""
    arr = np.asarray(img)
    out = np.empty_like(arr, np.float32)
    for c in range(3):
        out[..., c] = (arr[..., c] / 255.0 - MEAN[c]) / STD[c]
    return np.transpose(out, (2, 0, 1))  # a view, as HWC_to_CHW: not contiguous


def official_preprocess(image: Image.Image, scales) -> list[np.ndarray]:
    """Per scale: PIL bicubic resize of the uint8 image, transform, then the numpy flip."""
    w, h = image.size
    scaled = [official_transform(image.resize((round(w * s), round(h * s)), resample=Image.BICUBIC))
              for s in scales]
    out = []
    for x in scaled:
        out.append(x)
        out.append(np.flip(x, -1).copy())
    return out


def official_predict_cam(model, image: Image.Image, label: np.ndarray, scales, device, background: bool):
    size = np.asarray(image).shape[:2]
    cams = []
    for i, x in enumerate(official_preprocess(image, scales)):
        with torch.no_grad():
            x = torch.from_numpy(x).unsqueeze(0).to(device)
            cam = model.forward_cam(x)
            if background:
                cam = F.softmax(cam, dim=1)
                cam = F.interpolate(cam, size, mode="bilinear", align_corners=False)[0]
                fg = cam[:-1].cpu().numpy() * label.reshape(NUM_CLASSES, 1, 1)
                bg = cam[-1:].cpu().numpy()
                if i % 2 == 1:
                    fg, bg = np.flip(fg, axis=-1), np.flip(bg, axis=-1)
                cams.append((fg, bg))
            else:
                cam = F.relu(cam)  # resnet38_cls.forward_cam rectifies its maps
                cam = F.interpolate(cam, size, mode="bilinear", align_corners=False)[0]
                cam = cam.cpu().numpy() * label.reshape(NUM_CLASSES, 1, 1)
                if i % 2 == 1:
                    cam = np.flip(cam, axis=-1)
                cams.append(cam)
    return cams


def official_masks(model, items, scales, device, background: bool, thr: float) -> dict:
    """The per-image loop of ``infer_cam_mp``: id -> (pseudo-mask, {class: normalised map})."""
    model.eval()
    out = {}
    for image_id, path, label in items:
        img = Image.open(path).convert("RGB")
        cams = official_predict_cam(model, img, label, scales, device, background)
        if background:
            # the official np.array of (fg, bg) tuples: an object array on NumPy >= 1.24
            sum_cam = np.sum(np.array(cams, dtype=object)[:, 0], axis=0)
        else:
            sum_cam = np.sum(cams, axis=0)
        norm_cam = sum_cam / (np.max(sum_cam, (1, 2), keepdims=True) + 1e-5)
        cam_dict = {j: norm_cam[j] for j in range(NUM_CLASSES) if label[j] > 1e-5}
        h, w = list(cam_dict.values())[0].shape
        tensor = np.zeros((NUM_CLASSES + 1, h, w), np.float32)
        for key, value in cam_dict.items():
            tensor[key + 1] = value
        tensor[0, :, :] = thr
        out[image_id] = (np.argmax(tensor, axis=0).astype(np.uint8), cam_dict)
    return out


# ------------------------------------------------------------------------------ eps path

def eps_masks(model, items, params: dict, device, background: bool, thr: float, work: Path) -> dict:
    """eps.infer's stage path: read images, batched multi-scale CAMs -> HDF5 shard -> mask shard.

    Returns the two shard paths; `read_eps` reads them back, outside the timing."""
    from eps.config import autocast_dtype
    from eps.data.io import atomic_h5, read_image
    from eps.infer import iter_cam_parts
    from eps.shards import pseudo_masks, write_cams

    ids = [i for i, _, _ in items]
    images = [read_image(p) for _, p, _ in items]
    labels = np.stack([lab for _, _, lab in items])
    cams_path, masks_path = work / "cams.h5", work / "masks.h5"
    autocast = autocast_dtype(params.get("precision", "float32"), device, "infer.precision", bool(params["amp"]))
    with atomic_h5(cams_path, "eps.cams", "bench") as f:
        for k, parts, present in iter_cam_parts(model, images, labels, params, background, device, autocast,
                                                keep_background=False):
            write_cams(f, ids[k], parts, present, False, images[k].shape[:2])
    pseudo_masks(cams_path, masks_path, "bench", {"bg_threshold": thr})
    return {"cams": cams_path, "masks": masks_path}


def read_eps(run: dict) -> dict:
    """id -> (mask from the mask shard, {class: normalised map read back from the CAM shard})."""
    from eps.data.io import open_h5
    from eps.shards import read_cams

    out = {}
    with open_h5(run["masks"], "eps.masks", "bench") as fm, open_h5(run["cams"], "eps.cams", "bench") as fc:
        for image_id in fm.keys():
            maps, classes, _ = read_cams(fc, image_id)
            out[image_id] = (fm[image_id][()], {int(c): maps[i] for i, c in enumerate(classes)})
    return out


def tensor_resize_masks(model, items, params: dict, device, background: bool, thr: float) -> dict:
    """eps's earlier resize (torch bicubic on the normalised float tensor), for the agreement figure."""
    from eps.data.io import read_image
    from eps.data.imagenet import normalize
    from eps.infer import multiscale_cams
    from eps.shards import mask_from_maps, normalised_maps

    out = {}
    for image_id, path, label in items:
        x = torch.from_numpy(normalize(read_image(path)))[None].to(device)
        summed = multiscale_cams(model, x, params["scales"], params["flip"], background).cpu().numpy()[0]
        present = np.flatnonzero(label)
        maps = normalised_maps(summed, present, background)
        out[image_id] = mask_from_maps(maps, present, background, thr)
    return out


# ------------------------------------------------------------------------------ run

def agreement(a: dict, b: dict) -> tuple[float, float]:
    """(share of equal pixels over all images, lowest per-image share)."""
    equal = total = 0
    worst = 1.0
    for k in a:
        ma, mb = (a[k][0] if isinstance(a[k], tuple) else a[k]), (b[k][0] if isinstance(b[k], tuple) else b[k])
        same = int(np.count_nonzero(ma == mb))
        equal += same
        total += ma.size
        worst = min(worst, same / ma.size)
    return equal / total, worst


def run_backbone(backbone: str, args, work: Path) -> dict:
    from eps.infer import prepare_model
    from eps.models import build_classifier

    device = torch.device(args.device)
    background = args.loss == "eps"
    n_images, size, repeats = args.images, args.size, args.repeats
    if backbone == "small":
        n_images, size, repeats = args.small_images, args.small_size, args.small_repeats
    folder = work / backbone / "images"
    folder.mkdir(parents=True)
    items = make_images(folder, n_images, size, args.seed)

    torch.manual_seed(args.seed)
    official_model = build_classifier(backbone, NUM_CLASSES, background=background).eval().to(device)
    eps_model = prepare_model(copy.deepcopy(official_model), device)  # the same weights
    params = {"scales": args.scales, "flip": True, "batch_size": args.batch_size, "amp": args.amp}

    results = {}

    def official():
        results["official"] = official_masks(official_model, items, args.scales, device, background, args.thr)

    def eps():
        results["eps"] = eps_masks(eps_model, items, params, device, background, args.thr, work / backbone)

    if not args.no_warmup:  # untimed: one landscape and one portrait image through both paths
        # (oneDNN picks and caches its kernels per input shape on first use)
        official_masks(official_model, items[:2], args.scales, device, background, args.thr)
        eps_masks(eps_model, items[:2], params, device, background, args.thr, work / backbone)
    times = _common.interleaved({"official": official, "eps": eps}, repeats, device=args.device, warmup=False)
    t_off, t_eps = _common.median(times["official"]), _common.median(times["eps"])
    off, got = results["official"], read_eps(results["eps"])
    agree, worst = agreement(off, got)
    map_diff = max(float(np.abs(off[k][1][c] - got[k][1][c]).max()) for k in off for c in off[k][1])
    fg = np.mean([np.count_nonzero(m[0]) / m[0].size for m in off.values()])
    classes = sorted({int(v) for m in off.values() for v in np.unique(m[0])})
    shapes = sorted({Image.open(p).size for _, p, _ in items})
    print(f"[{backbone}] {len(items)} images, sizes (WxH) {shapes}, scales {args.scales} + flips, "
          f"loss {args.loss}, batch {args.batch_size}, device {args.device}{' amp' if args.amp else ''}")
    print(f"[{backbone}] official loop: {fmt_rate(len(items), times['official'])}")
    print(f"[{backbone}] eps:           {fmt_rate(len(items), times['eps'])}")
    print(f"[{backbone}] speed-up {t_off / t_eps:.2f}x (median over median; best over best "
          f"{min(times['official']) / min(times['eps']):.2f}x)")
    print(f"[{backbone}] mask agreement {100 * agree:.4f}% (lowest image {100 * worst:.3f}%), "
          f"masks and maps read back from eps's shards")
    print(f"[{backbone}] max |normalised map difference|: {map_diff:.2e}; official masks: {100 * fg:.1f}% "
          f"foreground, values {classes}")
    row = {"backbone": backbone, "speedup": t_off / t_eps, "agreement": agree,
           "eps_ips": len(items) / t_eps, "official_ips": len(items) / t_off}
    if args.compare_tensor_resize:
        prev = tensor_resize_masks(eps_model, items, params, device, background, args.thr)
        a_prev, w_prev = agreement(results["official"], prev)
        print(f"[{backbone}] agreement if eps resized the normalised tensor (torch bicubic, no antialias): "
              f"{100 * a_prev:.4f}% (lowest image {100 * w_prev:.3f}%)")
    return row


def fmt_rate(n: int, times) -> str:
    return f"{n / _common.median(times):.3f} images/s ({_common.fmt_times(times)} for {n} images)"


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="resnet38,small", help="comma-separated: resnet38, small")
    p.add_argument("--images", type=int, default=4, help="ResNet-38 images")
    p.add_argument("--size", type=parse_size, default=(160, 120), help="ResNet-38 image size WxH (half are HxW)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (ResNet-38)")
    p.add_argument("--small-images", type=int, default=8)
    p.add_argument("--small-size", type=parse_size, default=(320, 240))
    p.add_argument("--small-repeats", type=int, default=5)
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    p.add_argument("--batch-size", type=int, default=8, help="eps: images per batch (official: 1)")
    p.add_argument("--loss", choices=["eps", "cam"], default="eps", help="EPS (C+1, softmax) or CAM baseline")
    p.add_argument("--thr", type=float, default=0.20, help="background threshold")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", action="store_true", help="eps path under autocast (cuda only; the official has none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first pass of each path")
    p.add_argument("--compare-tensor-resize", action="store_true",
                   help="also report the agreement of eps's earlier tensor resize")
    p.add_argument("--quick", action="store_true",
                   help="tiny run: the small backbone only (unless --backbones is given), 4 images, one repeat")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"SKIP infer_cams: --device {args.device} but no CUDA device is available")
        return 0
    if args.quick:
        if "--backbones" not in (sys.argv[1:] if argv is None else argv):
            args.backbones = "small"
        args.images, args.size, args.repeats = 2, (48, 40), 1
        args.small_images, args.small_size, args.small_repeats = 4, (64, 48), 1
    _common.set_threads(args.threads)
    _common.header("infer_cams", args.device, argv)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="eps-bench-infer-"))
    try:
        for backbone in args.backbones.split(","):
            rows.append(run_backbone(backbone.strip(), args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    target = 3.0 if args.device.startswith("cuda") else 1.3
    need = 0.995 if args.device.startswith("cuda") else 0.999
    parts = [f"{r['backbone']} {r['speedup']:.2f}x ({r['eps_ips']:.3g} vs {r['official_ips']:.3g} img/s), "
             f"agreement {100 * r['agreement']:.3f}%" for r in rows]
    speed = all(r["speedup"] >= target for r in rows)
    agree = all(r["agreement"] >= need for r in rows)
    verdict = (f"speed >= {target}x {'met' if speed else 'NOT met'}, agreement >= {100 * need:.1f}% "
               f"{'met' if agree else 'NOT met'}")
    _common.summary(f"infer_cams: {'; '.join(parts)}; {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
