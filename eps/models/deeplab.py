"""DeepLab segmenters: V1 (LargeFOV) and V2 (ASPP) over VGG16 or ResNet-101, and a small CPU net.

``build_segmenter(name, num_classes)`` returns a ``Segmenter``: ``forward(x)`` gives logits
``(N, num_classes, ceil(H/s), ceil(W/s))`` (output stride s = 8, 16 for EfficientNet-Lite0; the
trainer and the predictor upsample them bilinearly to the label / image size).

- ``deeplab_v1_*`` (LargeFOV): fc6 3x3 dilated by 12 (1024 channels) + ReLU + dropout, fc7
  1x1 (1024) + ReLU + dropout, fc8 1x1 classifier. VGG16 keeps DeepLab-LargeFOV's
  ``pool5a`` (3x3 average pooling, stride 1) before fc6.
- ``deeplab_v2_*`` (ASPP): four branches at rates 6, 12, 18, 24, summed. VGG16: each branch
  is a LargeFOV head (fc6 at its rate, fc7, fc8); ResNet-101: each branch is one 3x3
  dilated conv to the classes (the DeepLab-v2 ResNet-101 head).
- Backbones are torchvision's, built with ``weights=None`` (nothing is downloaded), at
  output stride 8: ResNet-101 with ``replace_stride_with_dilation=[False, True, True]``;
  VGG16 with DeepLab's 3x3 pools (pool1-3 stride 2 pad 1, pool4 / pool5 stride 1) and
  conv5 dilated by 2. ResNet-101
  keeps BatchNorm frozen (statistics and affine parameters) in training, as DeepLab does.
- ``deeplab_v1_efficientnet_lite0`` / ``deeplab_v2_efficientnet_lite0``: the classifier's
  ImageNet EfficientNet-Lite0 (``eps.models.efficientnet``, output stride 16, frozen BN) with
  LargeFOV (fc6 rate 6, width 256) or the ResNet-style ASPP (rates 3, 6, 9, 12): DeepLab's
  rates halved for the doubled stride. ``weights: null`` loads the installed package's weights.
- ``deeplab_small``: the small CPU backbone of the classifier (``eps.models.small``,
  GroupNorm, output stride 8) plus a small ASPP (rates 1, 2, 4; 3x3 conv 64 + GN + ReLU + 1x1
  classifier per branch, summed). Trains in about a minute on CPU at 96x96.

Parameter names of the backbone are torchvision's (``backbone.conv1.weight``,
``backbone.features.0.weight``), so an ImageNet torchvision state_dict, or a DeepLab
COCO initialisation renamed by ``eps.models.convert``, loads with ``load_backbone``. A
DeepLab (Caffe) initialisation is used in the network it was trained as: ``caffe=True``
places the strides, dilations and stem pooling as the Caffe ResNet-101 does and feeds it
BGR 0..255 minus the Caffe mean (converted inside ``forward``; the data pipeline stays the same).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from eps.data.imagenet import MEAN, STD
from eps.errors import EpsError

SEGMENTERS = ("deeplab_v1_vgg16", "deeplab_v2_vgg16", "deeplab_v1_resnet101", "deeplab_v2_resnet101",
              "deeplab_small", "deeplab_v1_efficientnet_lite0", "deeplab_v2_efficientnet_lite0")
# Segmenters whose ImageNet backbone weights come with an installed package (weights: null loads them).
PACKAGED_SEGMENTERS = ("deeplab_v1_efficientnet_lite0", "deeplab_v2_efficientnet_lite0")
LITE0_WIDTH = 256  # LargeFOV fc6 / fc7 width on Lite0: a quarter of VGG's 1024, for CPU training
ASPP_RATES = (6, 12, 18, 24)
SMALL_RATES = (1, 2, 4)
HEAD_PREFIXES = ("fc.", "classifier.", "fc8.", "aspp.")  # heads of files that never load into a backbone


def _init_classifier(conv: nn.Conv2d) -> None:
    nn.init.normal_(conv.weight, 0.0, 0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class LargeFOV(nn.Module):
    """fc6 (3x3, dilation `rate`) -> fc7 (1x1) -> fc8 (1x1 classifier), ReLU + dropout between."""

    def __init__(self, in_ch: int, num_classes: int, rate: int = 12, width: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(in_ch, width, 3, padding=rate, dilation=rate)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.fc8 = nn.Conv2d(width, num_classes, 1)
        self.drop6 = nn.Dropout2d(dropout)
        self.drop7 = nn.Dropout2d(dropout)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        _init_classifier(self.fc8)

    def forward(self, x):
        x = self.drop6(F.relu(self.fc6(x)))
        x = self.drop7(F.relu(self.fc7(x)))
        return self.fc8(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab-v2: branches at several rates, summed."""

    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class VGG16Backbone(nn.Module):
    """torchvision VGG16 ``features`` at output stride 8 (3x3 pools, pool4/pool5 stride 1, conv5 dilated 2)."""

    output_stride = 8
    out_channels = 512

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        # torchvision indices: pools at 4, 9, 16, 23, 30; conv5_1..3 at 24, 26, 28.
        # pool1-3 as DeepLab's (3x3, stride 2, pad 1: ceil(H/2)); no parameters change.
        for i in (4, 9, 16):
            features[i] = nn.MaxPool2d(3, stride=2, padding=1)
        features[23] = nn.MaxPool2d(3, stride=1, padding=1)
        features[30] = nn.MaxPool2d(3, stride=1, padding=1)
        for i in (24, 26, 28):
            features[i].dilation = (2, 2)
            features[i].padding = (2, 2)
        self.features = features

    def forward(self, x):
        return self.features(x)


class ResNet101Backbone(nn.Module):
    """torchvision ResNet-101 without avgpool/fc at output stride 8, BatchNorm frozen.

    ``caffe``: the DeepLab (Caffe) ResNet-101 its converted COCO initialisation was trained
    as: the stride of a downsampling block in its first 1x1 conv (not the 3x3), the stem max
    pool with ``ceil_mode``, and every block of layer3 / layer4 dilated by 2 / 4 (torchvision
    keeps the first block of a dilated layer at the previous dilation). Same parameters.
    """

    output_stride = 8
    out_channels = 2048

    def __init__(self, caffe: bool = False):
        super().__init__()
        from torchvision.models import resnet101

        net = resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))
        if caffe:
            self.maxpool.ceil_mode = True
            first = self.layer2[0]
            first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
            for layer, rate in ((self.layer3, 2), (self.layer4, 4)):
                for block in layer:
                    block.conv2.dilation = block.conv2.padding = (rate, rate)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():  # frozen BN: running statistics are never updated
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallBackbone(nn.Module):
    """The classifier's small CPU backbone (``eps.models.small.SmallNet``), names kept."""

    output_stride = 8

    def __init__(self):
        super().__init__()
        from eps.models.small import SmallNet

        net = SmallNet()
        self.out_channels = net.out_channels
        for name, child in net.named_children():
            self.add_module(name, child)

    def forward(self, x):
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))


def _small_branch(in_ch: int, num_classes: int, rate: int, width: int = 64) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, width, 3, padding=rate, dilation=rate, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    cls = nn.Conv2d(width, num_classes, 1)
    _init_classifier(cls)
    return nn.Sequential(conv, nn.GroupNorm(8, width), nn.ReLU(inplace=True), cls)


# the Caffe DeepLab input (the others take torchvision's, eps.data.imagenet.normalize)
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


def to_caffe_input(x: torch.Tensor) -> torch.Tensor:
    """torchvision-normalised RGB -> Caffe input: BGR in 0..255 minus the DeepLab mean."""
    mean = x.new_tensor(MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(STD).view(1, 3, 1, 1)
    rgb255 = (x * std + mean) * 255.0
    return rgb255.flip(1) - x.new_tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)


class Segmenter(nn.Module):
    """``backbone`` (torchvision names) + ``head``; ``forward(x)`` -> logits at stride 8.

    ``x`` is always normalised as torchvision's (``eps.data.imagenet.normalize``); a ``caffe``
    segmenter converts it to the Caffe input its DeepLab initialisation expects.
    """

    def __init__(self, name: str, backbone: nn.Module, head: nn.Module, num_classes: int, caffe: bool = False):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.caffe = caffe
        self.output_stride = backbone.output_stride

    def forward(self, x):
        if self.caffe:
            x = to_caffe_input(x)
        return self.head(self.backbone(x))

    def get_parameter_groups(self):
        """(backbone weights, backbone biases, head weights, head biases), trainable only.

        The trainer gives them lr, 2x lr, 10x lr and 20x lr (DeepLab's lr_mult 1 / 2 / 10 / 20);
        normalisation weights / biases count as weights / biases of their part.
        """
        groups = ([], [], [], [])
        for part, offset in ((self.backbone, 0), (self.head, 2)):
            for name, p in part.named_parameters():
                if p.requires_grad:
                    groups[offset + (1 if name.endswith("bias") else 0)].append(p)
        return groups


def build_segmenter(name: str, num_classes: int, caffe: bool = False) -> Segmenter:
    """Build a segmenter by name (see ``SEGMENTERS``), randomly initialised.

    ``caffe`` (ResNet-101 only): the Caffe DeepLab variant of the backbone and its input
    (see ``ResNet101Backbone``, ``to_caffe_input``), for a DeepLab COCO initialisation.
    """
    if name not in SEGMENTERS:
        raise EpsError(f"segmenter: unknown model {name!r} (allowed: {', '.join(SEGMENTERS)})")
    if caffe and not name.endswith("resnet101"):
        raise EpsError(f"segmenter: the Caffe DeepLab layout exists for ResNet-101 only, not {name!r}")
    k = int(num_classes)
    if name in PACKAGED_SEGMENTERS:
        from eps.models.efficientnet import Lite0Backbone

        # output stride 16 as the classifier's Lite0 (docs/segmentation.md): the rates are
        # DeepLab's (12; 6, 12, 18, 24) halved, the same field of view in pixels
        backbone = Lite0Backbone(output_stride=16)
        if name.startswith("deeplab_v1"):
            head = LargeFOV(backbone.out_channels, k, rate=6, width=LITE0_WIDTH)
        else:
            convs = [nn.Conv2d(backbone.out_channels, k, 3, padding=r // 2, dilation=r // 2) for r in ASPP_RATES]
            for conv in convs:
                _init_classifier(conv)
            head = ASPP(convs)
    elif name == "deeplab_small":
        backbone = SmallBackbone()
        head = ASPP([_small_branch(backbone.out_channels, k, r) for r in SMALL_RATES])
    elif name.endswith("vgg16"):
        backbone = VGG16Backbone()
        if name.startswith("deeplab_v1"):
            head = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), LargeFOV(512, k, rate=12))
        else:
            head = ASPP([LargeFOV(512, k, rate=r) for r in ASPP_RATES])
    else:
        backbone = ResNet101Backbone(caffe=caffe)
        if name.startswith("deeplab_v1"):
            head = LargeFOV(2048, k, rate=12)
        else:
            convs = [nn.Conv2d(2048, k, 3, padding=r, dilation=r) for r in ASPP_RATES]
            for conv in convs:
                _init_classifier(conv)
            head = ASPP(convs)
    return Segmenter(name, backbone, head, k, caffe=caffe)


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_init(path):
    """Read a backbone weights file (``eps.models.convert.Weights``); ``.layout`` says whether
    it is a Caffe DeepLab initialisation (``deeplab-resnet101``: build with ``caffe=True``)."""
    from eps.models.convert import read_weights

    path = Path(path)
    if not path.is_file():
        raise EpsError(f"{path}: weights file not found")
    return read_weights(path, validate=False)


def load_backbone(model: Segmenter, path, weights=None) -> list[str]:
    """Initialise ``model.backbone`` from a local weights file; returns notes (one line each).

    Any format ``eps.models.convert.read_weights`` reads: a torchvision ImageNet VGG16 /
    ResNet-101 state_dict (its ``classifier.`` / ``fc.`` head is dropped), a DeepLab
    COCO initialisation (renamed to torchvision names, ASPP dropped), or for
    ``deeplab_small`` an eps small classifier (``classifier.pt``; its ``fc8`` is dropped).
    A file that does not fit the backbone exactly is an error naming the file. ``weights``:
    the file already read by ``read_init``.
    """
    from eps.models.convert import fit_problems

    weights = weights if weights is not None else read_init(path)
    state = {k: v for k, v in weights.state.items() if not k.startswith(HEAD_PREFIXES)}
    problems = fit_problems(model.backbone.state_dict(), state)
    if problems:
        raise EpsError(f"{path}: weights do not fit the {model.name} backbone "
                       f"({weights.description}): " + "; ".join(problems))
    model.backbone.load_state_dict(state, strict=True)
    notes = list(weights.notes)
    if weights.layout == "deeplab-resnet101" and not model.caffe:
        notes.append("a Caffe DeepLab initialisation in a torchvision-layout backbone: build with caffe=True")
    return notes


def load_segmenter(path, device="cpu"):
    """Rebuild a trained segmenter from `model.pt` (weights_only), in eval mode for inference (a
    Lite0 backbone's BatchNorm folded into its convolutions)."""
    from eps.models.convert import load_fitting, read_model_file
    from eps.models.efficientnet import fold_batchnorm

    state = read_model_file(path, "segmenter")
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in state or "model" not in meta or "num_classes" not in meta:
        raise EpsError(f"{path}: not an eps segmenter file (expected keys state_dict and meta)")
    model = build_segmenter(meta["model"], meta["num_classes"], caffe=bool(meta.get("caffe", False)))
    load_fitting(model, state["state_dict"], path, f"a {meta['model']} segmenter")
    return fold_batchnorm(model.eval()).to(device), meta
