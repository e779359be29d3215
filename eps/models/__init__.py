"""Classifier networks (ResNet-38 with the official names, a small CPU backbone) and
safe weight loading."""

from __future__ import annotations

import torch

from eps.errors import EpsError
from eps.models.classifier import Classifier, build_classifier

__all__ = ["Classifier", "build_classifier", "load_weights"]


def _list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a state_dict file into ``model``, failing with one clear line if it does not fit.

    Loads with ``weights_only=True`` (no arbitrary code from pickles). Accepts a plain
    state_dict or a checkpoint dict holding it under "model" or "state_dict".
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable / unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EpsError(f"{path}: cannot load weights ({reason})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise EpsError(f"{path}: not a state_dict (expected a dict of parameter tensors)")

    own = model.state_dict()
    problems = []
    missing = own.keys() - obj.keys()
    unexpected = obj.keys() - own.keys()
    mismatched = [k for k in own.keys() & obj.keys() if own[k].shape != obj[k].shape]
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if mismatched:
        shown = [f"{k} {tuple(obj[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(mismatched)]
        problems.append(f"shape mismatch (file vs model): {_list(shown)}")
    if problems:
        raise EpsError(f"{path}: weights do not fit the model: " + "; ".join(problems))
    model.load_state_dict(obj, strict=True)
    return model
