"""Classifier training: the CAM baseline (C outputs) and EPS (C+1 outputs, saliency loss).

SGD with poly decay over the four parameter groups of the official code (lr, 2x lr for
biases, 10x / 20x lr for the new head). The sample order and every augmentation are a pure
function of (seed, position), so a run resumed from a checkpoint ends with exactly the
weights of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from eps.config import autocast_dtype, choose_device, set_threads, write_json
from eps.data.imagenet import normalize
from eps.data.index import labels_of, read_classes, read_index, split_rows
from eps.data.io import atomic_path, read_image
from eps.errors import EpsError
from eps.losses import classification_loss, foreground_share, saliency_loss
from eps.models import build_classifier, load_weights
from eps.models.classifier import PACKAGED_WEIGHTS, training_layout
from eps.models.efficientnet import load_lite0
from eps.shards import SaliencyStore
from eps.training import PositionSamples, fit, make_optimizer, run_key, set_poly_lr

LOG_FIELDS = ["iteration", "loss", "loss_cls", "loss_sal", "fg_share", "lr", "seconds"]


class TrainSamples(PositionSamples):
    """Classifier samples: image, image-level labels and (EPS) saliency, augmented deterministically."""

    def __init__(self, rows, labels, saliency: SaliencyStore | None, params: dict):
        self.ids = list(rows["id"])
        self.images = list(rows["image"])
        self.labels = labels.astype(np.float32)
        self.saliency = saliency
        self.p = params
        self.num_items = len(self.ids)

    def __getitem__(self, position: int):
        i = self._index(position)
        rng = np.random.default_rng([self.p["seed"], position, 1])
        image = read_image(self.images[i])
        sal = None
        if self.saliency is not None:
            sal = self.saliency.get(self.ids[i])
            if sal.shape != image.shape[:2]:
                sal = cv2.resize(sal, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        image, sal = augment(image, sal, rng, self.p["resize_long"], self.p["crop"])
        item = {"image": torch.from_numpy(image), "label": torch.from_numpy(self.labels[i])}
        if sal is not None:
            item["saliency"] = torch.from_numpy(sal)[None]
        return item


def augment(image, sal, rng, resize_long, crop):
    """Random long-side resize, horizontal flip, normalisation and a zero-padded random crop."""
    h, w = image.shape[:2]
    target = int(rng.integers(resize_long[0], resize_long[1] + 1))
    scale = target / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    if sal is not None:
        sal = cv2.resize(sal, size, interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        sal = sal[:, ::-1] if sal is not None else None
    image = normalize(np.ascontiguousarray(image))
    h, w = image.shape[1:]
    top = int(rng.integers(0, max(h - crop, 0) + 1))
    left = int(rng.integers(0, max(w - crop, 0) + 1))
    ph, pw = min(crop, h), min(crop, w)
    # Where the image is smaller than the crop, place it at a random offset in a zero canvas.
    oy = int(rng.integers(0, crop - ph + 1))
    ox = int(rng.integers(0, crop - pw + 1))
    out = np.zeros((3, crop, crop), np.float32)
    out[:, oy:oy + ph, ox:ox + pw] = image[:, top:top + ph, left:left + pw]
    out_sal = None
    if sal is not None:
        out_sal = np.zeros((crop, crop), np.float32)
        out_sal[oy:oy + ph, ox:ox + pw] = sal[top:top + ph, left:left + pw].astype(np.float32) / 255.0
    return out, out_sal


# Parameters that do not change the trained weights: a checkpoint stays valid across them.
_RUN_NEUTRAL = {"device", "num_workers", "checkpoint_every", "gpus"}


@dataclass
class _Job:
    """Everything a training process needs (picklable: distributed ranks receive a copy)."""

    out: Path
    params: dict
    rows: object  # the split's index rows (pandas)
    labels: np.ndarray
    saliency: SaliencyStore | None
    classes: list
    dataset: str
    bg_idx: list
    run: str


def train_classifier(index_csv, out, params: dict, saliency_shards=(), split: str = "train") -> Path:
    """Train a classifier on the `split` rows of `index_csv`; write `out` (weights + meta) and train_log.csv beside it.

    With `gpus: N` > 1 the run is data parallel (DistributedDataParallel) over N processes,
    one GPU each (NCCL), or on CPU (gloo); each rank takes 1/N of every global batch.
    """
    set_threads()
    out = Path(out)
    index = read_index(index_csv)
    info = read_classes(index_csv)
    classes = info["classes"]
    rows = split_rows(index, split)
    labels = labels_of(rows, len(classes))
    if params["loss"] not in ("eps", "cam"):
        raise EpsError(f"loss: unknown value {params['loss']!r} (eps, cam)")
    eps_loss = params["loss"] == "eps"
    saliency = None
    if eps_loss:
        if not saliency_shards:
            raise EpsError(f"{index_csv}: the eps loss needs saliency shards (--saliency)")
        saliency = SaliencyStore(saliency_shards, info["dataset"])
        missing = [i for i in rows["id"] if i not in saliency]
        if missing:
            raise EpsError(f"{saliency_shards[0]}: no saliency map for {len(missing)} image(s), e.g. {missing[0]!r}")
    bg_idx = []
    for name in params["background_classes"]:
        if name not in classes:
            raise EpsError(f"background_classes: unknown class {name!r}; known: {classes}")
        bg_idx.append(classes.index(name))

    # precision float32 (the default) is left out: checkpoints of runs from before the key resume
    keyed = {k: v for k, v in params.items() if not (k == "precision" and v == "float32")}
    run = run_key(keyed, _RUN_NEUTRAL, ids=list(rows["id"]), classes=list(classes), dataset=info["dataset"])
    job = _Job(out, params, rows, labels, saliency, classes, info["dataset"], bg_idx, run)
    gpus = params.get("gpus", 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise EpsError(f"gpus: must be an integer >= 1, got {gpus!r}")
    if gpus > 1:
        _train_distributed(job, gpus)
    else:
        _fit(job, choose_device(params["device"]))
    return out


def _fit(job: _Job, device, rank: int = 0, world: int = 1) -> None:
    """Build the classifier and train it (`eps.training.fit`); with `world` > 1, one rank of a
    DistributedDataParallel run (rank 0 writes)."""
    params, out = job.params, job.out
    eps_loss = params["loss"] == "eps"
    autocast = autocast_dtype(params["precision"], device, "classifier.precision")
    torch.manual_seed(params["seed"])
    model = build_classifier(params["backbone"], len(job.classes), background=eps_loss)
    if params["backbone"] in PACKAGED_WEIGHTS:
        # ImageNet weights of the installed package (or the file named by `weights`), by name
        load_lite0(model._backbone, params["weights"])
    elif params["weights"]:
        load_weights(model, params["weights"], backbone_only=True)
    layout = training_layout(params["backbone"], autocast, device)
    model.to(device, memory_format=layout)
    optimizer = make_optimizer(model, params)
    total = int(params["iterations"])

    def step(net, iteration, item):
        image = item["image"].to(device, memory_format=layout)
        label = item["label"].to(device)
        with torch.autocast(device_type=device.type, dtype=autocast, enabled=autocast is not None):
            logits, cam = net(image)
        logits, cam = logits.float(), cam.float()  # the losses in float32
        loss_cls = classification_loss(logits, label)
        loss_sal = torch.zeros((), device=device)
        fg_share = ""
        if eps_loss:
            # selection_warmup: adaptive selection starts after this many naive iterations
            selection = params["selection"]
            if selection == "adaptive" and iteration < params["selection_warmup"]:
                selection = "naive"
            sal = item["saliency"].to(device)
            loss_sal = saliency_loss(cam, sal, label, params["tau"], params["lam"],
                                     selection=selection, background_classes=job.bg_idx)[0]
            fg_share = f"{foreground_share(cam, sal, label, params['tau'], params['selection'], job.bg_idx):.4f}"
        loss = loss_cls + loss_sal
        if world == 1:
            shown = (loss.item(), loss_cls.item(), loss_sal.item())
        else:
            # the global batch's losses: the mean of the ranks' means (equal local batches)
            values = torch.stack([loss.detach(), loss_cls.detach(), loss_sal.detach()])
            torch.distributed.all_reduce(values)
            shown = tuple((values / world).tolist())
        return loss, {"loss": shown[0], "loss_cls": shown[1], "loss_sal": shown[2], "fg_share": fg_share}

    def wrap(model):
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save():
        meta = {
            "backbone": params["backbone"], "num_classes": len(job.classes), "background": eps_loss,
            "classes": job.classes, "dataset": job.dataset, "params": params,
            "init": params["weights"] or ("imagenet (installed package)" if params["backbone"] in PACKAGED_WEIGHTS
                                          else "scratch"),
        }
        write_json(out.with_suffix(".json"), meta)
        with atomic_path(out) as tmp:
            torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)

    # the checkpoint folder is made after the checks above: a refused run leaves nothing
    fit(model, optimizer, TrainSamples(job.rows, job.labels, job.saliency, params), step,
        total=total, batch_size=int(params["batch_size"]), num_workers=int(params["num_workers"]),
        checkpoint_every=int(params["checkpoint_every"]), work=out.parent / "checkpoints", key=job.run,
        inputs="parameters or training images", fields=LOG_FIELDS,
        lr_at=lambda iteration: set_poly_lr(optimizer, iteration, total, params["poly_power"]),
        desc=f"train {out.parent.name}", name=out.parent, device=device, log_copy=out.parent / "train_log.csv",
        save=save, rank=rank, world=world, wrap=wrap)


def _distributed_devices(name: str, gpus: int):
    """CUDA device indices for the `gpus` ranks, or None to train on CPU (gloo)."""
    if name == "cpu":
        return None
    if name == "auto" and not torch.cuda.is_available():
        return None
    if name != "cuda" and name != "auto":
        choose_device(name)  # an unknown name or cuda without a GPU: its one-line error
        raise EpsError(f"device: {name!r} names one GPU; with gpus: {gpus} use auto or cuda")
    if not torch.cuda.is_available():
        raise EpsError(f"device: {name!r} requested but no CUDA device is available")
    count = torch.cuda.device_count()
    if count < gpus:
        raise EpsError(f"gpus: {gpus} requested but only {count} CUDA device(s) are visible")
    if name == "auto" and count > 1:
        from eps.gpus import claim_devices

        return claim_devices(count, gpus)  # held by this process until it exits
    return list(range(gpus))


def _train_distributed(job: _Job, gpus: int) -> None:
    """Spawn `gpus` ranks (torch.multiprocessing) and run `_fit` in each with DistributedDataParallel."""
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    batch = int(job.params["batch_size"])
    if batch % gpus:
        raise EpsError(f"batch_size: {batch} does not split evenly over gpus: {gpus} (each rank takes batch_size / gpus)")
    devices = _distributed_devices(job.params["device"], gpus)
    threads = max(1, torch.get_num_threads() // gpus)
    rendezvous = Path(tempfile.mkdtemp(prefix="eps-ddp-"))
    try:
        mp.spawn(_rank_main, args=(gpus, job, devices, str(rendezvous / "store"), threads), nprocs=gpus, join=True)
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1]
        if "EpsError: " in last:  # a user error in a rank: its own one line
            raise EpsError(last.split("EpsError: ", 1)[-1]) from None
        raise
    except mp.ProcessExitedException as exc:
        raise EpsError(f"{job.out.parent}: a training process died ({exc})") from None
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


def _rank_main(rank: int, world: int, job: _Job, devices, store: str, threads: int) -> None:
    """One rank of a distributed run (entry point of a spawned process)."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if devices is None:
        device, backend = torch.device("cpu"), "gloo"
    else:
        device, backend = torch.device(f"cuda:{devices[rank]}"), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _fit(job, device, rank, world)
    finally:
        dist.destroy_process_group()
