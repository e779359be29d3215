"""The files of the saliency networks pfan and dss: reading one (an eps file or the authors'
state_dict), checking it fits the network, writing one. Shared by the networks and their
training (``eps.saliency.supervised``) without either importing the other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eps.errors import file_error

FORMAT = "eps.saliency-network"
FORMAT_VERSION = 1
EXPECTED_FILES = {
    "pfan": "the authors' Keras .h5, or a .pt written by eps train-saliency",
    "dss": "a DSS-pytorch .pth state_dict, or a .pt written by eps train-saliency",
}


def read_model_file(path, method: str) -> tuple[dict, bool]:
    """torch.load (weights_only) a weights file: (state, True) for an eps file of `method`,
    (state_dict, False) for another state_dict (unwrapped from 'state_dict', 'module.' removed)."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable / unsafe files
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise file_error(path, f"cannot read {method} weights (expected {EXPECTED_FILES[method]}; "
                         f"torch.load: {reason})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("method") != method:
            raise file_error(path, f"an eps {obj.get('method')} network, not {method}")
        return dict(obj["state_dict"]), True
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise file_error(path, f"not a state_dict (expected {EXPECTED_FILES[method]})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj), False


def check_fit(path, state: dict, model, name: str) -> dict:
    """`state` with exactly `model`'s names and shapes (num_batches_tracked optional), or a one-line error."""
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    for key in own:
        if key not in state:
            raise file_error(path, f"weights do not fit {name}: missing tensor {key}")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise file_error(path, f"weights do not fit {name}: tensor {key} has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(own[key].shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise file_error(path, f"weights do not fit {name}: unexpected tensor {extra[0]}")
    return state


def save_model(model, method: str, path, meta: dict) -> Path:
    """Write an eps saliency network file (atomic)."""
    from eps.data.io import atomic_path

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, "method": method,
                    "state_dict": state, "meta": meta}, tmp)
    return Path(path)
