"""`csnet`: CSNet (Gao et al., "Highly Efficient Salient Object Detection with 100K
Parameters", ECCV 2020), built to load the authors' released checkpoints.

The network (written from the paper and the checkpoint format):

- Channels are split into branches at scales 1, 1/2, 1/4 (generalised OctConv): branch i
  of a feature has 2^i times the stride of branch 0. A branch convolution maps every input
  branch i to every output branch j (input max-pooled 2^(j-i) times when j > i, output
  upsampled bilinearly 2^(i-j) times when i > j) and sums per output branch; a stride of 2
  average-pools every input branch first. A branch of 0 channels is absent.
- Backbone: an input block (3x3 conv) and four stages of 3, 4, 6, 4 blocks; the first block
  of stages 2-4 has stride 2. Each block is a branch conv (3x3 at a stage's first block and
  the input block, else 1x1) + BN + PReLU per branch, then two depthwise 3x3 convs per
  branch, each + BN + PReLU.
- Head (cross-stage fusion): branch 0 of the outputs of stages 2, 3, 4 (strides 2, 4, 8)
  are the three branches of a 1x1 branch conv + BN + PReLU; each branch then goes through
  five parallel 3x3 convs dilated 1, 2, 4, 8, 16 (concatenated, BN, PReLU), and a 1x1
  branch conv to one branch; a 1x1 conv with bias gives the logit map, upsampled
  bilinearly to the input size.
- The released networks are pruned: the channels of every branch (and of every dilation)
  come from the layer configuration stored beside the weights (the ``.bin`` pickle), not
  from a fixed width. Convolutions with a plain (single-branch) layout and the depthwise
  and dilated convs multiply their stored weights by 100 (the authors' reparametrisation
  for faster convergence); multi-branch convs do not.

Prediction as the authors' test code: RGB in [0, 1] resized to 224 x 224 (scikit-image
``resize``, order 1, mode "reflect", no anti-aliasing: reproduced here in numpy), ImageNet
mean / std, sigmoid of the logit map, resized back the same way, rounded to uint8.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eps.data.imagenet import MEAN, STD
from eps.errors import EpsError, file_error
from eps.saliency import check_rgb, to_uint8

INPUT_SIZE = 224
DILATIONS = (1, 2, 4, 8, 16)
SCALED = 100.0  # the authors' Conv2dX100
BATCH = 8  # images per forward pass in `predict.batch`
WEIGHT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar")


# ------------------------------------------------------------------------------- network

class ScaledConv(nn.Module):
    """A bias-free conv whose stored weight is used x100 (single-branch, depthwise, dilated)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin // groups, kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.folded = None  # (weight, bias) with a following BN folded in, see CSNet.fold

    def fold(self, scale, shift):
        self.folded = ((SCALED * self.weight * scale[:, None, None, None]).contiguous(), shift.contiguous())

    def forward(self, x):
        if self.folded is not None:
            return F.conv2d(x, *self.folded, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(x, SCALED * self.weight, None, self.stride, self.padding, self.dilation, self.groups)


class BranchConv(nn.Module):
    """A conv from branches `cin` to branches `cout` (channels per scale); one weight tensor
    (sum(cout), sum(cin), k, k), sliced per pair of branches. Single branch in and out: a
    plain `ScaledConv` layout (x100, stride in the conv)."""

    def __init__(self, cin, cout, kernel: int, stride: int = 1):
        super().__init__()
        self.cin, self.cout = list(cin), list(cout)
        self.kernel, self.stride, self.padding = kernel, stride, kernel // 2
        self.single = len(self.cin) == 1 and len(self.cout) == 1
        self.weight = nn.Parameter(torch.empty(sum(self.cout), sum(self.cin), kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.in_at = np.concatenate([[0], np.cumsum(self.cin)]).tolist()
        self.out_at = np.concatenate([[0], np.cumsum(self.cout)]).tolist()

    def fold(self, scale, shift):
        """Precompute per-input-branch weights with a per-channel affine (a BN) folded in; the
        shift of output branch j is added once, by the conv of its first input branch (a
        bilinear upsampling keeps a constant, so it may be any)."""
        w = self.weight * scale[:, None, None, None] * (SCALED if self.single else 1.0)
        present = [i for i, c in enumerate(self.cin) if c]  # every one feeds every output branch

        def part(i, js):
            rows = torch.cat([w[self.out_at[j]:self.out_at[j + 1], self.in_at[i]:self.in_at[i + 1]] for j in js])
            bias = torch.cat([shift[self.out_at[j]:self.out_at[j + 1]] * (i == present[0]) for j in js])
            return rows.contiguous(), bias.contiguous()

        self.plan = {}
        for i in present:
            same = [j for j in range(min(i + 1, len(self.cout))) if self.cout[j]]
            higher = [j for j in range(i + 1, len(self.cout)) if self.cout[j]]
            self.plan[i] = (same, part(i, same) if same else None, [(j, part(i, [j])) for j in higher])

    def _folded(self, xs):
        if self.single:
            return [F.conv2d(xs[0], *self.plan[0][1], self.stride, self.padding)]
        sums = [None] * len(self.cout)
        for i, (same, conv, higher) in self.plan.items():
            x = xs[i] if self.stride == 1 else F.avg_pool2d(xs[i], 2, 2)
            if same:
                ys = F.conv2d(x, *conv, 1, self.padding).split([self.cout[j] for j in same], 1)
                for j, y in zip(same, ys):
                    if j < i:
                        y = F.interpolate(y, scale_factor=2 ** (i - j), mode="bilinear", align_corners=False)
                    sums[j] = y if sums[j] is None else sums[j].add_(y)
            for j, part in higher:
                y = F.conv2d(F.max_pool2d(x, 2 ** (j - i), 2 ** (j - i)), *part, 1, self.padding)
                sums[j] = y if sums[j] is None else sums[j].add_(y)
        return sums

    def forward(self, xs):
        if getattr(self, "plan", None) is not None:
            return self._folded(xs)
        if self.single:
            return [F.conv2d(xs[0], SCALED * self.weight, None, self.stride, self.padding)]
        sums = [None] * len(self.cout)
        for i, x in enumerate(xs):
            if x is None or not self.cin[i]:
                continue
            if self.stride == 2:
                x = F.avg_pool2d(x, 2, 2)
            w_in = self.weight[:, self.in_at[i]:self.in_at[i + 1]]
            # output branches at this input's scale or coarser-to-finer (j <= i) share one conv
            same = [j for j in range(min(i + 1, len(self.cout))) if self.cout[j]]
            if same:
                rows = torch.cat([w_in[self.out_at[j]:self.out_at[j + 1]] for j in same])
                ys = F.conv2d(x, rows, None, 1, self.padding).split([self.cout[j] for j in same], 1)
                for j, y in zip(same, ys):
                    if j < i:
                        y = F.interpolate(y, scale_factor=2 ** (i - j), mode="bilinear", align_corners=False)
                    sums[j] = y if sums[j] is None else sums[j] + y
            for j in range(i + 1, len(self.cout)):
                if self.cout[j]:
                    pooled = F.max_pool2d(x, 2 ** (j - i), 2 ** (j - i))
                    y = F.conv2d(pooled, w_in[self.out_at[j]:self.out_at[j + 1]], None, 1, self.padding)
                    sums[j] = y if sums[j] is None else sums[j] + y
        return sums


def _per_branch(make, channels) -> nn.ModuleList:
    """One module per branch, None for a branch of 0 channels (keeps the checkpoint's indices)."""
    return nn.ModuleList([make(c) if c else None for c in channels])


def _affine(bns):
    """The eval-mode BNs of consecutive channel groups as one scale and shift (None: 0 channels)."""
    scales, shifts = [], []
    for bn in bns:
        if bn is not None:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            scales.append(scale)
            shifts.append(bn.bias - bn.running_mean * scale)
    return torch.cat(scales).detach(), torch.cat(shifts).detach()


def _apply(layers, xs):
    return [None if x is None or layer is None else layer(x) for layer, x in zip(layers, xs)]


class ConvBNPReLU(nn.Module):
    """Branch conv, then BN + PReLU on each output branch."""

    def __init__(self, cin, cout, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = BranchConv(cin, cout, kernel, stride)
        self.bns = _per_branch(nn.BatchNorm2d, cout)
        self.prelus = _per_branch(nn.PReLU, cout)

    def fold(self):
        scale, shift = _affine(self.bns)
        self.conv.fold(scale, shift)
        self.folded = True

    def forward(self, xs):
        ys = self.conv(xs)
        return _apply(self.prelus, ys if getattr(self, "folded", False) else _apply(self.bns, ys))


class DepthwiseBNPReLU(nn.Module):
    """A depthwise 3x3 conv + BN + PReLU on each branch (no mixing across branches)."""

    def __init__(self, channels):
        super().__init__()
        self.convs = _per_branch(lambda c: ScaledConv(c, c, 3, padding=1, groups=c), channels)
        self.bns = _per_branch(nn.BatchNorm2d, channels)
        self.prelus = _per_branch(nn.PReLU, channels)

    def fold(self):
        for conv, bn in zip(self.convs, self.bns):
            if conv is not None:
                conv.fold(*_affine([bn]))
        self.folded = True

    def forward(self, xs):
        ys = _apply(self.convs, xs)
        return _apply(self.prelus, ys if getattr(self, "folded", False) else _apply(self.bns, ys))


class Block(nn.Module):
    """A backbone block: branch conv (3x3 when it changes scale or reads the image, else
    1x1) and two depthwise 3x3 convs."""

    def __init__(self, cin, cout, stride: int = 1, first: bool = False):
        super().__init__()
        self.conv1x1 = ConvBNPReLU(cin, cout, 3 if first or stride == 2 else 1, stride)
        self.conv3x3_1 = DepthwiseBNPReLU(cout)
        self.conv3x3_2 = DepthwiseBNPReLU(cout)

    def forward(self, xs):
        return self.conv3x3_2(self.conv3x3_1(self.conv1x1(xs)))


class MultiScale(nn.Module):
    """Parallel 3x3 convs dilated 1, 2, 4, 8, 16 (channels per dilation, 0 = absent), concatenated."""

    def __init__(self, cin: int, per_dilation):
        super().__init__()
        self.msconv = nn.ModuleList([ScaledConv(cin, c, 3, padding=d, dilation=d) if c else None
                                     for c, d in zip(per_dilation, DILATIONS)])
        self.bn = nn.BatchNorm2d(sum(per_dilation))
        self.prelu = nn.PReLU(sum(per_dilation))

    def fold(self):
        scale, shift = _affine([self.bn])
        at = 0
        for conv in self.msconv:
            if conv is not None:
                n = conv.weight.shape[0]
                conv.fold(scale[at:at + n], shift[at:at + n])
                at += n
        self.folded = True

    def forward(self, x):
        y = torch.cat([conv(x) for conv in self.msconv if conv is not None], 1)
        return self.prelu(y if getattr(self, "folded", False) else self.bn(y))


class FusionHead(nn.Module):
    """Cross-stage fusion: 1x1 branch conv, multi-scale dilated convs per branch, 1x1 to one branch."""

    def __init__(self, cin, mid, dils, cout):
        super().__init__()
        self.fuse = ConvBNPReLU(cin, mid, 1)
        self.ms = nn.Module()  # the checkpoint's names: ms.convs.{branch}
        self.ms.convs = nn.ModuleList([MultiScale(c, d) if max(d) else None for c, d in zip(mid, dils)])
        self.fuse1x1 = ConvBNPReLU([sum(d) for d in dils], cout, 1)

    def forward(self, xs):
        return self.fuse1x1(_apply(self.ms.convs, self.fuse(xs)))


class CSNet(nn.Module):
    """``forward(x)`` -> N x 1 x H x W logits; x: ImageNet-normalised RGB (H, W multiples of 8).

    `config` is `parse_config`'s form of a layer configuration."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        blocks = iter(config["blocks"])
        cin, cout = next(blocks)
        self.stage0 = nn.ModuleList([Block([3], cout, first=True)])
        for s, count in enumerate(config["stages"]):
            stage = nn.ModuleList()
            for k in range(count):
                cin, cout = next(blocks)
                stage.append(Block(cin, cout, stride=2 if k == 0 and s > 0 else 1))
            setattr(self, f"stage{s + 1}", stage)
        head = config["head"]
        self.oct_fuse = FusionHead(head["in"], head["mid"], head["dilations"], head["out"])
        self.cls_layer = nn.Conv2d(sum(head["out"]), 1, 1)

    @torch.no_grad()
    def fold(self) -> "CSNet":
        """Fold every BN into the conv before it (inference only; eval mode, after `.to(device)`):
        about a third faster on CPU, same maps up to float rounding."""
        for module in self.modules():
            if isinstance(module, (ConvBNPReLU, DepthwiseBNPReLU, MultiScale)):
                module.fold()
        return self

    def forward(self, x):
        xs = self.stage0[0]([x])
        taps = []
        for s in range(1, 5):
            for block in getattr(self, f"stage{s}"):
                xs = block(xs)
            taps.append(xs[0])
        out = self.cls_layer(self.oct_fuse(taps[1:])[0])
        return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)


# -------------------------------------------------------------------- layer configuration

class _ConfigUnpickler(pickle.Unpickler):
    """Unpickles a layer configuration: lists, numbers and numpy arrays, nothing else (a
    pickle can otherwise run any code while it loads)."""

    _RECONSTRUCT = np.ndarray(0).__reduce__()[0]  # numpy's array rebuild function, any numpy version
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise file_error(self.path, f"refusing to load {module}.{name}: a CSNet layer configuration holds "
                                  f"only lists, numbers and numpy arrays") from None


def _counts(path, value, what: str) -> list[int]:
    """A list of channel counts (non-negative integers) from a number or a numeric array."""
    if isinstance(value, np.ndarray) and value.dtype.kind not in "iuf":
        raise file_error(path, f"{what}: a {value.dtype} array, expected channel counts")
    try:
        arr = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise file_error(path, f"{what}: expected channel counts, got {type(value).__name__}") from None
    if arr.size == 0 or (arr < 0).any() or (arr != np.round(arr)).any():
        raise file_error(path, f"{what}: expected non-negative whole channel counts, got {arr.tolist()}")
    return [int(v) for v in arr]


def parse_config(raw, path) -> dict:
    """The authors' layer configuration (a list: one [in, out] per backbone block, three head
    entries, then the stage lengths) as {"stages", "blocks", "head"}; a one-line error
    naming `path` when it is not one."""
    bad = "not a CSNet layer configuration"
    if not isinstance(raw, list) or len(raw) < 5 or not isinstance(raw[-1], (list, tuple)):
        raise file_error(path, f"{bad} (expected a list ending with the stage lengths)")
    stages = raw[-1]
    if len(stages) != 4 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in stages):
        raise file_error(path, f"{bad}: stage lengths {stages!r}, expected 4 positive integers")
    count = 1 + sum(stages)
    if len(raw) != count + 4:
        raise file_error(path, f"{bad}: {len(raw)} entries, stages {list(stages)} need {count + 4}")
    blocks = []
    for k, entry in enumerate(raw[:count]):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise file_error(path, f"{bad}: entry {k} is not [in channels, out channels]")
        cin, cout = _counts(path, entry[0], f"entry {k} in"), _counts(path, entry[1], f"entry {k} out")
        if not any(cout):
            raise file_error(path, f"entry {k}: a block without output channels")
        if k and cin != blocks[-1][1]:
            raise file_error(path, f"entry {k}: input channels {cin} differ from the previous block's output "
                             f"{blocks[-1][1]}")
        blocks.append((cin, cout))
    if len(blocks[-1][1]) != 1 or any(len(blocks[k][1]) != 1 for k in np.cumsum(stages)[1:3]):
        raise file_error(path, f"{bad}: stages 2-4 must end with one branch")
    try:
        fuse, ms, last = raw[count:count + 3]
        head = {"in": _counts(path, fuse[0], "head in"), "mid": _counts(path, ms[0], "head middle"),
                "ms_out": _counts(path, ms[1], "head multi-scale out"), "out": _counts(path, last[1], "head out")}
        dils = np.asarray(ms[2], np.float64)
    except (TypeError, ValueError, IndexError):
        raise file_error(path, f"{bad}: malformed head entries") from None
    if len(head["in"]) != 3 or len(head["mid"]) != 3 or dils.shape != (3, len(DILATIONS)):
        raise file_error(path, f"{bad}: the head needs 3 branches and {len(DILATIONS)} dilations per branch")
    head["dilations"] = [_counts(path, row, "head dilations") for row in dils]
    taps = [sum(blocks[k][1]) for k in np.cumsum([1 + stages[0], stages[1], stages[2], stages[3]])[1:] - 1]
    if head["in"] != taps:
        raise file_error(path, f"head input channels {head['in']} differ from the stage outputs {taps}")
    if head["ms_out"] != [sum(d) for d in head["dilations"]]:
        raise file_error(path, f"head multi-scale channels {head['ms_out']} differ from their dilation split")
    if len(head["out"]) != 1:
        raise file_error(path, f"{bad}: the head must end with one branch")
    return {"stages": list(stages), "blocks": blocks, "head": head}


def config_path(weights) -> Path:
    """The layer configuration beside a checkpoint: same stem, ``.bin`` (x.pth.tar -> x.bin)."""
    weights = Path(weights)
    for suffix in WEIGHT_SUFFIXES:
        if weights.name.endswith(suffix) and len(weights.name) > len(suffix):
            return weights.with_name(weights.name[: -len(suffix)] + ".bin")
    return weights.with_suffix(".bin")


def read_config(path) -> dict:
    """Read and check a ``.bin`` layer configuration without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "CSNet layer configuration not found (the .bin released with the checkpoint, "
                         "same stem, beside it)")
    try:
        raw = _ConfigUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except EpsError:
        raise
    except Exception as exc:  # any malformed pickle
        raise file_error(path, f"not a CSNet layer configuration (unpickling failed: {type(exc).__name__})") from None
    return parse_config(raw, path)


def to_raw_config(config: dict) -> list:
    """`config` in the authors' pickled form (float64 arrays), for `save`."""
    def arr(values):
        return np.asarray(values, np.float64)

    head = config["head"]
    raw = [[3, arr(config["blocks"][0][1])]] + [[arr(i), arr(o)] for i, o in config["blocks"][1:]]
    raw += [[arr(head["in"]), arr(head["mid"])],
            [arr(head["mid"]), arr(head["ms_out"]), arr(head["dilations"])],
            [arr(head["ms_out"]), arr(head["out"])], list(config["stages"])]
    return raw


def make_config(width: int = 4, branches=(2, 1), stages=(1, 1, 1, 1)) -> dict:
    """A small unpruned configuration (tests, a fresh network): `branches` splits `width`
    channels over scales (1, 1/2, ...); stage 2-4 widths 2x, 4x, 4x."""
    split = [width * b // sum(branches) for b in branches]
    blocks, prev = [([3], split)], split
    for s, n in enumerate(stages):
        mult = (1, 2, 4, 4)[s]
        for k in range(n):
            out = [c * mult for c in split] if (s == 0 or k < n - 1) else [width * mult]
            blocks.append((prev, out))
            prev = out
    taps = [sum(blocks[k][1]) for k in np.cumsum([1 + stages[0], stages[1], stages[2], stages[3]])[1:] - 1]
    mid = [max(t // 3, len(DILATIONS)) for t in taps]
    dils = [[m // len(DILATIONS)] * (len(DILATIONS) - 1) + [m - m // len(DILATIONS) * (len(DILATIONS) - 1)]
            for m in mid]
    head = {"in": taps, "mid": mid, "ms_out": mid, "dilations": dils, "out": [sum(mid)]}
    return {"stages": list(stages), "blocks": blocks, "head": head}


# ------------------------------------------------------------------------------- weights

def _state_of(path) -> dict:
    """The state_dict of a checkpoint file (the authors' dict with 'state_dict', or a bare one)."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "CSNet checkpoint not found")
    try:
        # weights_only: the authors' legacy dict (epoch, arch, state_dict, optimizer) holds
        # only tensors, numbers, strings and containers, which the safe loader admits.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise file_error(path, f"not a loadable PyTorch checkpoint ({text[:200]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise file_error(path, "not a CSNet checkpoint (expected a dict with a 'state_dict' of tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "stage0.0.conv1x1.conv.weight" not in state or "cls_layer.weight" not in state:
        raise file_error(path, f"not a CSNet checkpoint: another layout (first tensor {next(iter(state))})")
    return state


def load_model(weights, config=None) -> CSNet:
    """CSNet built from the ``.bin`` beside `weights` (or `config`) with the checkpoint's weights."""
    weights = Path(weights)
    state = _state_of(weights)
    bin_path = config_path(weights) if config is None else Path(config)
    model = CSNet(read_config(bin_path))
    own = model.state_dict()
    mismatch = f"does not match the checkpoint {weights.name}"
    for key in own:
        if key not in state:
            raise file_error(bin_path, f"{mismatch}: the configuration has tensor {key}, the checkpoint not")
    for key, tensor in state.items():
        if key not in own:
            raise file_error(bin_path, f"{mismatch}: the checkpoint has tensor {key}, the configuration not")
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise file_error(bin_path, f"{mismatch}: tensor {key} is {tuple(tensor.shape)} in the checkpoint, "
                                 f"{tuple(own[key].shape)} by the configuration")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.eval()


def save(model: CSNet, weights) -> Path:
    """Write `model` in the authors' format: a checkpoint dict and the ``.bin`` beside it."""
    from eps.data.io import atomic_path

    weights = Path(weights)
    with atomic_path(weights) as tmp:
        torch.save({"epoch": 0, "arch": "csnet", "state_dict": model.state_dict(), "optimizer": {}}, tmp)
    with atomic_path(config_path(weights)) as tmp:
        tmp.write_bytes(pickle.dumps(to_raw_config(model.config)))
    return weights


# ----------------------------------------------------------------------------- predictor

def _axis(n_in: int, n_out: int):
    """Linear interpolation along one axis as scikit-image's resize does it (scipy zoom with
    grid_mode, mode "reflect" = mirror about the edge pixels): (index0, index1, weight1)."""
    c = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if n_in == 1:
        c[:] = 0.0
    else:
        period = 2 * (n_in - 1)
        c = np.abs(np.mod(c, period))
        c = np.where(c > n_in - 1, period - c, c)
    i0 = np.clip(np.floor(c).astype(np.int64), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, c - i0


def resize(image: np.ndarray, size) -> np.ndarray:
    """`image` (H x W or H x W x C, float) resized to `size` = (h, w) like
    ``skimage.transform.resize(image, size, order=1, mode="reflect", anti_aliasing=False)``."""
    image = np.asarray(image, np.float64)
    r0, r1, rw = _axis(image.shape[0], size[0])
    c0, c1, cw = _axis(image.shape[1], size[1])
    shape = (-1,) + (1,) * (image.ndim - 1)
    rows = image[r0] * (1 - rw).reshape(shape) + image[r1] * rw.reshape(shape)
    shape = (1, -1) + (1,) * (image.ndim - 2)
    out = rows[:, c0] * (1 - cw).reshape(shape) + rows[:, c1] * cw.reshape(shape)
    return np.clip(out, image.min(), image.max())  # skimage clips to the input range


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """The authors' input: [0, 1], 224 x 224, ImageNet mean / std; 3 x 224 x 224 float32."""
    x = resize(rgb / 255.0, (INPUT_SIZE, INPUT_SIZE))
    x = (x - np.asarray(MEAN)) / np.asarray(STD)
    return x.transpose(2, 0, 1).astype(np.float32)


def predictor(model: CSNet, device="cpu", batch: int = BATCH):
    """`rgb uint8 H x W x 3 -> uint8 H x W`; `predict.batch(images)` runs `batch` images per pass."""
    import copy

    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval().fold()

    @torch.no_grad()
    def predict_many(images) -> list[np.ndarray]:
        images = [check_rgb(np.asarray(rgb), "csnet") for rgb in images]
        maps = []
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            x = torch.from_numpy(np.stack([preprocess(rgb) for rgb in chunk])).to(device)
            x = x.contiguous(memory_format=torch.channels_last)  # much faster depthwise convs on CPU
            probs = torch.sigmoid(model(x))[:, 0].cpu().numpy()
            maps += [to_uint8(resize(p, rgb.shape[:2])) for p, rgb in zip(probs, chunk)]
        return maps

    def predict(rgb: np.ndarray) -> np.ndarray:
        return predict_many([rgb])[0]

    predict.batch = predict_many
    return predict


def load_predictor(weights, device="cpu"):
    """The predictor of the authors' checkpoint (``.pth.tar``, its ``.bin`` beside it)."""
    if weights is None:
        raise EpsError("csnet needs --weights FILE (the authors' checkpoint, e.g. csnet-L-x2.pth.tar, "
                       "with csnet-L-x2.bin beside it)")
    return predictor(load_model(weights), device)
