"""Reading released weights without the frameworks they came from, and renaming them.

Formats (detected from the file's first bytes, not its name):

- MXNet NDArray list files (``.params``; the official ImageNet ResNet-38
  ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``), parsed here byte by byte: no MXNet.
- PyTorch files (zip or legacy pickle), always ``torch.load(..., weights_only=True)``:
  official EPS / PSA ResNet-38 checkpoints, torchvision ImageNet VGG16 / ResNet-101
  state_dicts, the Caffe-converted DeepLab ResNet-101 initialisations of PyTorch DeepLab
  ports, eps's own checkpoints and classifier files.

Every layout eps recognises is renamed to one target naming (ResNet-38: the official
PyTorch names eps uses; ResNet-101: torchvision's; VGG16: torchvision's) and checked
against that architecture's names and shapes. Heads the eps models do not use (the MXNet
1000-way ``linear1000``, PSA AffNet's ``f8_*``/``f9``, DeepLab's ASPP / ``fc``) are dropped
and reported. See docs/weights.md for the name mappings.

The MXNet NDArray list layout (little-endian), as written by MXNet's ``NDArray::Save``:

    uint64 0x112 (list magic), uint64 reserved
    uint64 n, then n arrays, each:
        uint32 magic: 0xF993FAC9 (V2: int32 storage type follows) or 0xF993FAC8 (V1);
                      anything else is a legacy header whose magic is the ndim
        shape: V1/V2 int32 ndim + ndim int64 dims; legacy ndim uint32 dims
        (no more fields if the shape is empty / unknown)
        int32 dev_type, int32 dev_id (context, ignored)
        int32 type flag (0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8,
                         6 int64, 7 bool)
        raw data, C order
    uint64 k (0 or n), then k names, each uint64 length + UTF-8 bytes
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eps.errors import EpsError

MX_LIST_MAGIC = 0x112
MX_V1_MAGIC = 0xF993FAC8
MX_V2_MAGIC = 0xF993FAC9
MX_DTYPES = {0: "<f4", 1: "<f8", 2: "<f2", 3: "u1", 4: "<i4", 5: "i1", 6: "<i8", 7: "?"}
MX_SPARSE = {1: "row_sparse", 2: "csr"}
_MAX_NDIM = 32

# layout ids -> human names used in reports and errors
LAYOUTS = {
    "mxnet-resnet38": "MXNet ResNet-38 (ImageNet)",
    "resnet38": "ResNet-38 (EPS / PSA PyTorch)",
    "deeplab-resnet101": "DeepLab Caffe ResNet-101 (renamed to torchvision ResNet-101)",
    "torchvision-resnet101": "torchvision ResNet-101",
    "torchvision-vgg16": "torchvision VGG16",
    "efficientnet-lite0": "EfficientNet-Lite0 (ImageNet; names kept as they are)",
    "unknown": ("a state_dict of no layout eps converts (not ResNet-38, DeepLab or torchvision "
                "ResNet-101, VGG16, EfficientNet-Lite0): names kept as they are"),
}
# the architecture whose names / shapes each layout is renamed to and checked against
TARGET = {"mxnet-resnet38": "resnet38", "resnet38": "resnet38",
          "deeplab-resnet101": "resnet101", "torchvision-resnet101": "resnet101",
          "torchvision-vgg16": "vgg16"}
TARGET_NAMES = {"resnet38": "ResNet-38", "resnet101": "ResNet-101", "vgg16": "VGG16"}


def fit_problems(own: dict, state: dict) -> list[str]:
    """Why `state` does not load strictly into a module whose state_dict is `own` (empty: it fits).

    `num_batches_tracked` buffers absent from `state` (older files) take the module's values
    (filled into `state`).
    """
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                  for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (file vs model): {short_list(mismatched)}")
    return problems


def short_list(keys, limit: int = 5) -> str:
    """'a, b, c, d, e (+3 more)': a sorted, bounded list for one-line messages."""
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def read_model_file(path, what: str):
    """The contents of a model file eps wrote (`classifier.pt`, `model.pt`), torch.load weights_only;
    a missing or unreadable file is a one-line error naming it and `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise EpsError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EpsError(f"{path}: cannot load {what} ({type(exc).__name__}: {exc})") from None


def load_fitting(model, state_dict, path, what: str) -> None:
    """`model.load_state_dict(state_dict)`, or one line saying the weights of `path` do not fit `what`."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as exc:
        problem = " ".join(str(exc).split())
        if len(problem) > 300:
            problem = problem[:297] + "..."
        raise EpsError(f"{path}: weights do not fit {what} ({problem})") from None


@dataclass
class Weights:
    """A state_dict read from a file and renamed to its target architecture's names."""

    state: dict  # name -> tensor, in the target architecture's order where known
    layout: str  # a key of LAYOUTS
    notes: list = field(default_factory=list)  # what was done, one line each
    dropped: list = field(default_factory=list)  # heads removed (file names)
    missing: list = field(default_factory=list)  # required target names absent (allow_missing)

    @property
    def description(self) -> str:
        return LAYOUTS[self.layout]

    @property
    def target(self) -> str | None:
        return TARGET.get(self.layout)


# --------------------------------------------------------------------------- file reading

def _head_bytes(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise EpsError(f"{path}: cannot load weights (file not found)") from None
    except OSError as exc:
        raise EpsError(f"{path}: cannot load weights ({exc.strerror or type(exc).__name__})") from None


def is_mxnet_file(path) -> bool:
    """True when the file starts with the MXNet NDArray list magic number."""
    return _head_bytes(Path(path)) == struct.pack("<Q", MX_LIST_MAGIC)


class _Reader:
    """Bounded little-endian reads from a file, failing with '<path>: truncated ...'."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise EpsError(f"{self.path}: truncated MXNet file: {what} needs {n} bytes, "
                           f"{self.left()} left at offset {self.f.tell()}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        return struct.unpack(fmt, self.f.read(n))

    def array(self, dtype: str, shape: tuple, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        count = math.prod(shape)  # Python ints: a corrupt shape cannot overflow
        self.need(count * dt.itemsize, what)
        out = np.empty(shape, dtype=dt)
        if out.nbytes and self.f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise EpsError(f"{self.path}: truncated MXNet file: {what} could not be read")
        return out


def _read_mx_array(r: _Reader, i: int):
    what = f"array #{i}"
    (magic,) = r.unpack("<I", f"{what} header")
    if magic in (MX_V1_MAGIC, MX_V2_MAGIC):
        if magic == MX_V2_MAGIC:
            (stype,) = r.unpack("<i", f"{what} storage type")
            if stype != 0:
                kind = MX_SPARSE.get(stype, f"storage type {stype}")
                raise EpsError(f"{r.path}: {what} is a {kind} NDArray; only dense arrays are supported")
        (ndim,) = r.unpack("<i", f"{what} shape")
        if ndim > _MAX_NDIM:
            raise EpsError(f"{r.path}: {what} has a bad header (ndim {ndim}); not a valid MXNet file")
        shape = r.unpack(f"<{ndim}q", f"{what} shape") if ndim > 0 else ()
    elif magic <= _MAX_NDIM:  # legacy header: the magic is the number of dims
        ndim = magic
        shape = r.unpack(f"<{ndim}I", f"{what} shape") if ndim else ()
    else:
        raise EpsError(f"{r.path}: bad magic number 0x{magic:08x} for {what} "
                       f"(expected 0x{MX_V2_MAGIC:08x} or 0x{MX_V1_MAGIC:08x})")
    if ndim <= 0 or any(d < 0 for d in shape):
        return None  # an empty (uninitialised) NDArray: no more fields follow
    r.unpack("<ii", f"{what} context")
    (flag,) = r.unpack("<i", f"{what} type flag")
    if flag not in MX_DTYPES:
        raise EpsError(f"{r.path}: {what} has unsupported type flag {flag} "
                       f"(supported: {', '.join(map(str, MX_DTYPES))})")
    return r.array(MX_DTYPES[flag], tuple(shape), f"{what} data {tuple(shape)}")


def read_mxnet_params(path) -> dict:
    """Read an MXNet NDArray list file (``.params``) into {name: numpy array}, file order.

    Names are as stored (``arg:res2a_branch2a_weight``, ``aux:bn7_moving_var`` ...).
    Raises EpsError naming the file for a bad magic number, a truncated file, sparse or
    unnamed arrays, or bytes left over after the name list.
    """
    path = Path(path)
    head = _head_bytes(path, 8)
    if len(head) < 8:
        raise EpsError(f"{path}: cannot load weights: {len(head)} bytes, too short for an "
                       "MXNet NDArray file")
    (magic,) = struct.unpack("<Q", head)
    if magic != MX_LIST_MAGIC:
        raise EpsError(f"{path}: cannot load weights: bad magic number 0x{magic:016x} "
                       f"(an MXNet NDArray file starts with 0x{MX_LIST_MAGIC:x})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        r.unpack("<QQ", "header")
        (count,) = r.unpack("<Q", "array count")
        if count * 4 > r.left():  # every array takes at least its 4-byte magic
            raise EpsError(f"{path}: truncated or corrupt MXNet file: {count} arrays announced "
                           f"in {size} bytes")
        arrays = [_read_mx_array(r, i) for i in range(count)]
        (nnames,) = r.unpack("<Q", "name count")
        if nnames != count:
            if nnames == 0:
                raise EpsError(f"{path}: the {count} arrays have no names (an NDArray list, "
                               "not a dict of parameters)")
            raise EpsError(f"{path}: corrupt MXNet file: {nnames} names for {count} arrays")
        names = []
        for i in range(nnames):
            (length,) = r.unpack("<Q", f"name #{i} length")
            r.need(length, f"name #{i}")
            raw = f.read(length)
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise EpsError(f"{path}: corrupt MXNet file: name #{i} is not UTF-8") from None
        if r.left():
            raise EpsError(f"{path}: corrupt MXNet file: {r.left()} unexpected bytes after the name list")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise EpsError(f"{path}: duplicate array names: {short_list(dup)}")
    empty = [n for n, a in zip(names, arrays) if a is None]
    if empty:
        raise EpsError(f"{path}: arrays without data (uninitialised NDArrays): {short_list(empty)}")
    return dict(zip(names, arrays))


def read_torch_state(path) -> tuple[dict, list]:
    """torch.load (weights_only) a state_dict file; unwrap checkpoints and DataParallel.

    Accepts a plain state_dict or a dict holding it under "state_dict" or "model" (eps
    classifier files and checkpoints, many released checkpoints). A ``module.`` prefix on
    every key (saved from DataParallel) is removed. Returns (state, notes).
    """
    path = Path(path)
    head = _head_bytes(path, 16)  # clear 'file not found' before torch's own message
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        shown = head[:16].decode("latin-1").encode("unicode_escape").decode()
        raise EpsError(f"{path}: not a weights file: neither an MXNet NDArray list nor a PyTorch file "
                       f"(zip archive or pickle); it starts with '{shown}'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable / unsafe files
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise EpsError(f"{path}: cannot load weights: a PyTorch file torch.load (weights_only) refused "
                       f"or could not read ({reason})") from None
    notes = []
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and ("backbone" in meta or "model" in meta):
        kind = (f"an eps {meta['backbone']} classifier" if "backbone" in meta
                else f"an eps {meta['model']} segmenter")
        notes.append(f"{kind} file: its state_dict")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                notes.append(f"took the state_dict under {key!r}")
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        got = type(obj).__name__ if not isinstance(obj, dict) else (
            "an empty dict" if not obj else "a dict with non-tensor values")
        raise EpsError(f"{path}: not a state_dict (expected a dict of parameter tensors, got {got})")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("removed the DataParallel 'module.' prefix")
    return state, notes


# ------------------------------------------------------------- target names and shapes

_SPEC_CACHE: dict = {}


def expected_shapes(arch: str) -> dict:
    """{name: (shape with -1 for any size, required)} of a target architecture, in order.

    ``resnet38``: eps's ResNet-38 trunk (official names) plus an optional ``fc8.weight``
    (any number of classes); ``resnet101`` / ``vgg16``: torchvision's ImageNet models,
    their classifier (``fc.*`` / ``classifier.*``) optional. ``num_batches_tracked``
    buffers are always optional.
    """
    if arch not in _SPEC_CACHE:
        _SPEC_CACHE[arch] = {"resnet38": _resnet38_spec, "resnet101": _resnet101_spec,
                             "vgg16": _vgg16_spec}[arch]()
    return _SPEC_CACHE[arch]


def _resnet38_spec() -> dict:
    from eps.models.resnet38 import ResNet38

    with torch.device("meta"):
        trunk = ResNet38()
    spec = {k: (tuple(v.shape), not k.endswith("num_batches_tracked"))
            for k, v in trunk.state_dict().items()}
    spec["fc8.weight"] = ((-1, ResNet38.out_channels, 1, 1), False)
    return spec


def _bn(spec: dict, name: str, ch: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        spec[f"{name}.{p}"] = ((ch,), True)
    spec[f"{name}.num_batches_tracked"] = ((), False)


def _resnet101_spec() -> dict:
    spec = {"conv1.weight": ((64, 3, 7, 7), True)}
    _bn(spec, "bn1", 64)
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 23, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            spec[f"{p}.conv1.weight"] = ((planes, inplanes, 1, 1), True)
            _bn(spec, f"{p}.bn1", planes)
            spec[f"{p}.conv2.weight"] = ((planes, planes, 3, 3), True)
            _bn(spec, f"{p}.bn2", planes)
            spec[f"{p}.conv3.weight"] = ((planes * 4, planes, 1, 1), True)
            _bn(spec, f"{p}.bn3", planes * 4)
            if b == 0:
                spec[f"{p}.downsample.0.weight"] = ((planes * 4, inplanes, 1, 1), True)
                _bn(spec, f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    spec["fc.weight"] = ((-1, 2048), False)
    spec["fc.bias"] = ((-1,), False)
    return spec


def _vgg16_spec() -> dict:
    spec, idx, ch = {}, 0, 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            idx += 1
            continue
        spec[f"features.{idx}.weight"] = ((v, ch, 3, 3), True)
        spec[f"features.{idx}.bias"] = ((v,), True)
        ch, idx = v, idx + 2
    for i, (out, inp) in {0: (4096, 512 * 7 * 7), 3: (4096, 4096), 6: (-1, 4096)}.items():
        spec[f"classifier.{i}.weight"] = ((out, inp), False)
        spec[f"classifier.{i}.bias"] = ((out,), False)
    return spec


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _shape_ok(got: tuple, want: tuple) -> bool:
    return len(got) == len(want) and all(w == -1 or g == w for g, w in zip(got, want))


# ------------------------------------------------------------------- name mappings

_MX_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_MX_BLOCK = re.compile(r"(bn|res)(\d)([a-z])(\d*)_(branch\w+?)_(gamma|beta|moving_mean|moving_var|weight)$")


def mxnet_resnet38_name(name: str) -> str | None:
    """The eps / PSA PyTorch name of an official MXNet ResNet-38 array, or None if unknown.

    ``arg:``/``aux:`` prefixes are dropped; ``gamma``/``beta``/``moving_mean``/``moving_var``
    become ``weight``/``bias``/``running_mean``/``running_var``; block ``<stage>a`` is
    ``b<stage>`` and ``<stage>b<k>`` is ``b<stage>_<k>``; ``bn<block>_<branch>`` is
    ``<block>.bn_<branch>`` and ``res<block>_<branch>`` is ``<block>.conv_<branch>``.
    """
    name = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    if name == "conv1a_weight":
        return "conv1a.weight"
    m = re.fullmatch(r"bn7_(gamma|beta|moving_mean|moving_var)", name)
    if m:
        return f"bn7.{_MX_BN[m.group(1)]}"
    m = _MX_BLOCK.fullmatch(name)
    if not m:
        return None
    kind, stage, letter, k, branch, param = m.groups()
    if letter == "a" and not k:
        block = f"b{stage}"
    elif letter == "b" and k:
        block = f"b{stage}_{k}"
    else:
        return None
    if kind == "bn" and param in _MX_BN:
        return f"{block}.bn_{branch}.{_MX_BN[param]}"
    if kind == "res" and param == "weight":
        return f"{block}.conv_{branch}.weight"
    return None


_DL_UNIT = {"reduce": ("conv1", "bn1"), "conv3x3": ("conv2", "bn2"), "increase": ("conv3", "bn3"),
            "shortcut": ("downsample.0", "downsample.1"), "proj": ("downsample.0", "downsample.1")}
_DL_KEY = re.compile(r"layer(\d+)\.block(\d+)\.(reduce|conv3x3|increase|shortcut|proj)\.(conv|bn)\.(\w+)")


def deeplab_resnet101_name(name: str) -> str | None:
    """The torchvision ResNet-101 name of a DeepLab (Caffe-converted) key, or None.

    ``layer1.conv1.conv`` -> ``conv1``, ``layer1.conv1.bn`` -> ``bn1``;
    ``layer<L>.block<j>.{reduce,conv3x3,increase}.{conv,bn}`` ->
    ``layer<L-1>.<j-1>.{conv,bn}{1,2,3}``; the projection shortcut
    (``shortcut`` or, in older ports, ``proj``) ``.conv`` / ``.bn`` -> ``downsample.0`` /
    ``downsample.1``. Keys are taken after any ``base.`` / ``scale.`` (MSC) prefix.
    """
    m = re.fullmatch(r"layer1\.conv1\.(conv|bn)\.(\w+)", name)
    if m:
        return f"{'conv1' if m.group(1) == 'conv' else 'bn1'}.{m.group(2)}"
    m = _DL_KEY.fullmatch(name)
    if not m:
        return None
    layer, block, unit, kind, param = m.groups()
    if not (2 <= int(layer) <= 5 and int(block) >= 1):
        return None
    conv, bn = _DL_UNIT[unit]
    return f"layer{int(layer) - 1}.{int(block) - 1}.{conv if kind == 'conv' else bn}.{param}"


_R38_HEADS_KEPT = {"fc8"}
_MX_HEADS = ("linear", "fc")  # MXNet classifier heads (the ImageNet 1000-way linear1000)
_DL_HEADS = {"aspp", "fc"}
_DL_PATTERN = re.compile(r"layer\d+\.(conv1\.(conv|bn)|block\d+)\.")


def detect_layout(state: dict) -> str:
    """Which known layout a (prefix-stripped) PyTorch state_dict has; "unknown" if none."""
    r38_top = {_top(k) for k in expected_shapes("resnet38")} - _R38_HEADS_KEPT
    keys = list(state)
    if any(_top(k) in r38_top for k in keys):
        return "resnet38"
    if any(_DL_PATTERN.match(_strip_msc(k)) for k in keys):
        return "deeplab-resnet101"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "torchvision-resnet101"
    if any(k.startswith("features.") for k in keys):
        return "torchvision-vgg16"
    if "_conv_stem.weight" in state:
        return "efficientnet-lite0"
    return "unknown"


def _strip_msc(key: str) -> str:
    for prefix in ("base.", "scale."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _rename(path, state: dict, layout: str) -> tuple[dict, list, list]:
    """Rename to target names; returns (renamed, dropped heads, notes)."""
    out, dropped, notes, unknown = {}, [], [], []
    target = TARGET.get(layout)
    spec = expected_shapes(target) if target else {}
    if layout == "mxnet-resnet38":
        for name, value in state.items():
            new = mxnet_resnet38_name(name)
            if new is not None:
                out.setdefault(new, []).append((name, value))
            elif name.split(":", 1)[-1].startswith(_MX_HEADS):
                dropped.append(name)
            else:
                unknown.append(name)
        twice = [f"{' and '.join(n for n, _ in v)} -> {k}" for k, v in out.items() if len(v) > 1]
        if twice:
            raise EpsError(f"{path}: several arrays map to the same name: {short_list(twice, 2)}")
        out = {k: v[0][1] for k, v in out.items()}
        notes.append("renamed MXNet arrays to the ResNet-38 PyTorch names")
    elif layout == "deeplab-resnet101":
        if all(k.startswith(("base.", "scale.")) for k in state):
            notes.append("removed the MSC 'base.' / 'scale.' prefix")
        for name, value in state.items():
            key = _strip_msc(name)
            new = deeplab_resnet101_name(key)
            if new is not None:
                out[new] = value
            elif _top(key) in _DL_HEADS:
                dropped.append(name)
            else:
                unknown.append(name)
        notes.append("renamed DeepLab Caffe ResNet-101 keys to torchvision ResNet-101 names")
    elif layout in ("unknown", "efficientnet-lite0"):
        out = dict(state)
    else:  # PyTorch layouts already in target names: drop heads outside the model
        kept_top = {_top(k) for k in spec}
        for name, value in state.items():
            if _top(name) in kept_top:
                out[name] = value
            else:
                dropped.append(name)
    if unknown:
        raise EpsError(f"{path}: unexpected keys for {LAYOUTS[layout]}: {short_list(unknown)}")
    if len(out) < len(state) - len(dropped):
        raise EpsError(f"{path}: several keys map to the same {TARGET_NAMES[target]} name")
    if dropped:
        notes.append(f"dropped {len(dropped)} tensors of heads the eps models do not use: "
                     f"{short_list(dropped)}")
    return out, dropped, notes


def _validate(path, state: dict, layout: str, allow_missing: bool) -> tuple[dict, list]:
    """Check names / shapes against the target; return (state in target order, missing)."""
    target = TARGET.get(layout)
    if target is None:
        return state, []
    spec = expected_shapes(target)
    problems = []
    missing = [k for k, (_, req) in spec.items() if req and k not in state]
    unexpected = [k for k in state if k not in spec]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(s if s != -1 else 'any' for s in spec[k][0])}"
                  for k, v in state.items() if k in spec and not _shape_ok(tuple(v.shape), spec[k][0])]
    if missing and not allow_missing:
        problems.append(f"missing keys: {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {short_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (file vs {TARGET_NAMES[target]}): {short_list(mismatched)}")
    if problems:
        raise EpsError(f"{path}: not valid {LAYOUTS[layout]} weights: " + "; ".join(problems))
    ordered = {k: state[k] for k in spec if k in state}
    return ordered, missing


# ------------------------------------------------------------------------- entry points

def read_weights(path, *, allow_missing: bool = False, validate: bool = True) -> Weights:
    """Read any supported weights file into a renamed, checked state_dict.

    ``allow_missing``: accept files lacking some required names (listed in ``missing``).
    ``validate=False`` skips the check against the target architecture (``load_weights``
    checks against the actual model instead).
    """
    path = Path(path)
    if is_mxnet_file(path):
        arrays = read_mxnet_params(path)
        raw = {k: torch.from_numpy(v) for k, v in arrays.items()}
        layout, notes = "mxnet-resnet38", []
    else:
        head = _head_bytes(path, 8)
        if path.suffix == ".params" and not head.startswith((b"PK\x03\x04", b"\x80")):
            read_mxnet_params(path)  # raises the bad-magic-number error
        raw, notes = read_torch_state(path)
        layout = detect_layout(raw)
    state, dropped, more = _rename(path, raw, layout)
    missing = []
    if validate:
        state, missing = _validate(path, state, layout, allow_missing)
    if not state:
        raise EpsError(f"{path}: no weights left after dropping unused heads")
    return Weights(state=state, layout=layout, notes=notes + more, dropped=dropped, missing=missing)


def convert_weights(src, dst, *, allow_missing: bool = False) -> Weights:
    """Read ``src`` (any supported format), check it, write a plain state_dict to ``dst``.

    ``dst`` is written under a temporary name and renamed when complete, so a failure
    leaves no file; it loads with ``torch.load(dst, weights_only=True)``.
    """
    from eps.data.io import atomic_path

    weights = read_weights(src, allow_missing=allow_missing)
    with atomic_path(dst) as tmp:
        torch.save(weights.state, tmp)
    return weights

