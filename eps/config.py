"""Stage parameters: what a rule passes to a subcommand, merged over documented defaults.

A rule passes exactly the config sub-block its stage uses (as JSON), so Snakemake reruns a
stage when, and only when, one of its own parameters changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from eps.errors import EpsError

# Classifier training defaults: the small CPU setting. The official VOC setting is the
# `voc12` preset (configs/voc12.yaml): resnet38, 20k iterations, batch 8, crop 448, lr 0.01,
# weight decay 5e-4, momentum 5e-4 (the official PolyOptimizer's quirk), tau 0.4, lambda 0.5.
TRAIN_DEFAULTS = {
    "loss": "eps",  # "eps" (C+1 outputs, classification + saliency loss) or "cam" (C outputs)
    "backbone": "small",
    "weights": None,  # a local backbone weights file (state_dict); None = from scratch
    "tau": 0.4,
    "lam": 0.5,
    "selection": "adaptive",  # adaptive | naive | predefined
    "background_classes": [],  # class names sent to background by `predefined`
    "selection_warmup": 0,  # adaptive: naive selection for this many first iterations (0 = official)
    "iterations": 300,
    "batch_size": 8,
    "crop": 96,
    "resize_long": [88, 112],  # random resize of the long side before cropping
    "lr": 0.01,
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "poly_power": 0.9,
    "seed": 0,
    "checkpoint_every": 100,
    "num_workers": 0,
    "device": "auto",
    "gpus": 1,  # > 1: DistributedDataParallel over this many processes (one GPU each; gloo on CPU)
    "precision": "float32",  # bf16: the forward under bfloat16 autocast (CPUs with AVX-512 BF16 / AMX, GPUs)
}

INFER_DEFAULTS = {
    "scales": [0.5, 1.0, 1.5, 2.0],
    "flip": True,
    "batch_size": 8,
    "device": "auto",
    "amp": False,  # CUDA only: float16 autocast
    "precision": "float32",  # bf16: bfloat16 autocast (CPUs with AVX-512 BF16 / AMX, GPUs); wins over amp
    "keep_background": False,  # store the EPS background map too (no eps stage reads it)
}

MASK_DEFAULTS = {"bg_threshold": 0.20}


def load_params(value: str | None, defaults: dict, what: str) -> dict:
    """Merge a JSON string, or a JSON/YAML file path, over `defaults`; unknown keys are errors."""
    given: dict = {}
    if value:
        if os.path.isfile(value):
            try:
                with open(value) as f:
                    given = yaml.safe_load(f) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                problem = " ".join(str(exc).split())
                raise EpsError(f"{value}: cannot read {what} parameters ({problem})") from None
            source = value
        else:
            try:
                given = json.loads(value)
            except json.JSONDecodeError as exc:
                shown = value if len(value) <= 80 else value[:77] + "..."
                raise EpsError(f"--params {shown!r}: not valid JSON and not a file ({exc})") from None
            source = "--params"
        if not isinstance(given, dict):
            raise EpsError(f"{source}: {what} parameters must be a mapping")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise EpsError(f"{source}: unknown {what} parameter(s) {unknown}; known: {sorted(defaults)}")
    check_block(given, what, source if value else "--params")
    params = dict(defaults)
    params.update(given)
    return params


SCHEMA = Path(__file__).with_name("config.schema.yaml")  # the workflow validates the config with it
# a command's parameters -> the config block of the schema that describes them
SCHEMA_BLOCKS = {"classifier": ("classifier",), "infer": ("infer",), "pseudo_masks": ("pseudo_masks",),
                 "crf": ("crf",), "segmenter": ("segmenter",), "predict": ("segmenter", "predict"),
                 "report": ("report",)}
_SCHEMA_CACHE: dict = {}


def check_block(given: dict, what: str, source: str) -> None:
    """Check a command's parameters as the workflow checks the config (eps/config.schema.yaml):
    one rule for both, so `--params '{"iterations": -5}'` is refused as `iterations: -5` is."""
    import jsonschema

    path = SCHEMA_BLOCKS.get(what)
    if path is None or not given:
        return
    if "schema" not in _SCHEMA_CACHE:
        _SCHEMA_CACHE["schema"] = yaml.safe_load(SCHEMA.read_text())
    block = _SCHEMA_CACHE["schema"]
    for key in path:
        block = block["properties"][key]
    # unknown keys were checked against the command's defaults (some are command-only)
    block = {k: v for k, v in block.items() if k not in ("required", "default", "additionalProperties")}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(block).iter_errors(given))
    if error is not None:
        key = ".".join([".".join(path), *(str(k) for k in error.absolute_path)])
        raise EpsError(f"{source}: {key}: {' '.join(error.message.split())}")


def choose_device(name: str = "auto"):
    """`auto` picks CUDA when present, else CPU; an explicit `cuda` without a GPU is an error.

    With more than one visible CUDA device, `auto` claims a free device slot (eps.gpus), so
    N concurrent jobs (`snakemake --resources gpu=N`) run on N different GPUs; the slot is
    held until the process exits. `cuda:N` names a device explicitly and claims nothing.
    """
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if count > 1:
            from eps.gpus import claim_device

            return torch.device(f"cuda:{claim_device(count)}")
        return torch.device("cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EpsError(f"device: {name!r} requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise EpsError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    return torch.device(name)


PRECISIONS = ("float32", "bf16")


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them bfloat16 runs on emulated kernels, slower than float32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(precision: str, device, key: str, amp: bool = False):
    """The autocast dtype of a stage: bfloat16 for `bf16`, float16 for `amp` on CUDA, else None.

    `bf16` where the hardware has no bfloat16 arithmetic is refused in one line rather than
    run slowly (`key` names the config key in the message)."""
    import torch

    if precision not in PRECISIONS:
        raise EpsError(f"{key}: unknown value {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if precision == "bf16":
        if device.type == "cpu" and not cpu_has_bf16():
            raise EpsError(f"{key}: bf16 needs a CPU with AVX-512 BF16 or AMX instructions and this one has "
                           "neither (bfloat16 would run slower than float32 here); use float32")
        if device.type == "cuda":
            with torch.cuda.device(device):
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            if not native:
                raise EpsError(f"{key}: bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0 or "
                               "later) and this one has none; use float32 (or amp)")
        return torch.bfloat16
    if amp and device.type == "cuda":
        return torch.float16
    return None


def env_threads() -> int | None:
    """EPS_THREADS (Snakemake passes a job's `threads` so), checked; None when unset."""
    value = os.environ.get("EPS_THREADS")
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise EpsError(f"EPS_THREADS: expected a positive whole number of threads, got {value!r}")
    return threads


def usable_cores() -> int:
    """The cores this job has: EPS_THREADS (Snakemake's `threads`), else the ones the process may run on."""
    threads = env_threads()
    if threads:
        return threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads() -> None:
    """Use the CPU count the scheduler granted (Snakemake passes it as EPS_THREADS)."""
    import torch

    threads = env_threads()
    if threads:
        torch.set_num_threads(threads)


def write_json(path, data) -> None:
    """Write JSON atomically."""
    from eps.data.io import atomic_path

    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
