"""Classifier training: the CAM baseline (C outputs) and EPS (C+1 outputs, saliency loss).

SGD with poly decay over the four parameter groups of the official code (lr, 2x lr for
biases, 10x / 20x lr for the new head). The sample order and every augmentation are a pure
function of (seed, position), so a run resumed from a checkpoint ends with exactly the
weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from eps.progress import progress

from eps.config import autocast_dtype, choose_device, set_threads, write_json
from eps.data.index import labels_of, read_classes, read_index, split_rows
from eps.data.io import atomic_path, open_h5, read_image
from eps.errors import EpsError
from eps.losses import classification_loss, foreground_share, saliency_loss
from eps.models import build_classifier, load_weights
from eps.models.classifier import PACKAGED_WEIGHTS
from eps.models.efficientnet import load_lite0

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
LOG_FIELDS = ["iteration", "loss", "loss_cls", "loss_sal", "fg_share", "lr", "seconds"]


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (3, H, W) with ImageNet statistics, as the official code."""
    return ((image.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


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


class PositionSamples(Dataset):
    """Samples addressed by their position p in the whole run (p = iteration * batch + slot).

    The image at position p is a pure function of (seed, p): a seeded permutation per epoch,
    so a resumed run draws exactly the samples an uninterrupted run would.
    """

    num_items: int

    def __len__(self):
        return 1 << 62

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        order = np.random.default_rng([self.p["seed"], epoch]).permutation(self.num_items)
        return int(order[offset])


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


def make_optimizer(model, params):
    """SGD over the four parameter groups: lr, 2x lr (biases), 10x / 20x lr (new head; the
    segmenter's `head_lr_mult` replaces the 10)."""
    groups = model.get_parameter_groups()
    lr, wd = params["lr"], params["weight_decay"]
    head = float(params.get("head_lr_mult", 10))
    spec = [(groups[0], 1, wd), (groups[1], 2, 0.0), (groups[2], head, wd), (groups[3], 2 * head, 0.0)]
    param_groups = [
        {"params": list(p), "lr": lr * mult, "initial_lr": lr * mult, "weight_decay": decay}
        for p, mult, decay in spec
        if len(p)
    ]
    return torch.optim.SGD(param_groups, lr=lr, momentum=params["momentum"])


def set_poly_lr(optimizer, iteration: int, total: int, power: float) -> float:
    factor = (1 - iteration / total) ** power
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# Parameters that do not change the trained weights: a checkpoint stays valid across them.
_RUN_NEUTRAL = {"device", "num_workers", "checkpoint_every", "gpus"}


def _run_key(params: dict, ids, classes, dataset: str) -> str:
    """What a checkpoint must match to be resumed: the run's parameters and training images."""
    # precision float32 (the default) is left out: checkpoints of runs from before the key resume
    data = {
        "params": {k: v for k, v in params.items()
                   if k not in _RUN_NEUTRAL and not (k == "precision" and v == "float32")},
        "ids": list(ids), "classes": list(classes), "dataset": dataset,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _finish_checkpoints(work: Path, ckpt: Path, log_path: Path) -> None:
    """A finished run leaves no checkpoint folder: a rerun (new code, new parameters) trains
    again instead of resuming a finished run; the log was copied beside the model."""
    ckpt.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def _save_checkpoint(path: Path, model, optimizer, iteration: int, run: str = "") -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "iteration": iteration, "run": run}, tmp)


def _resume_checkpoint(ckpt: Path, run: str, model, optimizer, log_path: Path, device, inputs: str,
                       fields=LOG_FIELDS, lead: bool = True) -> int:
    """The iteration a training run starts from (0 without a usable checkpoint).

    A checkpoint of this same run (`run` key) is loaded into `model` and `optimizer` and the
    log cut back to it; one left by a run with other `inputs` would give wrong weights and is
    ignored, and the log restarts. Only the `lead` process prints and touches the log.
    """
    state = None
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location=device, weights_only=True)
            if not isinstance(state, dict) or not {"model", "optimizer", "iteration"} <= state.keys():
                raise ValueError("not a checkpoint of eps")
        except Exception as exc:  # a truncated or damaged file (a crash while the disk filled)
            state = None
            if lead:
                aside = ckpt.with_name(ckpt.name + ".corrupt")
                os.replace(ckpt, aside)
                print(f"warning: {ckpt}: unreadable checkpoint ({type(exc).__name__}) set aside as {aside.name}; "
                      "training restarts", file=sys.stderr, flush=True)
    if state is not None and state.get("run") != run:
        if lead:
            print(f"ignoring {ckpt}: written by a run with other {inputs}", flush=True)
        state = None
    if state is None:
        if lead and log_path.exists():
            log_path.unlink()
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["iteration"])
    if lead:
        _truncate_log(log_path, start, fields)
        print(f"resuming from {ckpt} at iteration {start}", flush=True)
    return start


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


class _RankPositions:
    """Sample positions of one rank: its contiguous slice of every global batch of steps start..total-1.

    Rank r of w takes positions step * batch + r * local ... + local - 1 (local = batch / w), so
    the union over ranks of one step is exactly the global batch of a single process, and the
    sample sequence stays a function of (seed, position).
    """

    def __init__(self, start: int, total: int, batch: int, rank: int, world: int):
        self.start, self.total, self.batch = start, total, batch
        self.local = batch // world
        self.offset = rank * self.local

    def __len__(self):
        return (self.total - self.start) * self.local

    def __iter__(self):
        for step in range(self.start, self.total):
            first = step * self.batch + self.offset
            yield from range(first, first + self.local)


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

    run = _run_key(params, rows["id"], classes, info["dataset"])
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
    """The training loop; with `world` > 1, one rank of a DistributedDataParallel run (rank 0 writes)."""
    params, out = job.params, job.out
    eps_loss = params["loss"] == "eps"
    work = out.parent / "checkpoints"
    lead = rank == 0
    autocast = autocast_dtype(params["precision"], device, "classifier.precision")
    torch.manual_seed(params["seed"])
    model = build_classifier(params["backbone"], len(job.classes), background=eps_loss)
    if params["backbone"] in PACKAGED_WEIGHTS:
        # ImageNet weights of the installed package (or the file named by `weights`), by name
        load_lite0(model._backbone, params["weights"])
    elif params["weights"]:
        load_weights(model, params["weights"], backbone_only=True)
    if lead:
        work.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves nothing
    model.to(device)
    optimizer = make_optimizer(model, params)

    total = int(params["iterations"])
    ckpt = work / "last.pt"
    log_path = work / "train_log.csv"
    start = _resume_checkpoint(ckpt, job.run, model, optimizer, log_path, device,
                               "parameters or training images", lead=lead)

    batch = int(params["batch_size"])
    samples = TrainSamples(job.rows, job.labels, job.saliency, params)
    if world == 1:
        net = model
        loader = DataLoader(
            samples,
            batch_size=batch,
            sampler=range(start * batch, total * batch),
            num_workers=int(params["num_workers"]),
            drop_last=True,
        )
    else:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        loader = DataLoader(
            samples,
            batch_size=batch // world,
            sampler=_RankPositions(start, total, batch, rank, world),
            num_workers=int(params["num_workers"]),
            drop_last=True,
        )
    net.train()
    new_log = not log_path.exists()
    t0 = time.time()
    with open(log_path, "a", newline="") if lead else contextlib.nullcontext() as log_file:
        writer = csv.DictWriter(log_file, fieldnames=LOG_FIELDS) if lead else None
        if lead and new_log:
            writer.writeheader()
        bar = progress(_unwrap_worker_errors(loader), total=total - start, initial=0,
                   desc=f"train {out.parent.name}", mininterval=2, disable=not lead)
        for step, item in enumerate(bar, start=start):
            lr = set_poly_lr(optimizer, step, total, params["poly_power"])
            image = item["image"].to(device)
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
                if selection == "adaptive" and step < params["selection_warmup"]:
                    selection = "naive"
                sal = item["saliency"].to(device)
                loss_sal = saliency_loss(cam, sal, label, params["tau"], params["lam"],
                                         selection=selection, background_classes=job.bg_idx)[0]
                fg_share = foreground_share(cam, sal, label, params["tau"], params["selection"], job.bg_idx)
                fg_share = f"{fg_share:.4f}"
            loss = loss_cls + loss_sal
            if world == 1:
                shown = (loss.item(), loss_cls.item(), loss_sal.item())
            else:
                # the global batch's losses: the mean of the ranks' means (equal local batches)
                values = torch.stack([loss.detach(), loss_cls.detach(), loss_sal.detach()])
                torch.distributed.all_reduce(values)
                shown = tuple((values / world).tolist())
            if not math.isfinite(shown[0]):
                kept = (f"the last good checkpoint is kept in {ckpt}" if ckpt.is_file()
                        else "no checkpoint was written yet")
                raise EpsError(f"{out.parent}: loss became {shown[0]} at iteration {step + 1}; {kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            if not lead:
                continue
            writer.writerow({
                "iteration": done, "loss": f"{shown[0]:.6f}", "loss_cls": f"{shown[1]:.6f}",
                "loss_sal": f"{shown[2]:.6f}", "fg_share": fg_share, "lr": f"{lr:.6g}",
                "seconds": f"{time.time() - t0:.2f}",
            })
            bar.set_postfix(loss=f"{shown[0]:.4f}", lr=f"{lr:.4g}")
            if done % int(params["checkpoint_every"]) == 0 or done == total:
                log_file.flush()
                _save_checkpoint(ckpt, model, optimizer, done, job.run)
    if not lead:
        return
    meta = {
        "backbone": params["backbone"], "num_classes": len(job.classes), "background": eps_loss,
        "classes": job.classes, "dataset": job.dataset, "params": params,
        "init": params["weights"] or ("imagenet (installed package)" if params["backbone"] in PACKAGED_WEIGHTS
                                      else "scratch"),
    }
    with atomic_path(out.parent / "train_log.csv") as tmp:
        tmp.write_bytes(log_path.read_bytes())
    write_json(out.with_suffix(".json"), meta)
    with atomic_path(out) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    _finish_checkpoints(work, ckpt, log_path)


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


def _unwrap_worker_errors(loader):
    """Iterate `loader`; a user error raised in a DataLoader worker (a corrupt image) reaches
    the main process wrapped in the worker's traceback: re-raise it as its own one line."""
    batches = iter(loader)
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except EpsError as exc:
            text = str(exc).strip()
            if "DataLoader worker" not in text:
                raise
            last = text.splitlines()[-1]  # "eps.errors.EpsError: <path>: <problem>"
            raise EpsError(last.split("EpsError: ", 1)[-1]) from None
        yield item


def _truncate_log(log_path: Path, iteration: int, fields=LOG_FIELDS) -> None:
    """Keep the log rows 1..`iteration` of the checkpoint a run resumes from.

    The file may end in a partly written line (a killed process flushes mid-line), so rows
    are kept while they are numbered 1, 2, ... and complete, not by comparing numbers.
    """
    if not log_path.exists():
        return
    rows = []
    with open(log_path, newline="") as f:
        for r in csv.DictReader(f):
            if len(rows) == iteration or r.get("iteration") != str(len(rows) + 1) or None in r.values():
                break
            rows.append(r)
    with atomic_path(log_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def load_classifier(path, device="cpu"):
    """Rebuild a trained classifier from `classifier.pt` (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise EpsError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EpsError(f"{path}: cannot load classifier ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "state_dict" not in state or "meta" not in state:
        raise EpsError(f"{path}: not an eps classifier file (expected keys state_dict and meta)")
    meta = state["meta"]
    needed = ("backbone", "num_classes", "background")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise EpsError(f"{path}: not an eps classifier file (meta lacks {', '.join(needed)})")
    model = build_classifier(meta["backbone"], meta["num_classes"], background=meta["background"])
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        problem = " ".join(str(exc).split())
        if len(problem) > 300:
            problem = problem[:297] + "..."
        raise EpsError(f"{path}: weights do not fit the {meta['backbone']} classifier ({problem})") from None
    return model.to(device).eval(), meta
