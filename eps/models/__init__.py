"""Classifier networks (ResNet-38 with the official names, a small CPU backbone) and
safe weight loading from any supported weights format (see eps.models.convert)."""

from __future__ import annotations

import sys

import torch

from eps.errors import EpsError
from eps.models.classifier import Classifier, build_classifier
from eps.models.convert import convert_weights, read_weights, short_list

__all__ = ["Classifier", "build_classifier", "convert_weights", "load_weights", "read_weights"]

HEAD_PREFIX = "fc8."  # the classifier head: new (not loaded) when loading backbone weights


def _stderr(line: str) -> None:
    print(f"eps: note: {line}", file=sys.stderr, flush=True)


def load_weights(model: torch.nn.Module, path, *, backbone_only: bool = False,
                 report=_stderr) -> torch.nn.Module:
    """Load a weights file into ``model``, failing with one clear line if it does not fit.

    Any format of ``eps.models.convert`` loads: an MXNet ``.params`` file (read without
    MXNet), a PyTorch state_dict or a checkpoint dict holding one under "state_dict" or
    "model" (``torch.load(..., weights_only=True)``; a DataParallel ``module.`` prefix is
    removed), official EPS / PSA ResNet-38 checkpoints (unused heads dropped), torchvision
    and DeepLab ResNet-101 files. Names must then match the model exactly: missing keys,
    unexpected keys and shape mismatches are errors (``num_batches_tracked`` buffers absent
    from older files keep the model's values). ``backbone_only``: the head (``fc8``) is
    neither taken from the file nor required in it, for ImageNet / other-task
    initialisations. ``report`` receives one line per conversion step (renames, dropped
    heads); pass ``None`` to silence it. A failed load leaves the model unchanged.
    """
    weights = read_weights(path, validate=False)
    state = dict(weights.state)
    notes = list(weights.notes)
    own = model.state_dict()
    if backbone_only:
        head = [k for k in state if k.startswith(HEAD_PREFIX)]
        for k in head:
            del state[k]
        if head:
            notes.append(f"ignored the file's head ({short_list(head)}): backbone only")
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]

    problems = []
    missing = own.keys() - state.keys()
    if backbone_only:
        missing = {k for k in missing if not k.startswith(HEAD_PREFIX)}
    unexpected = state.keys() - own.keys()
    mismatched = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing:
        problems.append(f"missing keys: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_list(unexpected)}")
    if mismatched:
        shown = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(mismatched)]
        problems.append(f"shape mismatch (file vs model): {short_list(shown)}")
    if problems:
        layout = "" if weights.layout == "unknown" else f" (file holds {weights.description})"
        raise EpsError(f"{path}: weights do not fit the model{layout}: " + "; ".join(problems))
    model.load_state_dict(state, strict=not backbone_only)
    if report is not None:
        for line in notes:
            report(f"{path}: {line}")
    return model

from eps.models.deeplab import build_segmenter  # noqa: E402

__all__ += ["build_segmenter"]
