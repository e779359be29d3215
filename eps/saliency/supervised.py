"""Training `pfan` and `dss` on a saliency dataset given as images + masks (DUTS layout).

Images are the ``*.jpg`` (or .jpeg / .png / .bmp) of one folder; the mask of an image is
the ``<stem>.png`` of the masks folder (0 background, 255 salient; grey values are kept as
soft targets). Each method trains as its paper does:

- PFAN (the authors' Keras code): random crop (up to 1/8) + mirror, rotation within
  +-25 degrees, contrast / brightness jitter; RGB minus their mean, padded to a square,
  resized to `size`. Loss 0.7 * BCE (positive weight 1.12) + 0.3 * edge loss (BCE
  between the Laplace edges of the mask and of the prediction) + the mean channel
  attention (their activity regulariser). SGD, momentum 0.9, lr 1e-2 halved at every
  eighth of the run (they halve every epochs / 8 epochs), batch 15, 256 x 256.
- DSS (the paper's Caffe solver): mirror; resized to `size` with the port's ImageNet
  normalisation. Loss: BCE on the six side outputs and the fusion, summed over pixels
  and averaged over the batch (Caffe's SigmoidCrossEntropyLoss). SGD, momentum 0.9,
  weight decay 5e-4, lr 1e-8 (x0.1 after 7500 of 12000 iterations), batch 10 (their
  batch 1 with iter_size 10); biases 2x lr without decay, score / merge convs and fusion
  0.1x lr, the transposed convs fixed at bilinear upsampling.

The sample order and every augmentation are a pure function of (seed, position) and
dropout of (seed, iteration), so a run resumed from its checkpoint ends with the weights
of an uninterrupted one. The result is an eps file (``torch.save`` of a dict with
``format``, ``method``, ``state_dict``, ``meta``) that ``load_predictor`` of the method reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from eps.errors import EpsError, file_error
from eps.saliency.network_file import EXPECTED_FILES, FORMAT, check_fit, read_model_file, save_model  # noqa: F401

METHODS = ("pfan", "dss")
LOG_FIELDS = ["iteration", "loss", "lr", "seconds"]

# None: the method's own value (METHOD_DEFAULTS)
TRAIN_DEFAULTS = {
    "iterations": None,
    "batch_size": None,
    "size": None,  # square training resolution, a multiple of 32
    "lr": None,
    "weight_decay": None,
    "momentum": 0.9,
    "augment": True,
    "weights": None,  # init: a file load_predictor takes, or VGG16 ImageNet weights (see init_model)
    "checkpoint_every": 1000,
    "num_workers": 2,
    "seed": 0,
}
METHOD_DEFAULTS = {
    # 35000 iterations of 15: about the authors' 50 epochs of DUTS-TR (10553 images)
    "pfan": {"iterations": 35000, "batch_size": 15, "size": 256, "lr": 1e-2, "weight_decay": 0.0},
    "dss": {"iterations": 12000, "batch_size": 10, "size": 256, "lr": 1e-8, "weight_decay": 5e-4},
}
_RUN_NEUTRAL = {"num_workers", "checkpoint_every"}  # do not change the trained weights
PFAN_POS_WEIGHT = 1.12
PFAN_SALIENCY_WEIGHT = 0.7
KERAS_EPSILON = 1e-7
LAPLACE = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))
DSS_STEP_AT = 7500 / 12000  # fraction of the run after which the DSS lr drops x0.1


# ------------------------------------------------------------------------ model files

def _module(method: str):
    if method == "pfan":
        from eps.saliency import pfan

        return pfan
    if method == "dss":
        from eps.saliency import dss

        return dss
    raise EpsError(f"--method: {method!r} is not a supervised saliency network; available: {list(METHODS)}")


def build_model(method: str):
    mod = _module(method)
    return mod.PFAN() if method == "pfan" else mod.DSS()


# ------------------------------------------------------------------- initialisation

def _vgg_features(state: dict) -> dict | None:
    """The 26 conv tensors of a torchvision VGG16 (``features.N.*``, classifier dropped) or of the
    port's ``vgg16_feat.pth`` (``N.*``), renamed ``features.N.*``; None when it is neither."""
    from eps.saliency.pfan import VGG_CONVS

    names = [f"{i}.{p}" for _, i in VGG_CONVS for p in ("weight", "bias")]
    for prefix in ("features.", ""):
        if all(prefix + n in state for n in names):
            return {"features." + n: state[prefix + n].float() for n in names}
    return None


def _torchvision_conv1_to_pfan(state: dict) -> dict:
    """Fold torchvision's input normalisation into conv1_1, so it reads PFAN's input (RGB - mean).

    x_tv = (rgb / 255 - m) / s and rgb = x_pfan + k give x_tv = x_pfan / (255 s) + (k / 255 - m) / s:
    the weights scale by 1 / (255 s) per input channel, the shift moves into the bias (exact
    away from the image border, where the zero padding stands for a different colour).
    """
    from eps.data.imagenet import MEAN, STD
    from eps.saliency.pfan import INPUT_MEAN

    weight, bias = state["features.0.weight"], state["features.0.bias"]
    s = torch.tensor(STD).view(1, 3, 1, 1)
    shift = (torch.tensor(INPUT_MEAN) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    state = dict(state)
    state["features.0.weight"] = weight / (255.0 * s)
    state["features.0.bias"] = bias + (weight * shift.view(1, 3, 1, 1)).sum((1, 2, 3))
    return state


def init_model(model, method: str, path) -> str:
    """Initialise `model` from `path`; returns what was loaded (one line).

    Accepted: any file the method's ``load_predictor`` reads (the whole network); VGG16
    ImageNet weights for the backbone: a torchvision VGG16 state_dict (or its ``features``,
    as the port's ``vgg16_feat.pth``), and for PFAN also the Keras VGG16 no-top ``.h5``
    (``block1_conv1`` ... ``block5_conv3``, the authors' initialisation).
    """
    mod = _module(method)
    path = Path(path)
    if method == "pfan" and mod.is_hdf5(path):
        layers = mod.read_keras_h5(path)
        full = set(mod.LAYER_KIND) <= set(layers) | set(mod._dense_aliases(layers).values())
        only = None if full else mod.VGG_LAYER_NAMES
        model.load_state_dict(mod.keras_state(path, model, layers, only=only), strict=False)
        return "the whole PFAN (Keras .h5)" if full else "VGG16 from a Keras .h5 (the other layers are new)"
    state, ours = read_model_file(path, method)
    if ours:
        model.load_state_dict(check_fit(path, state, model, method.upper()))
        return f"the whole {method.upper()} (eps file)"
    if method == "dss" and any(k.startswith(("feat.", "comb.")) for k in state):
        model.load_state_dict(mod.port_state(path, state, model))
        return "the whole DSS (DSS-pytorch file)"
    features = _vgg_features(state)
    if features is None:
        raise file_error(path, f"neither {EXPECTED_FILES[method]} nor a torchvision VGG16 state_dict")
    own = model.state_dict()
    for key, tensor in features.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise file_error(path, f"tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)}")
    if method == "pfan":
        features = _torchvision_conv1_to_pfan(features)
    model.load_state_dict(features, strict=False)
    return "VGG16 from a torchvision state_dict (the other layers are new)"


# --------------------------------------------------------------------------- parameters

def resolve_params(method: str, params: dict) -> dict:
    """TRAIN_DEFAULTS, then the method's values for those left None, then `params`; checked."""
    _module(method)
    unknown = sorted(set(params) - set(TRAIN_DEFAULTS))
    if unknown:
        raise EpsError(f"{method} training: unknown parameter(s) {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    p = dict(TRAIN_DEFAULTS)
    p.update({k: v for k, v in params.items()})
    for key, value in METHOD_DEFAULTS[method].items():
        if p[key] is None:
            p[key] = value
    for key in ("iterations", "batch_size", "size", "checkpoint_every"):
        if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
            raise EpsError(f"{method} training: {key} must be an integer >= 1, got {p[key]!r}")
    if p["size"] % 32:
        raise EpsError(f"{method} training: size must be a multiple of 32 (VGG16's stride), got {p['size']}")
    for key in ("lr", "weight_decay", "momentum"):
        if isinstance(p[key], bool) or not isinstance(p[key], (int, float)) or p[key] < 0:
            raise EpsError(f"{method} training: {key} must be a number >= 0, got {p[key]!r}")
    if p["weights"] is not None and not Path(p["weights"]).is_file():
        raise EpsError(f"{p['weights']}: weights file not found ({method} training: weights)")
    return p


def lr_factor(method: str, step: int, total: int) -> float:
    """The schedule: PFAN halves at every eighth of the run, DSS drops x0.1 at 62.5% (7500 / 12000)."""
    if method == "pfan":
        return 0.5 ** math.floor(8 * step / total)
    return 0.1 if step >= round(DSS_STEP_AT * total) else 1.0


def make_optimizer(model, method: str, p: dict) -> torch.optim.SGD:
    if method == "dss":
        for layer in model.upsampling_layers():
            layer.requires_grad_(False)
        spec = model.parameter_groups()
    else:
        spec = [(list(model.parameters()), 1.0, 1.0)]
    groups = [{"params": params, "lr": p["lr"] * lr_mult, "initial_lr": p["lr"] * lr_mult,
               "weight_decay": p["weight_decay"] * decay_mult} for params, lr_mult, decay_mult in spec]
    return torch.optim.SGD(groups, lr=p["lr"], momentum=p["momentum"])


# --------------------------------------------------------------------------------- data

def list_pairs(images_dir, masks_dir) -> tuple[list[Path], list[Path]]:
    """Images of `images_dir` and their masks `<masks_dir>/<stem>.png`; a missing mask is an error."""
    from eps.saliency import list_images

    images = list_images(images_dir)
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise file_error(masks_dir, "masks folder not found")
    masks = [masks_dir / f"{image.stem}.png" for image in images]
    for image, mask in zip(images, masks):
        if not mask.is_file():
            raise file_error(image, f"no mask {mask.name} in {masks_dir}")
    return images, masks


def _pfan_augment(image: np.ndarray, mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """The authors' augmentation: crop up to 1/8 per side, mirror, rotate +-25 degrees, contrast / brightness."""
    h, w = mask.shape
    cut_h, cut_w = int(rng.integers(0, max(1, h // 8))), int(rng.integers(0, max(1, w // 8)))
    top, left = int(rng.integers(0, cut_h + 1)), int(rng.integers(0, cut_w + 1))
    image = image[top:top + h - cut_h, left:left + w - cut_w]
    mask = mask[top:top + h - cut_h, left:left + w - cut_w]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    h, w = mask.shape
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-25, 25)), 1.0)
    image = cv2.warpAffine(np.ascontiguousarray(image), rotation, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ascontiguousarray(mask), rotation, (w, h), flags=cv2.INTER_LINEAR)
    contrast, light = float(rng.random() + 0.5), float(rng.integers(-20, 20))
    return np.clip(contrast * image + light, 0, 255), mask


def prepare(method: str, image: np.ndarray, mask: np.ndarray, size: int, rng=None):
    """One training pair: (3, size, size) float32 network input, (1, size, size) target in 0..1.

    `rng` None: no augmentation.
    """
    image = image.astype(np.float32)
    mask = mask.astype(np.float32) / 255.0
    if method == "pfan":
        from eps.saliency.pfan import INPUT_MEAN, pad_square

        if rng is not None:
            image, mask = _pfan_augment(image, mask, rng)
        image, _ = pad_square(image - np.asarray(INPUT_MEAN, np.float32))  # padded with the mean colour
        mask, _ = pad_square(mask)
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    else:
        from eps.data.imagenet import MEAN, STD

        if rng is not None and rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        image = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_LINEAR)
        mask = np.round(cv2.resize(np.ascontiguousarray(mask), (size, size), interpolation=cv2.INTER_LINEAR))
        image = (image / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return (np.ascontiguousarray(image.transpose(2, 0, 1), np.float32),
            np.ascontiguousarray(mask[None], np.float32))


def _samples_class():
    from eps.training import PositionSamples

    class PairSamples(PositionSamples):
        """Image + mask pairs addressed by run position (deterministic order and augmentation)."""

        def __init__(self, method, images, masks, params):
            self.method, self.images, self.masks, self.p = method, images, masks, params
            self.num_items = len(images)

        def __getitem__(self, position: int):
            from eps.data.io import read_image, read_saliency

            i = self._index(position)
            image, mask = read_image(self.images[i]), read_saliency(self.masks[i])
            if mask.shape != image.shape[:2]:
                raise file_error(self.masks[i], f"mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                                          f"{image.shape[1]}x{image.shape[0]}")
            rng = np.random.default_rng([self.p["seed"], position, 1]) if self.p["augment"] else None
            x, y = prepare(self.method, image, mask, self.p["size"], rng)
            return {"image": torch.from_numpy(x), "mask": torch.from_numpy(y)}

    return PairSamples


# --------------------------------------------------------------------------------- losses

def laplace_edges(x: torch.Tensor) -> torch.Tensor:
    """relu(tanh(Laplace filter)) of a one-channel map: the edges of the PFAN edge loss."""
    kernel = x.new_tensor(LAPLACE).view(1, 1, 3, 3)
    return F.relu(torch.tanh(F.conv2d(x, kernel, padding=1)))


def pfan_loss(logits: torch.Tensor, target: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """0.7 * weighted BCE + 0.3 * edge BCE + mean channel attention (the authors' loss and regulariser)."""
    saliency = F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor(PFAN_POS_WEIGHT))
    predicted = laplace_edges(torch.sigmoid(logits)).clamp(KERAS_EPSILON, 1 - KERAS_EPSILON)
    edge = F.binary_cross_entropy(predicted, laplace_edges(target))
    return PFAN_SALIENCY_WEIGHT * saliency + (1 - PFAN_SALIENCY_WEIGHT) * edge + attention.mean()


def dss_loss(maps, target: torch.Tensor) -> torch.Tensor:
    """BCE of every side output and the fusion, summed over pixels and maps, averaged over the batch."""
    total = sum(F.binary_cross_entropy_with_logits(m, target, reduction="sum") for m in maps)
    return total / target.shape[0]


def compute_loss(method: str, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if method == "pfan":
        logits, attention = model(x, with_attention=True)
        return pfan_loss(logits, y, attention)
    return dss_loss(model(x), y)


# ------------------------------------------------------------------------------ training

def _run_key(method: str, p: dict, images, masks, init_digest: str) -> str:
    """What a checkpoint must match to be resumed: method, parameters, the files (names, sizes), init."""
    from eps.training import run_key

    files = [(str(a.name), a.stat().st_size, str(b.name), b.stat().st_size) for a, b in zip(images, masks)]
    return run_key(p, _RUN_NEUTRAL, method=method, files=files, init=init_digest)


def train(method: str, images_dir, masks_dir, out, params: dict, device="cpu", progress: bool = True) -> Path:
    """Train `method` on `images_dir` + `masks_dir` and write the network to `out` (atomic).

    A checkpoint ``checkpoints/<out stem>-last.pt`` beside `out` is written every
    `checkpoint_every` iterations; a rerun with the same parameters and files resumes from
    it. The per-iteration log is copied to ``<out stem>_train_log.csv`` at the end.
    """
    from eps.models.deeplab import sha256_file
    from eps.training import fit

    p = resolve_params(method, params)
    images, masks = list_pairs(images_dir, masks_dir)
    out = Path(out)
    device = torch.device(device)
    init_digest = sha256_file(p["weights"]) if p["weights"] else ""
    run = _run_key(method, p, images, masks, init_digest)

    torch.manual_seed(p["seed"])
    model = build_model(method)
    init_note = init_model(model, method, p["weights"]) if p["weights"] else "random (no weights)"
    if p["weights"]:
        print(f"{p['weights']}: initialised {init_note}", flush=True)
    model.to(device)
    optimizer = make_optimizer(model, method, p)
    total = p["iterations"]

    def lr_at(iteration):
        factor = lr_factor(method, iteration, total)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return p["lr"] * factor

    def step(net, iteration, item):
        torch.manual_seed(p["seed"] * 1_000_003 + iteration)  # dropout: a function of the step
        loss = compute_loss(method, net, item["image"].to(device), item["mask"].to(device))
        return loss, {"loss": loss.item()}

    def save():
        meta = {"method": method, "params": p, "images": len(images), "images_dir": str(images_dir),
                "masks_dir": str(masks_dir), "init": init_note, "init_sha256": init_digest}
        save_model(model, method, out, meta)

    fit(model, optimizer, _samples_class()(method, images, masks, p), step,
        total=total, batch_size=p["batch_size"], num_workers=p["num_workers"],
        checkpoint_every=p["checkpoint_every"], work=out.parent / "checkpoints", key=run,
        inputs="parameters or files", fields=LOG_FIELDS, lr_at=lr_at, desc=f"train {method}", name=out,
        device=device, log_copy=out.with_name(f"{out.stem}_train_log.csv"), save=save,
        prefix=f"{out.stem}-", show=progress)
    return out
