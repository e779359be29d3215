"""`usps`: unsupervised saliency in the spirit of DeepUSPS (Nguyen et al., NeurIPS 2019).

No pixel annotation is used anywhere. Round-1 pseudo-labels are the handcrafted priors of
`eps.saliency.classical` fused (its tuned fusion, or their mean with the pixels where they
disagree left out), sharpened by a dense CRF. A small fully convolutional encoder-decoder,
trained from scratch, learns them on the dataset's own images; it sees the image and the
prior maps, so it learns when to trust which prior rather than re-deriving them from pixels.
After each round it predicts every training image and the labels move towards its
CRF-refined predictions (a moving average, as in DeepUSPS). The last round's network, with
the same CRF, is the predictor.

Everything runs at a reduced square resolution (`size`); maps are resized back to the
input size. `TRAIN_DEFAULTS` trains on a CPU in minutes; `GPU_PRESET` is a bigger setting.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eps.data import imagenet
from eps.data.io import atomic_path, read_image
from eps.errors import EpsError, file_error
from eps.progress import progress as progress_bar
from eps.saliency import check_rgb, to_uint8
from eps.training import run_key

FORMAT = "eps.usps"
FORMAT_VERSION = 1

TRAIN_DEFAULTS = {
    "size": 112,  # training and inference resolution (square, pixels)
    "widths": [16, 32, 64, 96],  # encoder channels per stage (multiples of 8); the decoder mirrors them
    "rounds": 3,  # self-training rounds
    "epochs": 12,  # epochs per round
    "batch_size": 16,
    "lr": 2e-3,  # AdamW, cosine decay within each round
    "weight_decay": 1e-4,
    "iou_weight": 1.0,  # soft-IoU term added to the BCE
    "use_priors": True,  # the prior maps join the RGB input as extra channels
    "fusion": "classical",  # round-1 labels: classical (its tuned fusion of the priors) | mean (of the priors)
    "agreement": 1.0,  # round 1 ignores pixels whose prior maps spread more than this (1: none ignored)
    "targets": "hard",  # hard (adaptive threshold, uncertain band ignored) | soft (the labels themselves)
    "high": 0.9,  # hard targets: cap of the adaptive threshold (twice the label's mean)
    "low": 0.5,  # hard targets: background below low x threshold; the band up to the threshold is ignored
    "label_momentum": 0.5,  # after a round: label = (1 - m) * label + m * refined prediction
    "crf": True,  # dense CRF on the round-1 labels, on each round's predictions and at inference
    "seed": 0,
    "init": None,  # optional usps checkpoint to start from (a network of the same shape)
}

# For a GPU: twice the resolution, a wider network and longer rounds (~8x the CPU work per image).
GPU_PRESET = {
    **TRAIN_DEFAULTS,
    "size": 224,
    "widths": [32, 64, 128, 256],
    "rounds": 4,
    "epochs": 30,
    "batch_size": 32,
}

CRF_PARAMS = {"bi_w": 5.0, "bi_xy": 30.0, "bi_rgb": 10.0, "pos_w": 3.0, "pos_xy": 2.0, "iterations": 5}

MEAN = torch.tensor(imagenet.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(imagenet.STD).view(1, 3, 1, 1)


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
                         nn.GroupNorm(min(8, out_ch // 4), out_ch), nn.ReLU(inplace=True))


class SaliencyNet(nn.Module):
    """A compact U-Net: strided encoder, a global-context vector, skip-connected decoder.

    Input: RGB, optionally the prior maps as extra channels; two coordinate channels are
    added so the network can learn a centre bias, and the globally pooled deepest features
    join the bottleneck so a pixel can be compared with the whole image. Output: logits
    (N, 1, H, W) at the input size (H, W multiples of 2 ** (stages - 1)).
    """

    def __init__(self, widths=TRAIN_DEFAULTS["widths"], in_channels: int = 3):
        super().__init__()
        widths = [int(w) for w in widths]
        self.encoder = nn.ModuleList()
        in_ch = in_channels + 2
        for i, w in enumerate(widths):
            self.encoder.append(nn.Sequential(_conv(in_ch, w, stride=1 if i == 0 else 2), _conv(w, w)))
            in_ch = w
        self.context = nn.Sequential(nn.Conv2d(2 * in_ch, in_ch, 1, bias=False),
                                     nn.GroupNorm(min(8, in_ch // 4), in_ch), nn.ReLU(inplace=True))
        self.decoder = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.decoder.append(_conv(in_ch + w, w))
            in_ch = w
        self.head = nn.Conv2d(in_ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        x = torch.cat([x, ys, xs], 1)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        pooled = x.mean((2, 3), keepdim=True).expand_as(x)
        x = self.context(torch.cat([x, pooled], 1))
        for stage, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], 1))
        return self.head(x)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """float (N, C, H, W) in 0..1, RGB first -> network input (RGB standardised, priors centred)."""
    rgb = (x[:, :3] - MEAN.to(x.device)) / STD.to(x.device)
    return torch.cat([rgb, (x[:, 3:] - 0.5) * 4], 1)


def _prior_maps(rgb: np.ndarray) -> dict:
    from eps.saliency.classical import priors

    return priors(rgb)


def _classical_map(rgb: np.ndarray) -> np.ndarray:
    from eps.saliency.classical import saliency

    return saliency(rgb).astype(np.float32) / 255.0


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(np.asarray(x), (size, size), interpolation=cv2.INTER_AREA)


def network_input(rgb: np.ndarray, size: int, use_priors: bool) -> tuple[np.ndarray, dict]:
    """The image at size x size as uint8 (S, S, 3 [+ priors]) and its prior maps at that size."""
    maps = {name: _resize(np.asarray(m, np.float32), size) for name, m in _prior_maps(rgb).items()}
    stack = [_resize(rgb, size)]
    if use_priors:
        stack += [np.rint(m.clip(0, 1) * 255).astype(np.uint8)[..., None] for m in maps.values()]
    return np.concatenate(stack, 2), maps


def pseudo_label(rgb: np.ndarray, maps: dict, size: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Round-1 label and weight (float32, size x size) fused from the priors.

    `fusion: classical` takes the tuned fusion of `eps.saliency.classical`; `mean` the mean
    of the prior maps. The weight is 1 where the prior maps agree (spread at most
    `agreement`) and 0 elsewhere, so round 1 learns only from the pixels the priors agree on.
    """
    stacked = np.stack(list(maps.values()))
    if params["fusion"] == "classical":
        label = _resize(_classical_map(rgb), size)
    else:
        label = stacked.mean(0)
    if params["crf"]:
        label = _crf(_resize(rgb, size), label)
    weight = (stacked.max(0) - stacked.min(0) <= params["agreement"]).astype(np.float32)
    return label.clip(0, 1).astype(np.float32), weight


def _augment(batch: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, gen: torch.Generator):
    """Random flip, scale-and-shift crop (one affine warp) and colour jitter of a batch.

    batch float (N, C, S, S) in 0..1, RGB first; labels, weights (N, 1, S, S).
    """
    n = batch.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    scale = 0.6 + 0.4 * rand(n)  # the crop covers 60-100 % of each side
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    shift_x = (1 - scale) * (2 * rand(n) - 1)
    shift_y = (1 - scale) * (2 * rand(n) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = scale
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    warp = lambda t: F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)  # noqa: E731
    batch, labels, weights = warp(batch), warp(labels), warp(weights)
    rgb = batch[:, :3]
    brightness, contrast, saturation = (0.75 + 0.5 * rand(3, n, 1, 1, 1)).unbind(0)
    gray = rgb.mean(1, keepdim=True)
    rgb = gray + (rgb - gray) * saturation
    mean = rgb.mean((1, 2, 3), keepdim=True)
    rgb = ((rgb - mean) * contrast + mean) * brightness
    return torch.cat([rgb.clamp(0, 1), batch[:, 3:]], 1), labels, weights


def _loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, iou_weight: float) -> torch.Tensor:
    """Weighted BCE against soft labels plus a weighted soft-IoU term."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, weight=weights, reduction="sum")
    bce = bce / weights.sum().clamp(min=1.0)
    if not iou_weight:
        return bce
    prob = torch.sigmoid(logits)
    inter = (prob * labels * weights).sum((1, 2, 3))
    union = ((prob + labels - prob * labels) * weights).sum((1, 2, 3))
    return bce + iou_weight * (1 - (inter + 1) / (union + 1)).mean()


def _as_float(stacks: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, C) -> float (N, C, S, S) in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(stacks)).permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def _predict(model: nn.Module, stacks: np.ndarray, device, batch: int = 32) -> np.ndarray:
    """Probabilities (N, S, S) float32 of network inputs (N, S, S, C), averaged with their mirror images."""
    model.eval()
    out = []
    for start in range(0, len(stacks), batch):
        x = _normalise(_as_float(stacks[start:start + batch]).to(device))
        p = torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(3))).flip(3)
        out.append((p[:, 0] / 2).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def _crf(image: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Dense-CRF foreground probability of a (S, S) map on its (S, S, 3) image."""
    from eps.crf import dense_crf

    prob = prob.clip(1e-4, 1 - 1e-4)
    return dense_crf(image, np.stack([1 - prob, prob]), CRF_PARAMS)[1]


def _check_params(params: dict | None) -> dict:
    params = {**TRAIN_DEFAULTS, **(params or {})}
    unknown = sorted(set(params) - set(TRAIN_DEFAULTS))
    if unknown:
        raise EpsError(f"usps: unknown parameter(s) {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    for key in ("size", "rounds", "epochs", "batch_size"):
        if not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1:
            raise EpsError(f"usps.{key}: must be an integer >= 1, got {params[key]!r}")
    for key in ("lr", "weight_decay", "iou_weight", "agreement", "high", "low", "label_momentum"):
        value = params[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise EpsError(f"usps.{key}: must be a number >= 0, got {value!r}")
    if params["label_momentum"] > 1:
        raise EpsError(f"usps.label_momentum: must be in [0, 1], got {params['label_momentum']!r}")
    widths = params["widths"]
    if not isinstance(widths, (list, tuple)) or not widths or any(
            not isinstance(w, int) or w < 8 or w % 8 for w in widths):
        raise EpsError(f"usps.widths: a list of channel counts, multiples of 8, got {widths!r}")
    stride = 2 ** (len(widths) - 1)
    if params["size"] % stride or params["size"] < 2 * stride:
        raise EpsError(f"usps.size: must be a multiple of {stride} (the network's stride) and at least "
                       f"{2 * stride}, got {params['size']!r}")
    for key, allowed in (("fusion", ("classical", "mean")), ("targets", ("soft", "hard"))):
        if params[key] not in allowed:
            raise EpsError(f"usps.{key}: unknown value {params[key]!r} (allowed: {', '.join(allowed)})")
    return params


def _load_images(image_paths, params: dict, progress: bool):
    """Network inputs (N, S, S, C) uint8, round-1 labels and weights (N, S, S) float32, prior names."""
    stacks, labels, weights = [], [], []
    names = None
    for path in progress_bar(image_paths, desc="usps priors", disable=not progress, mininterval=2):
        rgb = read_image(path)
        stack, maps = network_input(rgb, params["size"], params["use_priors"])
        label, weight = pseudo_label(rgb, maps, params["size"], params)
        names = names or list(maps)
        stacks.append(stack)
        labels.append(label)
        weights.append(weight)
    return np.stack(stacks), np.stack(labels), np.stack(weights), names


def _train_round(model, stacks, labels, weights, params, device, gen, desc, progress) -> float:
    """One round: `epochs` passes over the images with fresh AdamW and a cosine schedule; the last epoch's mean loss."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    batch = min(params["batch_size"], len(stacks))
    steps_per_epoch = max(1, len(stacks) // batch)
    total = params["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    label_t = torch.from_numpy(labels)[:, None]
    weight_t = torch.from_numpy(weights)[:, None]
    losses = []
    with progress_bar(total=total, desc=desc, disable=not progress, mininterval=2) as bar:
        for _ in range(params["epochs"]):
            order = torch.randperm(len(stacks), generator=gen)
            for step in range(steps_per_epoch):
                idx = order[step * batch:(step + 1) * batch]
                x, y, w = _augment(_as_float(stacks[idx.numpy()]), label_t[idx], weight_t[idx], gen)
                loss = _loss(model(_normalise(x).to(device)), y.to(device), w.to(device), params["iou_weight"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses[-steps_per_epoch:]):.4f}")
    return float(np.mean(losses[-steps_per_epoch:]))


def _targets(labels: np.ndarray, weights: np.ndarray, params: dict):
    """Training targets and pixel weights from the soft labels.

    `soft`: the labels themselves. `hard`: 1 at or above the image's adaptive threshold
    (twice its mean, capped at `high`, as F-adaptive thresholds), 0 below `low` times it,
    the band between ignored.
    """
    if params["targets"] == "soft":
        return labels, weights
    thr = np.minimum(2 * labels.mean((1, 2), keepdims=True), params["high"])
    pos = labels >= thr
    neg = labels < params["low"] * thr
    return pos.astype(np.float32), ((pos | neg) & (weights > 0)).astype(np.float32)


def _update_labels(model, stacks, labels, params, device) -> np.ndarray:
    """Move the labels towards the network's (optionally CRF-refined) predictions."""
    pred = _predict(model, stacks, device)
    if params["crf"]:
        pred = np.stack([_crf(stack[..., :3], p) for stack, p in zip(stacks, pred)])
    m = params["label_momentum"]
    return ((1 - m) * labels + m * pred).astype(np.float32)


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(image_paths: list[str], out, params: dict | None = None, device="cpu", progress=True) -> Path:
    """Self-train a usps network on `image_paths` (no annotation); write the checkpoint `out`.

    A round checkpoint (`out` + `.round`) is written after every round; rerunning the same
    command after an interruption resumes after the last completed round. It is removed
    when the final checkpoint is written.
    """
    params = _check_params(params)
    if not image_paths:
        raise EpsError("usps: no training images")
    out = Path(out)
    device = torch.device(device)
    stacks, labels, weights, prior_names = _load_images(image_paths, params, progress)

    torch.manual_seed(params["seed"])
    model = SaliencyNet(params["widths"], stacks.shape[3])
    if params["init"]:
        init = _read_checkpoint(params["init"])
        _load_state(model, init["state_dict"], params["init"])
    run = run_key(params, images=[str(p) for p in image_paths])  # what a round checkpoint must match
    partial = out.with_name(out.name + ".round")
    state = torch.load(partial, map_location="cpu", weights_only=True) if partial.is_file() else None
    if state is not None and state.get("run") != run:
        if progress:
            print(f"ignoring {partial}: written by a run with other parameters or images", flush=True)
        state = None
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["state_dict"])
        labels = state["labels"].numpy()
        weights = np.ones_like(labels)
        start, history = int(state["round"]), list(state["history"])
        if progress:
            print(f"resuming {out.name} after round {start}", flush=True)
    model.to(device)
    gen = torch.Generator()
    for rnd in range(start, params["rounds"]):
        gen.manual_seed(params["seed"] * 1000 + rnd)  # a resumed round draws what it would have drawn
        loss = _train_round(model, stacks, *_targets(labels, weights, params), params, device, gen,
                            f"usps round {rnd + 1}/{params['rounds']}", progress)
        history.append(loss)
        if rnd + 1 < params["rounds"]:
            labels = _update_labels(model, stacks, labels, params, device)
            weights = np.ones_like(labels)  # from round 2 every pixel has a self-trained label
            _save(partial, {"run": run, "round": rnd + 1, "state_dict": model.state_dict(),
                            "labels": torch.from_numpy(labels), "history": history})
    config = {"widths": list(params["widths"]), "size": params["size"], "crf": bool(params["crf"]),
              "priors": prior_names if params["use_priors"] else []}
    _save(out, {"format": FORMAT, "version": FORMAT_VERSION, "config": config,
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "params": params,
                "history": history, "images": len(image_paths)})
    partial.unlink(missing_ok=True)
    return out


def _read_checkpoint(path) -> dict:
    """A usps checkpoint's contents, checked: any other file is a one-line EpsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise file_error(path, f"not a usps checkpoint (cannot load it: {type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise file_error(path, "not a usps checkpoint (made by `eps train-saliency --method usps`)")
    if state.get("version") != FORMAT_VERSION:
        raise file_error(path, f"usps checkpoint version {state.get('version')!r} is not supported "
                         f"(expected {FORMAT_VERSION})")
    return state


def _load_state(model: nn.Module, state_dict, path) -> None:
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, KeyError, AttributeError) as exc:
        problem = " ".join(str(exc).split())
        problem = problem if len(problem) <= 200 else problem[:197] + "..."
        raise file_error(path, f"usps weights do not fit the network ({problem})") from None


def load_predictor(weights, device="cpu"):
    """A callable rgb uint8 (H, W, 3) -> saliency uint8 (H, W) at the input size, from a usps checkpoint."""
    if weights is None:
        raise EpsError("usps needs --weights FILE (made by `eps train-saliency --method usps`)")
    state = _read_checkpoint(weights)
    config = state["config"]
    size, use_crf, prior_names = config["size"], config["crf"], config["priors"]
    model = SaliencyNet(config["widths"], 3 + len(prior_names))
    _load_state(model, state["state_dict"], weights)
    device = torch.device(device)
    model.to(device).eval()

    def predict(rgb: np.ndarray) -> np.ndarray:
        rgb = check_rgb(np.asarray(rgb), "usps")
        h, w = rgb.shape[:2]
        if prior_names:
            stack, maps = network_input(rgb, size, True)
            if list(maps) != prior_names:
                raise EpsError(f"{weights}: trained on priors {prior_names}, eps.saliency.classical gives {list(maps)}")
        else:
            stack = _resize(rgb, size)
        prob = _predict(model, stack[None], device)[0]
        if use_crf:
            prob = _crf(stack[..., :3], prob)
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        return to_uint8(prob)

    return predict
