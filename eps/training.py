"""The training loop of every network eps trains: the classifier (`eps.train`), the segmenter
(`eps.segment`) and the supervised saliency networks (`eps.saliency.supervised`).

One loop so that resuming, the CSV log, the NaN check, checkpointing and the final copy behave
the same in all three. A run is keyed (`run_key`) by what changes its weights; a checkpoint
of another key is ignored. Samples are addressed by their position in the whole run
(`PositionSamples`), so a run resumed from a checkpoint draws exactly the samples of an
uninterrupted one and ends with its weights.
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
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eps.data.io import atomic_path
from eps.errors import EpsError
from eps.progress import progress


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


class RankPositions:
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


def run_key(params: dict, neutral=(), **inputs) -> str:
    """What a checkpoint must match to be resumed: the parameters that change the weights
    (all but `neutral`) and the run's inputs (images, classes, masks, init file...)."""
    data = {"params": {k: v for k, v in params.items() if k not in neutral}, **inputs}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(path: Path, model, optimizer, iteration: int, run: str = "") -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "iteration": iteration, "run": run}, tmp)


def resume_checkpoint(ckpt: Path, run: str, model, optimizer, log_path: Path, device, inputs: str,
                      fields, lead: bool = True) -> int:
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
        truncate_log(log_path, start, fields)
        print(f"resuming from {ckpt} at iteration {start}", flush=True)
    return start


def truncate_log(log_path: Path, iteration: int, fields) -> None:
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


def unwrap_worker_errors(loader):
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


def finish_checkpoints(work: Path, ckpt: Path, log_path: Path) -> None:
    """A finished run leaves no checkpoint folder: a rerun (new code, new parameters) trains
    again instead of resuming a finished run; the log was copied beside the model."""
    ckpt.unlink(missing_ok=True)
    log_path.unlink(missing_ok=True)
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def _cell(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def fit(model, optimizer, samples, step, *, total: int, batch_size: int, num_workers: int,
        checkpoint_every: int, work: Path, key: str, inputs: str, fields, lr_at, desc: str, name,
        device, log_copy: Path, save, prefix: str = "", rank: int = 0, world: int = 1, wrap=None,
        show: bool = True) -> None:
    """Train `model` from its checkpoint (if any) to `total` iterations, then `save()` it.

    `step(net, iteration, item)` returns the loss to minimise and the row values of the log
    (`fields` less iteration, lr and seconds; "loss" a float: the one checked for NaN);
    `lr_at(iteration)` sets the optimizer's learning rates and returns the one logged.
    Checkpoints `{prefix}last.pt` and the log `{prefix}train_log.csv` live in `work` until
    the end, when the log is copied to `log_copy`, `save()` writes the model and `work` is
    cleared. With `world` > 1 this is one rank of a data-parallel run: each rank takes its
    slice of every batch, `wrap(model)` gives the network it steps (DistributedDataParallel),
    and only rank 0 writes. `name` prefixes the NaN error.
    """
    lead = rank == 0
    if lead:
        work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{prefix}last.pt"
    log_path = work / f"{prefix}train_log.csv"
    start = resume_checkpoint(ckpt, key, model, optimizer, log_path, device, inputs, fields, lead=lead)
    if world == 1:
        sampler, local = range(start * batch_size, total * batch_size), batch_size
    else:
        sampler, local = RankPositions(start, total, batch_size, rank, world), batch_size // world
    loader = DataLoader(samples, batch_size=local, sampler=sampler, num_workers=num_workers, drop_last=True)
    net = wrap(model) if wrap is not None else model
    net.train()
    new_log = not log_path.exists()
    t0 = time.time()
    with open(log_path, "a", newline="") if lead else contextlib.nullcontext() as log_file:
        writer = csv.DictWriter(log_file, fieldnames=fields) if lead else None
        if lead and new_log:
            writer.writeheader()
        bar = progress(unwrap_worker_errors(loader), total=total - start, desc=desc, mininterval=2,
                       disable=not (lead and show))
        for iteration, item in enumerate(bar, start=start):
            lr = lr_at(iteration)
            loss, values = step(net, iteration, item)
            if not math.isfinite(values["loss"]):
                kept = (f"the last good checkpoint is kept in {ckpt}" if ckpt.is_file()
                        else "no checkpoint was written yet")
                raise EpsError(f"{name}: loss became {values['loss']} at iteration {iteration + 1}; {kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = iteration + 1
            if not lead:
                continue
            writer.writerow({"iteration": done, **{k: _cell(v) for k, v in values.items()},
                             "lr": f"{lr:.6g}", "seconds": f"{time.time() - t0:.2f}"})
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.4g}")
            if done % checkpoint_every == 0 or done == total:
                log_file.flush()
                save_checkpoint(ckpt, model, optimizer, done, key)
    if not lead:
        return
    with atomic_path(log_copy) as tmp:
        tmp.write_bytes(log_path.read_bytes())
    save()
    finish_checkpoints(work, ckpt, log_path)
